"""`make serve`'s endpoint (tools/local_endpoint.py) driven by the official runpod SDK:
handler.py under the SDK's own job loop, RunPod's endpoint operations on loopback, results
in the loopback S3 fetched through their presigned URLs."""

from __future__ import annotations

import http.server
import json
import queue
import re
import threading
import time

import pytest
import requests
import runpod

from tests.conftest import FAST, fetch, png_b64, sample_image
from tools.local_endpoint import start_endpoint

# A job long enough to stop in its middle: the tiny models take about a second a step here.
LONG_STEPS = 100
STEPS_SEEN_S = 120


@pytest.fixture(scope="module")
def endpoint(worker_env, tmp_path_factory):
    server = start_endpoint(worker_env, tmp_path_factory.mktemp("endpoint") / "worker.log")
    saved = runpod.api_key, runpod.endpoint_url_base
    runpod.api_key, runpod.endpoint_url_base = "local", f"{server.url}/v2"
    yield server
    runpod.api_key, runpod.endpoint_url_base = saved
    server.stop()


@pytest.fixture
def sdk(endpoint) -> runpod.Endpoint:
    return runpod.Endpoint("local")


def edit_job(**extra) -> dict:
    return {"image_base64": png_b64(sample_image()), "prompt": "make it blue", "seed": 7, **FAST, **extra}


def raw_status(sdk: runpod.Endpoint, job: runpod.endpoint.runner.Job) -> dict:
    """The whole /status answer, through the SDK's own client: its Job keeps only status and output."""
    return sdk.rp_client.get(f"{sdk.endpoint_id}/status/{job.job_id}")


def wait_for_progress(sdk, job) -> dict:
    deadline = time.monotonic() + STEPS_SEEN_S
    while time.monotonic() < deadline:
        state = raw_status(sdk, job)
        if state["status"] == "IN_PROGRESS" and state.get("output"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"no progress from job {job.job_id}: {raw_status(sdk, job)}")


def test_run_sync_and_health(sdk):
    before = sdk.health()
    out = sdk.run_sync(edit_job(), timeout=600)
    assert out["success"] and out["seed"] == 7
    assert fetch(out["output_url"]).size == (256, 256)
    after = sdk.health()
    assert after["jobs"]["completed"] == before["jobs"]["completed"] + 1
    assert after["workers"] == {"idle": 1, "running": 0}


def test_run_then_status_and_output(sdk):
    job = sdk.run(edit_job(width=320, height=256))
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    out = job.output(timeout=600)
    assert job.status() == "COMPLETED"
    assert fetch(out["output_url"]).size == (320, 256)
    done = raw_status(sdk, job)
    assert done["workerId"] == "local-worker" and done["executionTime"] > 0 and done["delayTime"] >= 0


def test_stream_gives_the_progress_then_the_output(sdk):
    job = sdk.run(edit_job(num_inference_steps=3))
    chunks = list(job.stream())
    *updates, out = chunks
    assert updates and all(update["of"] == 3 for update in updates)
    # Each update is POSTed from a thread of its own: one that arrives after the result is dropped.
    steps = [update["step"] for update in updates]
    assert steps == sorted(set(steps)) and set(steps) <= {1, 2, 3}
    assert fetch(out["output_url"]).size == (256, 256)


def test_a_failed_job_carries_its_error(sdk):
    job = sdk.run(edit_job(num_inference_steps=500))
    assert job.output(timeout=600) is None  # the SDK keeps only `output`, which a FAILED job lacks
    assert job.status() == "FAILED"
    assert raw_status(sdk, job)["error"] == "num_inference_steps: input should be less than or equal to 100; got 500"
    # run_sync gives None for it, as on RunPod: the SDK returns `output` of a final state.
    assert sdk.run_sync(edit_job(num_inference_steps=500), timeout=600) is None


