"""Storage that fails: a loopback S3 behind a fault-injecting proxy (tests/faulty_s3.py),
a server that is down, one that checks credentials, a bucket that does not exist.

Transient faults are retried with bounded backoff and the job succeeds; lasting ones end
in `storage: upload to bucket '<name>' failed: <reason>` within a bounded time, also
where the store answers a byte at a time (each request has a total deadline). A job
never reports success with an image missing, and never hands out a URL for an object
that did not read back whole.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import replace

import boto3
import pytest
from PIL import Image

from src.plumbing.config import BucketConfig
from src.plumbing.storage import Bucket, StorageError, UploadPolicy
from src.plumbing.url_guard import AddressPolicy
from src.serving.worker import Worker
from tests.conftest import FAST, fetch_bytes, job_r2, png_b64, sample_image
from tests.faulty_s3 import Fault, unused_endpoint

# Short timeouts and backoff, so that lasting faults fail in seconds (as UPLOAD_TIMEOUT_S,
# UPLOAD_ATTEMPTS and UPLOAD_BACKOFF_S would set them). The timeout leaves room for a
# busy 2-core machine: a healthy loopback PUT takes milliseconds.
QUICK_UPLOADS = {"upload_attempts": 3, "upload_timeout_s": 2.0, "upload_backoff_s": 0.1}
SLOW_ANSWER_S = 5.0  # longer than the upload timeout
TRICKLE_EVERY_S = 0.05  # a byte this often: far inside any read timeout, never done in time
# Two attempts of requests that may take 2 s each, the backoff between them short.
TWO_QUICK_ATTEMPTS = UploadPolicy(attempts=2, first_backoff_s=0.1, max_backoff_s=0.1, connect_timeout_s=1.0,
                                  read_timeout_s=1.0)
SLACK_S = 0.5  # beyond the deadlines, for a busy 2-core machine


@pytest.fixture(scope="module")
def quick_worker(worker) -> Worker:
    """The session's worker, on the same loaded pipelines, with QUICK_UPLOADS."""
    return Worker(replace(worker.settings, **QUICK_UPLOADS), worker.host, worker.price, loras=worker.loras)


@pytest.fixture(scope="module")
def policy(quick_worker) -> UploadPolicy:
    return UploadPolicy.from_settings(quick_worker.settings)


def run_job(worker: Worker, r2: dict | None = None, job_id: str = "storage-job", **fields) -> tuple[dict, float]:
    job_input = {"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "make it blue", "seed": 3,
                 **FAST, **fields}
    if r2 is not None:
        job_input["r2"] = r2
    started = time.monotonic()
    out = worker.handle({"id": job_id, "input": job_input})
    return out, time.monotonic() - started


def assert_whole_images(out: dict) -> None:
    """Success means every image is at its URL, complete."""
    assert out.get("success") is True, out
    for entry in out["images"]:
        data = fetch_bytes(entry["url"]).content
        assert len(data) == entry["bytes"]
        assert Image.open(io.BytesIO(data)).size == (entry["width"], entry["height"])


def assert_storage_error(out: dict, bucket: str, reason: str) -> None:
    assert set(out) == {"error"}, out  # no success, no URL, no partial output
    assert out["error"].startswith(f"storage: upload to bucket {bucket!r} failed: {reason}"), out["error"]


def test_transient_500s_are_retried_and_the_job_succeeds(quick_worker, s3, fault_proxy, guarantee_figures):
    fault_proxy.plan(Fault.status(500), Fault.status(503, "SlowDown"))
    out, seconds = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert_whole_images(out)
    assert fault_proxy.count("PUT") == 3
    guarantee_figures["storage_two_5xx_then_ok"] = (
        f"3 PUT attempts, upload stage {out['timings_ms']['upload']:.0f} ms, job {seconds:.2f} s")


def test_lasting_500s_end_in_a_clear_error_in_bounded_time(quick_worker, s3, fault_proxy, policy, guarantee_figures):
    fault_proxy.always(Fault.status(500))
    out, seconds = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert_storage_error(out, s3.bucket, f"InternalError ({policy.attempts} attempts in ")
    assert fault_proxy.count("PUT") == policy.attempts
    assert seconds < policy.worst_case_s()
    guarantee_figures["storage_5xx_always"] = (f"error after {policy.attempts} attempts, job {seconds:.2f} s "
                                               f"(bound {policy.worst_case_s():.0f} s)")


