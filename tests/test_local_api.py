"""End to end: handler.py behind the runpod SDK's local API server, results in the
loopback S3, fetched over HTTP through their presigned URLs."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import requests
from PIL import Image

from tests.conftest import FAST, REPO_ROOT, image_from_b64, png_b64, sample_image


def runsync(api, job_input: dict) -> dict:
    response = requests.post(f"{api.url}/runsync", json={"input": job_input}, timeout=600)
    response.raise_for_status()
    return response.json()


def fetch(url: str) -> Image.Image:
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content))


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


def test_payloads_and_secrets_stay_out_of_the_log(api, s3):
    payload = png_b64(sample_image(seed=9))
    runsync(api, {"image_base64": payload, "prompt": "x", "r2": {
        "endpoint_url": s3.endpoint_url, "access_key_id": "k", "secret_access_key": "per-job-secret-value",
        "bucket_name": "missing-bucket", "region": "us-east-1"}, **FAST})
    log = api.log()
    assert payload[:64] not in log
    assert "per-job-secret-value" not in log and s3.secret_access_key not in log


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


def test_layers_client_against_the_local_api(api, tmp_path):
    source = tmp_path / "in.png"
    sample_image(mode="RGBA").save(source)
    done = subprocess.run(
        [sys.executable, "tools/test_layers.py", "--url", api.url, "--image", str(source), "--prompt", "scene",
         "--layers", "2", "--steps", "1", "--seed", "3", "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    layers = sorted((tmp_path / "out").glob("*_layer*.png"))
    assert len(layers) == 2 and all(Image.open(p).mode == "RGBA" for p in layers)
    assert len(list((tmp_path / "out").glob("*_composite.png"))) == 1
    assert "cost" in done.stdout
