"""Shared fixtures: tiny real models in an HF cache, a loopback S3, the worker in
process and the worker behind the runpod SDK's local API server."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from src.models.files.snapshots import ref_file  # noqa: E402
from tools.local_stack import start_api, start_s3  # noqa: E402

TINY_HF_HOME = Path(os.environ.get("TINY_HF_HOME", REPO_ROOT / ".cache" / "hf")).resolve()
# Small output sizes keep the tiny pipelines fast on 2 CPU cores.
FAST = {"num_inference_steps": 2, "width": 256, "height": 256}


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_from_b64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def edit_hat(worker, job_id: str, **extra) -> dict:
    """A small edit ("a hat", seed 5) through `worker.handle`, its output checked for errors."""
    job = {"image_base64": png_b64(sample_image()), "prompt": "a hat", "seed": 5, "return_base64": True,
           **FAST, **extra}
    out = worker.handle({"id": job_id, "input": job})
    assert "error" not in out, out
    return out


def edited_pixels(out: dict):
    """The edited image of a job's output, as an int array (differences do not wrap)."""
    import numpy as np

    return np.asarray(image_from_b64(out["edited_image_base64"]).convert("RGB")).astype(int)


def fetch_bytes(url: str) -> requests.Response:
    """A presigned URL fetched over HTTP, as a client would."""
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    return response


def fetch(url: str) -> Image.Image:
    image = Image.open(io.BytesIO(fetch_bytes(url).content))
    image.load()
    return image


def reference_edit_pipeline(path):
    """diffusers' edit pipeline loaded apart from the worker, with the models' authors'
    corrections of it (src/models/upstream_fixes.py, tested against the authors' way in
    tests/serving/test_reference_parity.py): the reference the worker's images must equal."""
    from diffusers import QwenImageEditPlusPipeline

    from src.models import upstream_fixes
    from src.models.vl_processor import load_processor

    pipeline = QwenImageEditPlusPipeline.from_pretrained(path, processor=load_processor(str(path)), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    upstream_fixes.apply(pipeline)
    return pipeline


def on_matte(image: Image.Image, rgb: tuple[int, int, int]) -> Image.Image:
    """An RGBA image alpha-composited onto a flat colour, as RGB."""
    return Image.alpha_composite(Image.new("RGBA", image.size, rgb + (255,)), image.convert("RGBA")).convert("RGB")


# The flat green the Qwen-Image-Layered authors put under RGBA images before an edit.
AUTHORS_GREEN = (30, 215, 96)


def direct_edit(pipeline, images, prompt, seed, **kwargs) -> Image.Image:
    """What the diffusers pipeline itself returns for these inputs and seed."""
    return pipeline(image=images, prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0,
                    guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def job_r2(endpoint_url: str, bucket: str, key_id: str = "job-key-id", secret: str = "job-secret") -> dict:
    """A job's own bucket (`r2`)."""
    return {"endpoint_url": endpoint_url, "access_key_id": key_id, "secret_access_key": secret,
            "bucket_name": bucket, "region": "us-east-1"}


def sample_image(size=(96, 64), mode="RGB", seed=0) -> Image.Image:
    """A deterministic image with structure (gradient and blocks), not a flat colour."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    pixels = image.load()
    for x in range(size[0] // 4, size[0] // 2):
        for y in range(size[1] // 4, size[1] // 2):
            pixels[x, y] = ((40 * seed) % 256, 200, 60)
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = Image.new("L", size, 0)
        alpha.paste(255, (0, 0, size[0] * 3 // 4, size[1]))
        image.putalpha(alpha)
    return image


@pytest.fixture(scope="session")
def hf_home() -> Path:
    marker = ref_file(TINY_HF_HOME, "Qwen/Qwen-Image-Edit-2511")
    if not marker.exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_models.py"),
                        "--hf-home", str(TINY_HF_HOME)], check=True)
    return TINY_HF_HOME


@dataclasses.dataclass
class FileServer:
    """A loopback HTTP server's address and what it saw: the paths it answered GETs for
    (query strings dropped), in order, and the connections it accepted."""
    url: str
    gets: list[str] = dataclasses.field(default_factory=list)
    connections: int = 0

    def seen(self) -> tuple[int, int]:
        return len(self.gets), self.connections


@pytest.fixture
def lora_file_server(lora_dir):
    """The LoRA files served over loopback HTTP."""
    seen = FileServer(url="")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def setup(self):
            seen.connections += 1
            super().setup()

        def do_GET(self):
            seen.gets.append(self.path.partition("?")[0])
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(lora_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen.url = f"http://127.0.0.1:{server.server_port}"
    yield seen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def lora_dir(hf_home) -> Path:
    """Tiny LoRA files for the tiny models; also puts the tiny Lightning repo into hf_home."""
    folder = TINY_HF_HOME.parent / "loras"
    if not (folder / "tiny_lora_diffusers.safetensors").exists():
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_loras.py"), "--out", str(folder),
                        "--hf-home", str(hf_home)], check=True)
    return folder


@pytest.fixture(scope="session")
def s3():
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def worker_env(hf_home, lora_dir, s3, tmp_path_factory) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "PRELOAD": "edit",
            "GPU_PRICE_PER_HOUR": "1.80", "LORA_ROOTS": str(lora_dir),
            "LORA_CACHE_DIR": str(tmp_path_factory.mktemp("lora-cache")),
            # The loopback S3 and the tests' HTTP servers are private addresses.
            "ALLOW_PRIVATE_URLS": "true", **s3.env()}


@pytest.fixture(scope="session")
def worker(worker_env):
    """The worker in this process, started the way handler.py starts it."""
    from src.plumbing.config import Settings
    from src.serving.startup import start_worker

    return start_worker(Settings.from_env(worker_env))


@pytest.fixture(scope="session")
def api(worker_env, tmp_path_factory):
    """handler.py behind the runpod SDK's local API server, on loopback."""
    server = start_api(worker_env, tmp_path_factory.mktemp("api") / "worker.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def guarantee_figures(request):
    """Figures measured by the guarantee tests (worst times and memory, retry timings, RSS
    growth), written to outputs/guarantees.json and listed at the end of the run: the
    numbers docs/guarantees.md quotes."""
    figures: dict[str, object] = {}
    yield figures
    if not figures:
        return
    import json

    path = REPO_ROOT / "outputs" / "guarantees.json"
    path.parent.mkdir(exist_ok=True)
    # This run's figures only: merging with an earlier run's would pass off stale ones.
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("-", f"guarantee figures (also in {path.relative_to(REPO_ROOT)})")
        for name, value in sorted(figures.items()):
            reporter.write_line(f"{name}: {value}")


@pytest.fixture
def fault_proxy(s3):
    """A fault-injecting proxy in front of the loopback S3 (tests/faulty_s3.py)."""
    from tests.faulty_s3 import FaultyProxy

    proxy = FaultyProxy(s3.endpoint_url)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def locked_s3():
    """A loopback S3 that checks credentials: one access key, real signature checks."""
    from tests.faulty_s3 import start_locked_s3

    server = start_locked_s3()
    yield server
    server.stop()
