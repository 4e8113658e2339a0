"""End to end: handler.py behind the runpod SDK's local API server, results in the
loopback S3, fetched over HTTP through their presigned URLs."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from functools import partial

import pytest
import requests
from PIL import Image

from tests.conftest import FAST, REPO_ROOT, fetch, image_from_b64, png_b64, sample_image
from tools.local_stack import start_api
from tests.layer_checks import (EDITS, SOURCE_SIZE, alpha_over, assert_archive_holds, decompose_job, fetch_archive,
                                layer_pile, read_archive, same_pixels)
from tools.contact_sheet import BACKGROUND, DEFAULT_TILE_SIDE, LABEL_HEIGHT, MARGIN


@pytest.fixture(scope="module")
def api(worker_env, tmp_path_factory):
    """A server of this module's own: its first job is this module's first test, whatever
    other modules sent the session's server before (the first job reports the start-up load)."""
    server = start_api(worker_env, tmp_path_factory.mktemp("api") / "worker.log")
    yield server
    server.stop()


def runsync(api, job_input: dict) -> dict:
    response = requests.post(f"{api.url}/runsync", json={"input": job_input}, timeout=600)
    response.raise_for_status()
    return response.json()



def test_edit_through_runsync(api):
    reply = runsync(api, {"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "make it blue",
                          "seed": 42, **FAST})
    assert reply["status"] == "COMPLETED", reply
    out = reply["output"]
    assert out["success"] and out["seed"] == 42
    assert re.fullmatch(rf"qwen-edit/{reply['id']}/[0-9a-f]{{8}}/output\.png", out["r2_key"])
    assert fetch(out["output_url"]).size == (256, 256)
    assert out["timings_ms"]["load"] > 0  # the first job after start reports the start-up load


def test_run_then_status_and_multi_image_edit(api):
    queued = requests.post(f"{api.url}/run", json={"input": {
        "operation": "edit_multi", "image_base64": png_b64(sample_image(seed=1)),
        "images_base64": [png_b64(sample_image(seed=2)), png_b64(sample_image(seed=3))],
        "prompt": "the three together", "seed": 1, **FAST}}, timeout=30).json()
    assert queued["status"] == "IN_PROGRESS"
    done = requests.post(f"{api.url}/status/{queued['id']}", timeout=600).json()
    assert done["status"] == "COMPLETED", done
    assert fetch(done["output"]["output_url"]).size == (256, 256)


def test_decompose_through_runsync(api):
    reply = runsync(api, {"operation": "decompose", "image_base64": png_b64(sample_image()), "prompt": "scene",
                          "layers": 2, "num_inference_steps": 2, "seed": 4})
    assert reply["status"] == "COMPLETED", reply
    out = reply["output"]
    layers = [fetch(layer["url"]) for layer in out["layers"]]
    assert len(layers) == 2 and all(layer.mode == "RGBA" for layer in layers)
    composite = Image.alpha_composite(Image.alpha_composite(Image.new("RGBA", layers[0].size), layers[0]), layers[1])
    assert fetch(out["composite"]["url"]).tobytes() == composite.tobytes()


def test_bad_input_fails_the_job_and_the_worker_serves_the_next(api):
    reply = runsync(api, {"image_base64": png_b64(sample_image()), "prompt": "x", "num_inference_steps": 500})
    assert reply["status"] == "FAILED"
    assert reply["error"] == "num_inference_steps: input should be less than or equal to 100; got 500"
    assert runsync(api, {"image_base64": png_b64(sample_image()), "prompt": "x", **FAST})["status"] == "COMPLETED"


def test_orchestrator_health_check(api):
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    reply = runsync(api, {"image_base64": png_b64(grey), "prompt": "test", "num_inference_steps": 1, "seed": None,
                          "guidance_scale": 1.0, "negative_prompt": " ", "images_base64": [], "use_fp8": False})
    out = reply["output"]
    assert "error" not in reply and out["success"] is True
    assert image_from_b64(out["edited_image_base64"]).size == tuple(out["image_size"])
    assert out["inference_time_ms"] >= 0 and out["cost_usd"] >= 0