def test_a_server_that_is_down_ends_in_a_clear_error(quick_worker, s3, policy, guarantee_figures):
    out, seconds = run_job(quick_worker, job_r2(unused_endpoint(), s3.bucket))
    assert_storage_error(out, s3.bucket, f"EndpointConnectionError ({policy.attempts} attempts in ")
    assert seconds < policy.worst_case_s()
    guarantee_figures["storage_server_down"] = f"error after {policy.attempts} attempts, job {seconds:.2f} s"


def test_slow_answers_time_out_and_are_retried(quick_worker, s3, fault_proxy):
    fault_proxy.plan(Fault.delay(SLOW_ANSWER_S))
    out, _ = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert_whole_images(out)
    assert fault_proxy.count("PUT") == 2


def test_answers_that_stay_slow_end_in_bounded_time(quick_worker, s3, fault_proxy, policy, guarantee_figures):
    """The proxy writes each object, then answers late: unconfirmed, so still an error."""
    fault_proxy.always(Fault.delay(SLOW_ANSWER_S))
    out, seconds = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert_storage_error(out, s3.bucket, f"ReadTimeoutError ({policy.attempts} attempts in ")
    assert seconds < policy.worst_case_s()
    guarantee_figures["storage_slow_always"] = (
        f"answers {SLOW_ANSWER_S:g} s late, timeout {policy.read_timeout_s:g} s: error after {policy.attempts} "
        f"attempts, job {seconds:.2f} s (bound {policy.worst_case_s():.0f} s)")


@pytest.mark.parametrize("fault", [Fault.truncate(0.5), Fault.fake_ok()], ids=["truncated body", "fake 200"])
def test_an_incomplete_upload_is_never_handed_out(quick_worker, s3, fault_proxy, policy, fault):
    # Once: the read-back catches it, the retry writes the whole object.
    fault_proxy.plan(fault)
    out, _ = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert_whole_images(out)
    assert fault_proxy.count("PUT") == 2
    # Always: an error, never a URL.
    fault_proxy.always(fault)
    out, _ = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    reason = "incomplete object" if fault.kind == "truncate" else "object missing after upload"
    assert_storage_error(out, s3.bucket, reason)
    assert f"({policy.attempts} attempts in " in out["error"]


def test_one_refused_image_fails_the_whole_job(quick_worker, s3, fault_proxy):
    """A decomposition uploads its layers and composite in parallel; one refused PUT
    means no success and no URLs, though the other objects were written."""
    fault_proxy.plan(Fault.status(403, "AccessDenied"))
    out, _ = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket), operation="decompose", layers=2,
                     num_inference_steps=2, width=None, height=None)
    assert_storage_error(out, s3.bucket, "AccessDenied")
    assert fault_proxy.count("PUT") == 3  # two layers and the composite


@pytest.mark.parametrize("key_id, secret, reason", [
    (None, "wrong-secret-value", "SignatureDoesNotMatch"),
    ("AKIAWRONGKEYID000000", "wrong-secret-value", "InvalidAccessKeyId"),
], ids=["wrong secret", "unknown key id"])
def test_wrong_credentials_fail_at_once_without_echoing_them(quick_worker, locked_s3, key_id, secret, reason):
    r2 = job_r2(locked_s3.endpoint_url, locked_s3.bucket, key_id or locked_s3.access_key_id, secret)
    out, seconds = run_job(quick_worker, r2)
    assert_storage_error(out, locked_s3.bucket, reason)
    assert "attempts in" not in out["error"]  # no retries: the answer will not change
    assert secret not in out["error"] and r2["access_key_id"] not in out["error"]


def test_right_credentials_pass_the_checking_server(quick_worker, locked_s3):
    r2 = job_r2(locked_s3.endpoint_url, locked_s3.bucket, locked_s3.access_key_id, locked_s3.secret_access_key)
    out, _ = run_job(quick_worker, r2)
    assert out.get("success") is True, out
    # Read back with a signed client: moto 5.2.5 answers presigned GETs with a 500 once
    # its credential checks are on.
    client = boto3.client("s3", endpoint_url=locked_s3.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=locked_s3.access_key_id, aws_secret_access_key=locked_s3.secret_access_key)
    stored = client.get_object(Bucket=locked_s3.bucket, Key=out["r2_key"])["Body"].read()
    assert len(stored) == out["images"][0]["bytes"]


def test_a_missing_bucket_fails_at_once(quick_worker, s3):
    out, _ = run_job(quick_worker, job_r2(s3.endpoint_url, "no-such-bucket"))
    assert_storage_error(out, "no-such-bucket", "NoSuchBucket")
    assert "attempts in" not in out["error"]  # no retries: the answer will not change