def test_cancel_a_queued_and_a_running_job_and_purge_the_queue(sdk, endpoint):
    running = sdk.run(edit_job(num_inference_steps=LONG_STEPS))
    state = wait_for_progress(sdk, running)
    assert state["output"]["of"] == LONG_STEPS
    queued, purged_a, purged_b = (sdk.run(edit_job()) for _ in range(3))
    assert queued.cancel() == {"id": queued.job_id, "status": "CANCELLED"}
    assert sdk.health()["jobs"]["inQueue"] == 2
    assert sdk.purge_queue() == {"removed": 2, "status": "completed"}
    assert purged_a.status() == purged_b.status() == "CANCELLED"
    assert sdk.health()["workers"] == {"idle": 0, "running": 1}
    assert running.cancel() == {"id": running.job_id, "status": "CANCELLED"}
    assert running.status() == "CANCELLED"
    # The worker stops it between steps and serves the next job.
    assert fetch(sdk.run_sync(edit_job(), timeout=600)["output_url"]).size == (256, 256)
    stopped = re.search(rf"job {running.job_id} stopped: .*; stopped after step (\d+) of {LONG_STEPS}", endpoint.log())
    assert stopped and int(stopped.group(1)) < LONG_STEPS, endpoint.log()[-3000:]
    for never_run in (queued, purged_a, purged_b):
        assert never_run.job_id not in endpoint.log()


def test_a_job_past_its_execution_timeout_is_timed_out_and_stopped(sdk, endpoint):
    # 1024x1024: at 256x256 the tiny model's 100 steps can end within RunPod's shortest timeout (5 s).
    reply = requests.post(f"{endpoint.url}/v2/local/run", timeout=30, json={
        "input": edit_job(num_inference_steps=LONG_STEPS, width=1024, height=1024),
        "policy": {"executionTimeout": 5000}}).json()
    job = runpod.endpoint.runner.Job("local", reply["id"], sdk.rp_client)
    assert job.output(timeout=STEPS_SEEN_S) is None
    assert job.status() == "TIMED_OUT"
    assert fetch(sdk.run_sync(edit_job(), timeout=600)["output_url"]).size == (256, 256)
    stopped = re.search(rf"job {job.job_id} stopped: .*; stopped after step (\d+) of {LONG_STEPS}", endpoint.log())
    assert stopped and int(stopped.group(1)) < LONG_STEPS


class WebhookCatcher(http.server.BaseHTTPRequestHandler):
    bodies: queue.Queue = queue.Queue()

    def do_POST(self):
        self.bodies.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_plain_http_answers_and_the_webhook(endpoint):
    """What curl sees: GET /status, RunPod's refusals; and the finished job POSTed to its webhook."""
    catcher = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebhookCatcher)
    threading.Thread(target=catcher.serve_forever, daemon=True).start()
    base = f"{endpoint.url}/v2/any-endpoint-id"
    try:
        done = requests.post(f"{base}/runsync?wait=300000", timeout=600, json={
            "input": edit_job(), "webhook": f"http://127.0.0.1:{catcher.server_port}/done"}).json()
        assert done["status"] == "COMPLETED" and fetch(done["output"]["output_url"]).size == (256, 256)
        assert WebhookCatcher.bodies.get(timeout=30) == done
    finally:
        catcher.shutdown()
    assert requests.get(f"{base}/status/{done['id']}", timeout=10).json()["output"] == done["output"]
    assert requests.get(f"{base}/status/no-such-job", timeout=10).status_code == 404
    missing = requests.post(f"{base}/run", json={"prompt": "x"}, timeout=10)
    assert missing.status_code == 400 and "input" in missing.json()["error"]
    too_big = requests.post(f"{base}/run", json={"input": {"image_base64": "A" * 10_000_000}}, timeout=30)
    assert too_big.status_code == 413 and "RunPod takes at most 10000000 on /run" in too_big.json()["error"]
    short = requests.post(f"{base}/run", json={"input": {}, "policy": {"executionTimeout": 10}}, timeout=10)
    assert short.status_code == 400
    assert short.json()["error"] == "policy.executionTimeout: 10 is not allowed; allowed: 5000 to 604800000 ms (an integer)"
