"""Images by URL, through the worker: the same pixels as base64, bounded downloads, and
the SSRF guard, against loopback HTTP servers that count the connections they accept."""

from __future__ import annotations

import dataclasses
import http.server
import io
import ipaddress
import threading
import time

import pytest

from src.serving.worker import Worker
from tests.conftest import FAST, image_from_b64, png_b64, same_pixels, sample_image

SMALL_LIMIT_BYTES = 50_000
TOTAL_TIMEOUT_S = 1.0


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer:
    """A loopback HTTP server with one route per behaviour, counting accepted connections."""

    def __init__(self, host: str = "127.0.0.1", redirect_to: str | None = None):
        self.connections = 0
        self.images = {"/a.png": png_bytes(sample_image()), "/b.png": png_bytes(sample_image(size=(64, 96), seed=2))}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                server.connections += 1
                super().setup()

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if redirect_to is not None:
                    return self._answer(302, b"", location=redirect_to)
                if path in server.images:
                    return self._answer(200, server.images[path])
                if path.startswith("/to/"):  # /to/a.png -> /a.png
                    return self._answer(302, b"", location=path[len("/to"):])
                if path == "/loop":
                    return self._answer(302, b"", location="/loop")
                if path == "/text":
                    return self._answer(200, b"<html>not an image</html>")
                if path == "/big":  # declares its size
                    return self._answer(200, b"\0" * (SMALL_LIMIT_BYTES + 1))
                if path == "/big-unannounced":  # no Content-Length: the body ends when the connection does
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(100):
                        self.wfile.write(b"\0" * 10_000)
                    return
                if path == "/slow":  # trickles a byte every 0.2 s, for a minute
                    self.send_response(200)
                    self.send_header("Content-Length", "300")
                    self.end_headers()
                    for _ in range(300):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                self._answer(404, b"not found")

            def _answer(self, status: int, body: bytes, location: str | None = None):
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.server.server_port}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def images_server():
    server = ImageServer()
    yield server
    server.stop()


@pytest.fixture
def strict_worker(worker):
    """The session's worker (same loaded pipelines) with the SSRF guard on and small limits."""
    settings = dataclasses.replace(worker.settings, allow_private_urls=False, max_image_bytes=SMALL_LIMIT_BYTES,
                                   fetch_timeout_s=TOTAL_TIMEOUT_S)
    return Worker(settings=settings, host=worker.host, price=worker.price, loras=worker.loras)


@pytest.fixture
def limited_worker(worker):
    """Private addresses allowed (the test servers are on loopback), small limits."""
    settings = dataclasses.replace(worker.settings, max_image_bytes=SMALL_LIMIT_BYTES, fetch_timeout_s=TOTAL_TIMEOUT_S)
    return Worker(settings=settings, host=worker.host, price=worker.price, loras=worker.loras)


def run(worker: Worker, **job_input) -> dict:
    return worker.handle({"id": "url-job", "input": job_input})


def test_an_edit_from_image_url_equals_the_same_image_sent_as_base64(worker, images_server):
    by_url = run(worker, image_url=f"{images_server.url}/a.png?X-Amz-Signature=s3cret", prompt="x", seed=4,
                 return_base64=True, **FAST)
    by_base64 = run(worker, image_base64=png_b64(sample_image()), prompt="x", seed=4, return_base64=True, **FAST)
    assert by_url["success"] is True
    assert same_pixels(image_from_b64(by_url["edited_image_base64"]), image_from_b64(by_base64["edited_image_base64"]))
    assert by_url["timings_ms"]["fetch"] > 0 and "fetch" not in by_base64["timings_ms"]


def test_image_urls_through_a_redirect_equal_base64_for_edit_multi(worker, images_server):
    job = dict(operation="edit_multi", prompt="together", seed=6, return_base64=True, **FAST)
    by_url = run(worker, image_urls=[f"{images_server.url}/to/a.png", f"{images_server.url}/b.png"], **job)
    by_base64 = run(worker, image_base64=png_b64(sample_image()),
                    images_base64=[png_b64(sample_image(size=(64, 96), seed=2))], **job)
    assert same_pixels(image_from_b64(by_url["edited_image_base64"]), image_from_b64(by_base64["edited_image_base64"]))


def test_decompose_takes_an_image_url(worker, images_server):
    out = run(worker, operation="decompose", image_url=f"{images_server.url}/a.png", prompt="x", layers=2,
              num_inference_steps=2, seed=1)
    assert out["success"] is True and len(out["layers"]) == 2 and out["timings_ms"]["fetch"] > 0


