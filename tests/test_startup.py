"""A start that cannot serve exits non-zero with one clear line."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def start(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "handler.py"], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_missing_model_names_the_repo_and_the_cache(tmp_path):
    done = start({"HF_HOME": str(tmp_path), "DEVICE": "cpu"})
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == (f"start failed: model Qwen/Qwen-Image-Edit-2511 is not in the Hugging Face cache at "
                         f"{tmp_path}/hub; fetch it with: python tools/download_models.py --hf-home {tmp_path}")


def test_missing_layered_model_fails_the_start_when_preloaded(hf_home, tmp_path):
    done = start({"HF_HOME": str(hf_home), "DEVICE": "cpu", "PRELOAD": "edit,layered",
                  "LAYERED_MODEL": "Qwen/Qwen-Image-Layered-Missing"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(
        "start failed: model Qwen/Qwen-Image-Layered-Missing is not in the Hugging Face cache")


def test_bad_environment_value(hf_home):
    done = start({"HF_HOME": str(hf_home), "PRESIGN_EXPIRY_S": "two hours"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "start failed: PRESIGN_EXPIRY_S: 'two hours' is not an integer"
