"""One LoRA download cache, many callers (src/models/lora/sources.py).

Two tenants on one S3 endpoint that checks signatures and IAM policies (moto, each
tenant's key allowed its own bucket only), and a second endpoint with a bucket of the
same name: a job gets a cached s3:// LoRA only where its own bucket credentials read the
same object (a HEAD on every use), learns nothing of a file it cannot read (same error,
same requests, no sha256), and a bad object of one caller never reaches another's job.
http(s) files are shared only by their whole URL, query string included. And a bucket
that trickles, or answers HEAD without a length, ends the job within
LORA_DOWNLOAD_TIMEOUT_S with a named error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
import time
from functools import partial

import pytest

from tests.conftest import FAST, image_from_b64, job_r2, png_b64, sample_image
from tests.faulty_s3 import Fault, FaultyProxy, start_tenant_s3

STYLE_KEY = "loras/style.safetensors"
SOURCE = f"s3://tenant-a/{STYLE_KEY}"  # tenant a's object
TIMEOUT_S = 2.0  # LORA_DOWNLOAD_TIMEOUT_S for the slow-bucket cases
SLACK_S = 1.0  # the job's work before and after its LoRA on a busy 2-core machine


@pytest.fixture(scope="module")
def tenants():
    server = start_tenant_s3(("a", "b"))
    yield server
    server.stop()


@pytest.fixture
def counted(tenants):
    """A proxy in front of the tenants' endpoint, counting the requests that reach it."""
    proxy = FaultyProxy(tenants.endpoint_url)
    yield proxy
    proxy.stop()


@pytest.fixture
def fresh_cache(worker, tmp_path):
    """The session's worker on its loaded pipelines, with a download cache of its own."""
    return dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, lora_cache_dir=tmp_path))


def job(worker, r2: dict | None, source: str = SOURCE, job_id: str = "tenant-job", **settings) -> dict:
    if settings:
        worker = dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, **settings))
    job_input = {"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "a hat", "seed": 5,
                 "return_base64": True, "loras": [{"source": source}], **FAST}
    if r2 is not None:
        job_input["r2"] = r2
    return worker.handle({"id": job_id, "input": job_input})


def through(proxy: FaultyProxy, r2: dict) -> dict:
    return {**r2, "endpoint_url": proxy.url}


def requests_seen(proxy: FaultyProxy) -> dict[str, int]:
    """The requests for tenant a's object (a job's results go through the proxy too)."""
    return {method: proxy.count(method, f"/tenant-a/{STYLE_KEY}") for method in ("HEAD", "GET")}


def test_a_cached_lora_reaches_no_tenant_without_access_to_it(fresh_cache, tenants, counted, lora_dir):
    style = (lora_dir / "tiny_lora_diffusers.safetensors").read_bytes()
    tenants.client("a").put_object(Bucket="tenant-a", Key=STYLE_KEY, Body=style)
    denied = f"loras[0].source: downloading {SOURCE!r} failed: HTTP 403 (Forbidden)"
    b_r2 = through(counted, tenants.r2("b"))

    before = job(fresh_cache, b_r2, job_id="b-before")
    assert before == {"error": denied}
    assert requests_seen(counted) == {"HEAD": 1, "GET": 0}

    owner = job(fresh_cache, through(counted, tenants.r2("a")), job_id="a-downloads")
    sha256 = hashlib.sha256(style).hexdigest()
    assert owner["loras"][0]["sha256"] == sha256
    assert requests_seen(counted) == {"HEAD": 2, "GET": 1}

    # Cached now: tenant b meets exactly what it met before, by exactly the same requests.
    after = job(fresh_cache, b_r2, job_id="b-after")
    assert after == {"error": denied} and sha256 not in str(after)
    assert requests_seen(counted) == {"HEAD": 3, "GET": 1}

    # Its owner is asked again too, and served from the cache: one HEAD, no GET.
    again = job(fresh_cache, through(counted, tenants.r2("a")), job_id="a-cached")
    assert again["loras"] == owner["loras"]
    assert image_from_b64(again["edited_image_base64"]).tobytes() == \
        image_from_b64(owner["edited_image_base64"]).tobytes()
    assert requests_seen(counted) == {"HEAD": 4, "GET": 1}