@pytest.mark.parametrize("path, key, expected", [
    ("/big", "image_url", "larger than 50000 bytes (MAX_IMAGE_BYTES)"),
    ("/big-unannounced", "image_url", "MAX_IMAGE_BYTES"),
    ("/missing.png", "image_url", "HTTP 404"),
    ("/text", "image_url", "not a readable image; PNG, JPEG or WEBP expected"),
    ("/loop", "image_url", "redirect"),
    ("/slow", "image_url", "FETCH_TIMEOUT_S"),
])
def test_bad_downloads_fail_quickly_naming_the_key(limited_worker, images_server, path, key, expected):
    started = time.monotonic()
    out = run(limited_worker, image_url=f"{images_server.url}{path}?sig=s3cret", prompt="x", **FAST)
    elapsed_s = time.monotonic() - started
    assert out["error"].startswith(f"{key}: ") and expected in out["error"], out
    assert "s3cret" not in out["error"]
    assert elapsed_s < TOTAL_TIMEOUT_S + 2
    assert run(limited_worker, image_url=f"{images_server.url}/a.png", prompt="x", **FAST)["success"] is True


def test_a_bad_second_url_names_its_index(limited_worker, images_server):
    out = run(limited_worker, operation="edit_multi", prompt="x",
              image_urls=[f"{images_server.url}/a.png", f"{images_server.url}/missing.png"], **FAST)
    assert out["error"].startswith("image_urls[1]: ") and "HTTP 404" in out["error"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_private_urls_are_refused_with_no_connection_made(strict_worker, images_server, host):
    before = images_server.connections
    port = images_server.server.server_port
    out = run(strict_worker, image_url=f"http://{host}:{port}/a.png", prompt="x", **FAST)
    assert out["error"].startswith("image_url: host ") and "set ALLOW_PRIVATE_URLS=true to allow it" in out["error"]
    assert images_server.connections == before


@pytest.mark.parametrize("url, category", [
    ("http://10.0.0.1/a.png", "a private address"),
    ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
    ("http://100.64.0.1/a.png", "a shared (carrier-grade NAT) address"),
])
def test_internal_addresses_are_refused_before_connecting(strict_worker, url, category):
    started = time.monotonic()
    out = run(strict_worker, image_urls=[url], prompt="x", **FAST)
    assert out["error"].startswith("image_urls[0]: host ") and category in out["error"]
    assert time.monotonic() - started < 1  # refused, not a connection left to time out


def test_a_redirect_from_an_allowed_host_to_a_private_one_is_refused(worker, images_server):
    """The public-looking first hop is a server on 127.0.0.2 that the policy lets through
    (ALLOWED_PRIVATE_NETWORKS); it redirects to 127.0.0.1, which must see no connection."""
    target = f"{images_server.url}/a.png"
    first_hop = ImageServer(host="127.0.0.2", redirect_to=target)
    settings = dataclasses.replace(worker.settings, allow_private_urls=False,
                                   allowed_private_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    guarded = Worker(settings=settings, host=worker.host, price=worker.price, loras=worker.loras)
    try:
        before = images_server.connections
        out = run(guarded, image_url=f"{first_hop.url}/photo.png", prompt="x", **FAST)
        assert out["error"].startswith("image_url: ") and "127.0.0.1" in out["error"]
        assert "ALLOW_PRIVATE_URLS" in out["error"]
        assert first_hop.connections == 1 and images_server.connections == before
    finally:
        first_hop.stop()


@pytest.mark.parametrize("job, error", [
    ({"image_url": "http://a.example/x.png", "image_base64": "QUFB"},
     "image_url: one style of image input per job; got both image_base64 and image_url"),
    ({"image_url": "http://a.example/x.png", "image_urls": ["http://a.example/y.png"]},
     "image_urls: one style of image input per job; got both image_url and image_urls"),
    ({"images_base64": ["QUFB"]}, "images_base64: extra images come after image_base64"),
    ({"image_url": "ftp://a.example/x.png?sig=s3cret"}, "image_url: must start with http:// or https://"),
    ({"image_urls": ["http://a.example/x.png"] * 4}, "image_urls: 4 image URLs; at most 3 images in all"),
])
def test_bad_url_keys_are_refused_before_any_download(worker, job, error):
    out = run(worker, prompt="x", **job)
    assert out["error"].startswith(error), out
    assert "s3cret" not in out["error"]


def test_a_downloaded_image_of_a_shape_the_pipeline_cannot_take_is_refused(worker, images_server):
    from PIL import Image

    images_server.images["/thin.png"] = png_bytes(Image.new("RGB", (1, 1000)))
    out = run(worker, image_urls=[f"{images_server.url}/a.png", f"{images_server.url}/thin.png?sig=s3cret"],
              operation="edit_multi", prompt="x")
    assert out["error"].startswith("image_urls[1]: image is 1x1000, 1000.0:1 between its sides; edit_multi takes at "
                                   "most 279:1"), out
