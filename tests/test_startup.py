"""A start that cannot serve exits non-zero with one clear line."""

import os
import shutil
import subprocess
import sys

import pytest

from src.models.files.snapshots import main_snapshot, repo_folder
from tests.conftest import REPO_ROOT


def start(env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "handler.py"], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr  # a failed start says why in one line, not a stack
    return done


def test_missing_model_names_the_repo_and_the_cache(tmp_path):
    done = start({"HF_HOME": str(tmp_path), "DEVICE": "cpu"})
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == (f"start failed: model Qwen/Qwen-Image-Edit-2511 is not in the Hugging Face cache at "
                         f"{tmp_path}/hub; fetch it with: python tools/download_models.py --hf-home {tmp_path}, or start with DOWNLOAD_MODELS=missing")


def test_missing_layered_model_fails_the_start_when_preloaded(hf_home, tmp_path):
    done = start({"HF_HOME": str(hf_home), "DEVICE": "cpu", "PRELOAD": "edit,layered",
                  "LAYERED_MODEL": "Qwen/Qwen-Image-Layered-Missing"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(
        "start failed: model Qwen/Qwen-Image-Layered-Missing is not in the Hugging Face cache")


@pytest.mark.parametrize("env, line", [
    ({"PRESIGN_EXPIRY_S": "two hours"}, "start failed: PRESIGN_EXPIRY_S: 'two hours' is not an integer"),
    ({"JOB_TIMEOUT_S": "-5"}, "start failed: JOB_TIMEOUT_S: -5 is out of range; allowed: 0 to 86400"),
    ({"UPLOAD_ATTEMPTS": "many"}, "start failed: UPLOAD_ATTEMPTS: 'many' is not an integer"),
    ({"QUANTIZE": "int4"}, "start failed: QUANTIZE: 'int4' is not allowed; allowed: none, fp8"),
    ({"QUANTIZE": "fp8", "MEMORY_MODE": "offload"},
     "start failed: MEMORY_MODE: offload cannot be used with QUANTIZE=fp8 (FP8 needs the transformer resident on "
     "the GPU); drop one of them"),
    ({"MEMORY_MODE": "tiny"},
     "start failed: MEMORY_MODE: 'tiny' is not allowed; allowed: auto, resident, text_offload, offload"),
], ids=["PRESIGN_EXPIRY_S", "JOB_TIMEOUT_S", "UPLOAD_ATTEMPTS", "QUANTIZE", "QUANTIZE_offload", "MEMORY_MODE"])
def test_bad_environment_value(hf_home, env, line):
    done = start({"HF_HOME": str(hf_home), **env})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == line


def test_corrupt_snapshot_names_the_broken_file(hf_home, tmp_path):
    """A weights file cut short (an interrupted copy onto the volume) stops the start
    with one line naming the file, and no traceback."""
    repo = "Qwen/Qwen-Image-Edit-2511"
    shutil.copytree(repo_folder(hf_home, repo), repo_folder(tmp_path, repo))
    weights = main_snapshot(tmp_path, repo) / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = start({"HF_HOME": str(tmp_path), "DEVICE": "cpu"})
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("start failed: ") and "transformer/diffusion_pytorch_model.safetensors" in last_line
    assert "Traceback" not in done.stderr