def test_no_bucket_credentials_of_the_jobs_own_no_cached_file(fresh_cache, tenants, lora_dir):
    """Tenant b's own bucket is where its job's s3:// sources are read; the same URL with
    no such object there, or read with a wrong secret, is b's own error, cached file or not."""
    tenants.client("a").put_object(Bucket="tenant-a", Key=STYLE_KEY,
                                   Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    assert "error" not in job(fresh_cache, tenants.r2("a"), job_id="a-caches")
    missing = job(fresh_cache, tenants.r2("b"), source=f"s3://tenant-b/{STYLE_KEY}")
    assert missing == {"error": f"loras[0].source: downloading 's3://tenant-b/{STYLE_KEY}' failed: "
                                "HTTP 404 (Not Found)"}
    wrong_secret = job(fresh_cache, {**tenants.r2("a"), "secret_access_key": "not-the-secret"})
    assert wrong_secret == {"error": f"loras[0].source: downloading {SOURCE!r} failed: HTTP 403 (Forbidden)"}


def test_a_bad_object_of_one_caller_never_poisons_another(fresh_cache, tenants, s3, lora_dir):
    """Another endpoint with a bucket of the same name holds junk at the same key: its
    caller gets its own error, before and after the good object is cached, and the good
    object's owner gets its LoRA, before and after the junk was read."""
    s3.client().create_bucket(Bucket="tenant-a")
    s3.client().put_object(Bucket="tenant-a", Key=STYLE_KEY, Body=(lora_dir / "not_a_lora.safetensors").read_bytes())
    tenants.client("a").put_object(Bucket="tenant-a", Key=STYLE_KEY,
                                   Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    other = job_r2(s3.endpoint_url, "tenant-a")
    junk = job(fresh_cache, other, job_id="junk-first")
    assert junk["error"].startswith(f"loras[0].source: {SOURCE!r} is not a LoRA")
    good = job(fresh_cache, tenants.r2("a"), job_id="good-after-junk")
    assert good["loras"][0]["sha256"] == hashlib.sha256(
        (lora_dir / "tiny_lora_diffusers.safetensors").read_bytes()).hexdigest()
    assert job(fresh_cache, other, job_id="junk-again") == junk
    assert job(fresh_cache, tenants.r2("a"), job_id="good-again")["loras"] == good["loras"]
    # With nothing at the key on the other endpoint: its own 404, not the cached file.
    s3.client().delete_object(Bucket="tenant-a", Key=STYLE_KEY)
    assert job(fresh_cache, other, job_id="nothing-there") == {
        "error": f"loras[0].source: downloading {SOURCE!r} failed: HTTP 404 (Not Found)"}


def test_a_changed_object_is_downloaded_again(fresh_cache, tenants, counted, lora_dir):
    first, second = (lora_dir / name for name in ("tiny_lora_diffusers.safetensors", "tiny_lora_aitoolkit.safetensors"))
    a_r2 = through(counted, tenants.r2("a"))
    tenants.client("a").put_object(Bucket="tenant-a", Key=STYLE_KEY, Body=first.read_bytes())
    assert job(fresh_cache, a_r2)["loras"][0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    tenants.client("a").put_object(Bucket="tenant-a", Key=STYLE_KEY, Body=second.read_bytes())
    assert job(fresh_cache, a_r2)["loras"][0]["sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
    assert requests_seen(counted) == {"HEAD": 2, "GET": 2}


def test_an_http_file_is_shared_only_by_its_whole_url(fresh_cache, lora_file_server):
    """Presigned URLs of one object differ in their query strings: each is its own key."""
    url = f"{lora_file_server.url}/tiny_lora_diffusers.safetensors"
    for query in ("X-Amz-Signature=one", "X-Amz-Signature=two", "X-Amz-Signature=one"):
        out = job(fresh_cache, None, source=f"{url}?{query}")
        assert "error" not in out, out
        assert out["loras"][0]["source"] == url  # the query string is never shown
    assert lora_file_server.gets == ["/tiny_lora_diffusers.safetensors"] * 2


# --- a bucket that holds the worker: every read ends within LORA_DOWNLOAD_TIMEOUT_S ---

@pytest.mark.parametrize("headers_first", [False, True], ids=["trickled headers", "trickled body"])
def test_a_trickling_bucket_ends_the_lora_read_at_its_deadline(worker, s3, fault_proxy, lora_dir, headers_first,
                                                              tmp_path, guarantee_figures):
    s3.client().put_object(Bucket=s3.bucket, Key="slow/style.safetensors",
                           Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    fault_proxy.always(Fault.trickle(0.05, headers_first=headers_first), method="GET")
    source = f"s3://{s3.bucket}/slow/style.safetensors"
    started = time.monotonic()
    out = job(worker, job_r2(fault_proxy.url, s3.bucket), source=source, lora_download_timeout_s=TIMEOUT_S,
              lora_cache_dir=tmp_path)
    seconds = time.monotonic() - started
    assert out == {"error": f"loras[0].source: downloading {source!r} failed: timed out after {TIMEOUT_S:g} s "
                            "(LORA_DOWNLOAD_TIMEOUT_S)"}
    assert TIMEOUT_S <= seconds < TIMEOUT_S + SLACK_S
    assert not list(tmp_path.iterdir())  # nothing half-read left in the cache
    guarantee_figures[f"lora_s3_trickle_{'body' if headers_first else 'headers'}"] = (
        f"LORA_DOWNLOAD_TIMEOUT_S={TIMEOUT_S:g}: job ended in {seconds:.2f} s")


def test_a_trickling_http_source_ends_at_its_deadline(worker, lora_file_server, tmp_path):
    base = lora_file_server.url
    proxy = FaultyProxy(base)
    proxy.always(Fault.trickle(0.05, headers_first=True), method="GET")
    try:
        started = time.monotonic()
        out = job(worker, None, source=f"{proxy.url}/tiny_lora_diffusers.safetensors?X-Amz-Signature=secret",
                  lora_download_timeout_s=TIMEOUT_S, lora_cache_dir=tmp_path)
        seconds = time.monotonic() - started
    finally:
        proxy.stop()
    assert out == {"error": f"loras[0].source: downloading '{proxy.url}/tiny_lora_diffusers.safetensors' failed: "
                            f"timed out after {TIMEOUT_S:g} s (LORA_DOWNLOAD_TIMEOUT_S)"}
    assert TIMEOUT_S <= seconds < TIMEOUT_S + SLACK_S


def test_a_head_without_length_is_a_named_error(worker, s3, fault_proxy, lora_dir, tmp_path):
    s3.client().put_object(Bucket=s3.bucket, Key="nolength/style.safetensors",
                           Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    fault_proxy.always(Fault.no_length(), method="HEAD")
    source = f"s3://{s3.bucket}/nolength/style.safetensors"
    out = job(worker, job_r2(fault_proxy.url, s3.bucket), source=source, lora_cache_dir=tmp_path)
    assert out == {"error": f"loras[0].source: downloading {source!r} failed: the bucket answered HEAD "
                            "without a Content-Length"}
    assert fault_proxy.count("GET") == 0


def test_the_worker_serves_the_next_job_after_a_slow_bucket(worker, s3, fault_proxy, lora_dir, tmp_path):
    s3.client().put_object(Bucket=s3.bucket, Key="recover/style.safetensors",
                           Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    source = f"s3://{s3.bucket}/recover/style.safetensors"
    r2 = job_r2(fault_proxy.url, s3.bucket)
    fault_proxy.plan(Fault.trickle(0.05), method="GET")
    assert "timed out" in job(worker, r2, source=source, lora_download_timeout_s=TIMEOUT_S,
                              lora_cache_dir=tmp_path)["error"]
    out = job(worker, r2, source=source, lora_download_timeout_s=TIMEOUT_S, lora_cache_dir=tmp_path)
    assert "error" not in out, out


def test_a_hostile_error_code_is_cut_short(worker, s3, fault_proxy, lora_dir, tmp_path):
    """The job's own endpoint writes the S3 error code: the error repeats 64 printable characters of it."""
    s3.client().put_object(Bucket=s3.bucket, Key="coded/style.safetensors",
                           Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    fault_proxy.plan(Fault.status(403, "Denied\u200b" + "x" * 5000), method="GET")
    source = f"s3://{s3.bucket}/coded/style.safetensors"
    out = job(worker, job_r2(fault_proxy.url, s3.bucket), source=source, lora_cache_dir=tmp_path)
    assert out == {"error": f"loras[0].source: downloading {source!r} failed: Denied{'x' * 58}"}