def test_edit_client_against_the_local_api(api, tmp_path):
    source = tmp_path / "in.png"
    sample_image().save(source)
    done = subprocess.run(
        [sys.executable, "tools/test_qwen_edit.py", "--url", api.url, "--image", str(source), "--image", str(source),
         "--prompt", "twins", "--steps", "1", "--seed", "3", "--width", "256", "--height", "256",
         "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = list((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == (256, 256)


def test_edit_client_with_an_image_url_and_several_results(api, tmp_path):
    """The client sends a URL, two prompts and num_images 2: four images come back, in order."""
    folder = tmp_path / "served"
    folder.mkdir()
    sample_image().save(folder / "in.png")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(QuietFileHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = subprocess.run(
            [sys.executable, "tools/test_qwen_edit.py", "--url", api.url,
             "--image", f"http://127.0.0.1:{server.server_port}/in.png", "--prompt", "blue", "--prompt", "red",
             "--num-images", "2", "--steps", "1", "--seed", "3", "--width", "256", "--height", "256",
             "--out", str(tmp_path / "out")],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert [path.name.rsplit("_", 1)[1] for path in saved] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(Image.open(path).size == (256, 256) for path in saved)


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_layers_client_against_the_local_api(api, tmp_path):
    source = tmp_path / "in.png"
    sample_image(mode="RGBA").save(source)
    out_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "tools/test_layers.py", "--url", api.url, "--image", str(source), "--prompt", "scene",
         "--layers", "2", "--steps", "2", "--seed", "3", "--edit", "1:make it red", "--edit-steps", "2",
         "--resize-to-input", "--archive", "zip", "--out", str(out_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cost" in done.stdout
    [sheet_path] = out_dir.glob("*_contact_sheet.png")
    stem = sheet_path.name.removesuffix("_contact_sheet.png")
    names = ["layer0", "layer1", "composite", "edited_layer1", "composite_edited"]
    images = {name: Image.open(out_dir / f"{stem}_{name}.png") for name in names}
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(
        [f"{stem}_{name}.png" for name in names] + [f"{stem}_layers.zip", sheet_path.name])
    assert all(image.mode == "RGBA" and image.size == source_size(source) for image in images.values())
    assert images["edited_layer1"].getchannel("A").tobytes() == images["layer1"].getchannel("A").tobytes()
    final = [images["layer0"], images["edited_layer1"]]
    assert_archive_holds("zip", read_archive("zip", (out_dir / f"{stem}_layers.zip").read_bytes()),
                         ["layer_0", "edited_layer_1"], final, images["composite_edited"])
    # The sheet: originals and composite above, the edited layer and its composite below.
    sheet = Image.open(sheet_path)
    width, height = source_size(source)
    tile_height = round(DEFAULT_TILE_SIDE * height / width)  # wide images: the width fills the tile
    assert sheet.format == "PNG" and sheet.size == (MARGIN + 3 * (DEFAULT_TILE_SIDE + MARGIN),
                                                    MARGIN + 2 * (tile_height + LABEL_HEIGHT + MARGIN))
    empty_cell = (MARGIN, 2 * MARGIN + tile_height + LABEL_HEIGHT)  # under layer 0, which was not edited
    assert sheet.getpixel(empty_cell) == BACKGROUND


def source_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# --- the layer workflow ------------------------------------------------------------

def test_layer_edits_and_a_psd_archive_through_runsync(api):
    reply = runsync(api, decompose_job(layers=2, edits=[EDITS[1] | {"layer": 1}], resize_to_input=True,
                                       archive="psd"))
    assert reply["status"] == "COMPLETED", reply
    out = reply["output"]
    images = {entry["name"]: fetch(entry["url"]) for entry in out["images"]}
    assert set(images) == {"layer_0", "layer_1", "composite", "edited_layer_1", "composite_edited"}
    assert all(image.size == SOURCE_SIZE for image in images.values())
    assert images["edited_layer_1"].getchannel("A").tobytes() == images["layer_1"].getchannel("A").tobytes()
    final = [images["layer_0"], images["edited_layer_1"]]
    assert same_pixels(images["composite_edited"], alpha_over(final))
    assert_archive_holds("psd", read_archive("psd", fetch_archive(out, "psd")), ["layer_0", "edited_layer_1"],
                         final, images["composite_edited"])


def test_composite_and_a_zip_archive_through_runsync(api):
    layers = layer_pile()
    reply = runsync(api, {"operation": "composite", "layers_base64": [png_b64(layer) for layer in layers],
                          "archive": "zip"})
    assert reply["status"] == "COMPLETED", reply
    out = reply["output"]
    assert same_pixels(fetch(out["composite"]["url"]), alpha_over(layers))
    assert_archive_holds("zip", read_archive("zip", fetch_archive(out, "zip")), [f"layer_{i}" for i in range(4)],
                         layers, alpha_over(layers))


def test_more_edits_than_the_default_cap_fail_the_job(api):
    reply = runsync(api, decompose_job(layers=6, edits=[{"layer": i, "prompt": "x"} for i in range(5)]))
    assert reply["status"] == "FAILED"
    assert reply["error"] == "edits: 5 edits; at most 4 in one job (MAX_LAYER_EDITS)"
