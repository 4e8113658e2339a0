"""JOB_TIMEOUT_S through the local API on a server of its own: a runaway job ends with a
clear error soon after its deadline, and the worker serves the next job."""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import FAST, png_b64, sample_image
from tools.local_stack import start_api

# Room for an ordinary tiny job on a busy 2-core machine (a few seconds), which must pass.
JOB_TIMEOUT_S = 10
# The hooks stop a job before its next model block: on the tiny models that is
# milliseconds past the deadline; the rest is HTTP and a busy 2-core machine.
MAX_OVERSHOOT_S = 5
# 100 steps at 1024x1024 take minutes on the tiny models on a CPU.
RUNAWAY = {"num_inference_steps": 100, "width": 1024, "height": 1024}


@pytest.fixture(scope="module")
def api(worker_env, tmp_path_factory):
    server = start_api({**worker_env, "JOB_TIMEOUT_S": str(JOB_TIMEOUT_S)},
                       tmp_path_factory.mktemp("timeout-api") / "worker.log")
    yield server
    server.stop()


def runsync(api, job_input: dict) -> tuple[dict, float]:
    started = time.monotonic()
    reply = requests.post(f"{api.url}/runsync", json={"input": job_input}, timeout=120).json()
    return reply, time.monotonic() - started


def test_a_runaway_job_is_stopped_and_the_next_job_runs(api, guarantee_figures):
    image = png_b64(sample_image())
    reply, seconds = runsync(api, {"image_base64": image, "prompt": "forever", **RUNAWAY})
    assert reply["status"] == "FAILED", reply
    assert reply["error"].startswith(f"timeout: past JOB_TIMEOUT_S ({JOB_TIMEOUT_S} s); stopped after "), reply
    assert JOB_TIMEOUT_S <= seconds < JOB_TIMEOUT_S + MAX_OVERSHOOT_S
    guarantee_figures["job_timeout"] = f"JOB_TIMEOUT_S={JOB_TIMEOUT_S}: runaway job answered after {seconds:.2f} s"

    reply, _ = runsync(api, {"image_base64": image, "prompt": "next", "seed": 1, "true_cfg_scale": 1.0, **FAST})
    assert reply["status"] == "COMPLETED" and reply["output"]["success"], reply