def test_keys_never_collide_across_runs_of_one_job_id(quick_worker, s3):
    """RunPod may run a job again under the same id; job ids that read alike once made
    safe for a key (`a/b`, `a_b`) must not meet either."""
    runs = [run_job(quick_worker, job_id=job_id, seed=seed)[0]
            for job_id, seed in (("same-id", 1), ("same-id", 2), ("a/b", 3), ("a_b", 4))]
    keys = [out["r2_key"] for out in runs]
    assert len(set(keys)) == len(keys), keys
    bodies = [s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read() for key in keys]
    assert [len(body) for body in bodies] == [out["images"][0]["bytes"] for out in runs]
    assert len(set(bodies)) == len(bodies)  # each run's own image, none overwritten


# --- a store that trickles: every request ends by its deadline --------------------

def bucket_behind(proxy_url: str, bucket: str, pinned: bool, policy: UploadPolicy) -> Bucket:
    """A job's bucket (pinned to the checked address) or the worker's own (not pinned)."""
    config = BucketConfig(bucket_name=bucket, access_key_id=f"trickle-{pinned}", secret_access_key="s",
                          endpoint_url=proxy_url, region="us-east-1")
    if pinned:
        return Bucket.for_job(config, 60, policy, AddressPolicy(allow_private=True))
    return Bucket(config, 60, policy)


@pytest.mark.parametrize("pinned", [True, False], ids=["job bucket", "worker's bucket"])
@pytest.mark.parametrize("method", ["PUT", "HEAD"], ids=["trickled PUT", "trickled read-back"])
def test_a_trickling_store_ends_each_request_at_its_deadline(s3, fault_proxy, pinned, method, guarantee_figures):
    fault_proxy.always(Fault.trickle(TRICKLE_EVERY_S), method=method)
    bucket = bucket_behind(fault_proxy.url, s3.bucket, pinned, TWO_QUICK_ATTEMPTS)
    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        bucket.put(f"trickle/{method}-{pinned}.png", b"p" * 5000, "image/png")
    seconds = time.monotonic() - started
    assert str(failure.value).startswith(
        f"storage: upload to bucket {s3.bucket!r} failed: no whole answer within 2 s "
        "(UPLOAD_TIMEOUT_S 1 s + 1 s to connect) (2 attempts in ")
    assert fault_proxy.count(method) == 2
    deadlines_s = 2 * TWO_QUICK_ATTEMPTS.request_timeout_s()
    assert deadlines_s <= seconds < deadlines_s + TWO_QUICK_ATTEMPTS.max_backoff_s + SLACK_S
    guarantee_figures[f"storage_trickle_{method}_{'job' if pinned else 'env'}_bucket"] = (
        f"2 attempts of 2 s requests: error after {seconds:.2f} s")
    # The store answers again: the same bucket (its clients, their pools) uploads at once.
    fault_proxy.always(None, method=method)
    stored = bucket.put(f"trickle/{method}-{pinned}-after.png", b"q" * 5000, "image/png")
    assert fetch_bytes(stored.url).content == b"q" * 5000


def test_a_trickled_upload_fails_the_job_with_the_time_limit(quick_worker, s3, fault_proxy):
    worker = Worker(replace(quick_worker.settings, upload_attempts=1), quick_worker.host, quick_worker.price,
                    loras=quick_worker.loras)
    fault_proxy.always(Fault.trickle(TRICKLE_EVERY_S))
    out, _ = run_job(worker, job_r2(fault_proxy.url, s3.bucket))
    assert_storage_error(out, s3.bucket, "no whole answer within 4 s (UPLOAD_TIMEOUT_S 2 s + 2 s to connect) "
                                         "(1 attempts in ")
    upload_s = float(re.search(r"\(1 attempts in ([0-9.]+) s\)$", out["error"]).group(1))
    assert upload_s < 4 + SLACK_S


def test_a_read_back_without_length_fails_at_once_naming_it(quick_worker, s3, fault_proxy):
    fault_proxy.always(Fault.no_length(), method="HEAD")
    out, _ = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert out == {"error": f"storage: upload to bucket {s3.bucket!r} failed: the read-back HEAD answered without "
                            "a Content-Length, so the stored size cannot be checked"}
    assert fault_proxy.count("PUT") == 1  # no retries: the answer will not change


def test_a_hostile_error_code_is_cut_short(quick_worker, s3, fault_proxy):
    fault_proxy.plan(Fault.status(403, "Denied" + "y" * 5000))
    out, _ = run_job(quick_worker, job_r2(fault_proxy.url, s3.bucket))
    assert out == {"error": f"storage: upload to bucket {s3.bucket!r} failed: Denied{'y' * 58}"}
