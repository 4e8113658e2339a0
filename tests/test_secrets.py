"""Secrets and payloads stay out of everything the worker writes: its log, job outputs
and error texts, during jobs that succeed and jobs that fail (wrong credentials, a
server that is down, a missing bucket, malformed r2 and images, presigned LoRA URLs in
entries of the wrong shape and in sources that fail), through the runpod SDK's local API
on a server of its own whose env bucket checks credentials.

The log is read at LOG_LEVEL=DEBUG, where the worker says the most (the S3 libraries are
held at INFO by handler.py, since at DEBUG they log signed headers). Access
key ids are checked in the log only: outputs carry them by design, inside presigned
URLs (X-Amz-Credential).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
import requests

from tests.conftest import FAST, REPO_ROOT, job_r2, png_b64, sample_image
from tests.faulty_s3 import unused_endpoint
from tools.local_stack import start_api

JOB_SECRET = "per-job-secret-7c1f9e2ab4d8"
# A presigned LoRA URL's signature, sent in entries of the wrong shape and in sources that fail.
LORA_SIGNATURE = "lora-signature-3d5f7a9c1e"
WRONG_SECRET = "wrong-secret-5e0b3d97a6c2"
JOB_KEY_ID = "AKIAPERJOBKEY7C1F9E2A"
FRAGMENT_CHARS = 32


@pytest.fixture(scope="module")
def api(worker_env, locked_s3, tmp_path_factory):
    env = {**worker_env, "LOG_LEVEL": "DEBUG", "UPLOAD_BACKOFF_S": "0.1",
           "BUCKET_ENDPOINT_URL": locked_s3.endpoint_url, "BUCKET_NAME": locked_s3.bucket,
           "BUCKET_ACCESS_KEY_ID": locked_s3.access_key_id, "BUCKET_SECRET_ACCESS_KEY": locked_s3.secret_access_key}
    server = start_api(env, tmp_path_factory.mktemp("secrets-api") / "worker.log")
    yield server
    server.stop()


def r2(endpoint_url: str, bucket: str, secret=JOB_SECRET, key_id: str = JOB_KEY_ID) -> dict:
    return job_r2(endpoint_url, bucket, key_id, secret)


def fragments(payload: str) -> list[str]:
    """Pieces from the start, middle and end: any echo of a payload contains one."""
    middle = len(payload) // 2
    return [payload[:FRAGMENT_CHARS], payload[middle:middle + FRAGMENT_CHARS], payload[-FRAGMENT_CHARS:]]


def test_no_secret_or_payload_in_the_log_outputs_or_errors(api, s3, locked_s3):
    image = png_b64(sample_image(seed=9))
    broken = base64.b64encode(base64.b64decode(image)[:-40]).decode()  # a PNG cut short
    job = {"operation": "edit", "image_base64": image, "prompt": "x", "seed": 1, "return_base64": True, **FAST}
    locked = (locked_s3.endpoint_url, locked_s3.bucket)
    presigned = f"{s3.endpoint_url}/{s3.bucket}/no-such-lora.safetensors?X-Amz-Signature={LORA_SIGNATURE}"
    jobs = {
        "env bucket": ({**job}, "COMPLETED"),
        "own bucket": ({**job, "r2": r2(s3.endpoint_url, s3.bucket)}, "COMPLETED"),
        "own bucket, wrong secret": ({**job, "r2": r2(*locked, WRONG_SECRET, locked_s3.access_key_id)}, "FAILED"),
        "own bucket, unknown key id": ({**job, "r2": r2(*locked)}, "FAILED"),
        "own bucket, server down": ({**job, "r2": r2(unused_endpoint(), "results")}, "FAILED"),
        "own bucket missing": ({**job, "r2": r2(s3.endpoint_url, "no-such-bucket")}, "FAILED"),
        "r2 malformed": ({**job, "r2": {**r2(s3.endpoint_url, s3.bucket), "bucket_name": 5}}, "FAILED"),
        "r2 secret a number": ({**job, "r2": r2(s3.endpoint_url, s3.bucket, secret=7315009142)}, "FAILED"),
        "image cut short": ({**job, "image_base64": broken}, "FAILED"),
        "lora entry an object": ({**job, "loras": {"source": presigned}}, "FAILED"),
        "lora entry a string": ({**job, "loras": [presigned]}, "FAILED"),
        "lora scheme in capitals": ({**job, "loras": [{"source": presigned.replace("http", "HTTP", 1)}]}, "FAILED"),
        "lora url not found": ({**job, "loras": [{"source": presigned}]}, "FAILED"),
        "lora url with user info": ({**job, "loras": [{"source": presigned.replace("//", f"//u:{JOB_SECRET}@")}]},
                                    "FAILED"),
        "lora s3 key not found": ({**job, "loras": [{"source": f"s3://{s3.bucket}/none.safetensors?{LORA_SIGNATURE}"}]},
                                  "FAILED"),
    }
    written = []
    for name, (job_input, status) in jobs.items():
        reply = requests.post(f"{api.url}/runsync", json={"input": job_input}, timeout=120).json()
        assert reply["status"] == status, (name, reply)
        written.append(json.dumps(reply))
    queued = requests.post(f"{api.url}/run", json={"input": jobs["own bucket, wrong secret"][0]}, timeout=30).json()
    status = requests.post(f"{api.url}/status/{queued['id']}", timeout=120).json()
    assert status["status"] == "FAILED" and status["error"].startswith("storage: "), status
    written.append(json.dumps(status))

    outputs, log = "\n".join(written), api.log()
    assert "storage: upload to bucket" in outputs and "X-Amz-Signature" in outputs  # failures and successes seen
    assert "loras[0].source: downloading" in outputs  # a LoRA URL was fetched and failed
    secrets = [JOB_SECRET, WRONG_SECRET, "7315009142", locked_s3.secret_access_key, s3.secret_access_key,
               LORA_SIGNATURE]
    sent = fragments(image) + fragments(broken)
    returned = fragments(json.loads(written[0])["output"]["edited_image_base64"])  # inline by request
    for text, where, hidden in ((outputs, "outputs", secrets + sent), (log, "log", secrets + sent + returned)):
        leaked = [value for value in hidden if value in text]
        assert not leaked, f"{where} leaks {leaked}"
    for key_id in (JOB_KEY_ID, locked_s3.access_key_id):
        assert key_id not in log
    assert "X-Amz-Signature" not in log  # a presigned URL in the log would let its reader fetch the image


def test_a_failed_start_does_not_echo_the_bucket_secret(hf_home):
    secret = "env-secret-4b9d0c2e71f3"
    done = subprocess.run([sys.executable, "handler.py"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HOME": str(hf_home), "BUCKET_SECRET_ACCESS_KEY": secret,
                               "BUCKET_ACCESS_KEY_ID": "AKIAENVKEY"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("start failed: BUCKET_NAME must be set too")
    assert secret not in done.stdout + done.stderr
