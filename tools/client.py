"""Shared parts of the command-line clients: submit a job, wait for it, save and print the result.

Two targets:
  * a local worker started with `python handler.py --rp_serve_api --rp_api_port N`: the runpod
    SDK's development server answers POST /runsync with the finished job in one response
    ({"id", "status", "output"} or {"id", "status": "FAILED", "error"});
  * a deployed RunPod endpoint: POST https://api.runpod.ai/v2/{id}/run, then GET /status/{job_id}
    until the job ends. While it runs, `output` carries the worker's progress_update payload
    ({"step": i, "of": n}).

Never prints request payloads: image base64 stays out of the terminal.
No torch here: the clients run on any machine with `requests`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests

RUNPOD_API_URL = "https://api.runpod.ai/v2"
API_KEY_ENV = "RUNPOD_API_KEY"
TERMINAL_STATUSES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
# RunPod refuses bigger request bodies: 10 MB on /run (20 MB on /runsync).
RUN_MAX_REQUEST_BYTES = 10_000_000
DEFAULT_TIMEOUT_S = 900
DEFAULT_POLL_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 10
STATUS_REQUEST_TIMEOUT_S = 30
DOWNLOAD_TIMEOUT_S = 120
DEFAULT_OUT_DIR = "outputs"

Printer = Callable[[str], None]


class JobError(RuntimeError):
    """The job could not be submitted, failed, or did not finish in time. The message is
    meant for the terminal as is."""


@dataclass(frozen=True)
class Target:
    """Where jobs go: a local development server (`url`) or a RunPod endpoint (`endpoint_id`)."""

    url: str | None = None
    endpoint_id: str | None = None
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S

    @property
    def label(self) -> str:
        return self.url if self.url else f"RunPod endpoint {self.endpoint_id}"


@dataclass(frozen=True)
class JobResult:
    job_id: str
    output: dict
    delay_ms: float | None = None       # time in RunPod's queue
    execution_ms: float | None = None   # time on the worker, as RunPod measured it


# --------------------------------------------------------------------------- arguments
def add_target_args(parser: argparse.ArgumentParser) -> None:
    """--url / --endpoint-id (one of them), --timeout, --poll-interval, --out."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="local worker API, e.g. http://127.0.0.1:8000 "
                       "(python handler.py --rp_serve_api --rp_api_port 8000); uses /runsync")
    where.add_argument("--endpoint-id", help=f"RunPod serverless endpoint id; needs {API_KEY_ENV} in the environment")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"give up (and cancel a RunPod job) after this long; default {DEFAULT_TIMEOUT_S}")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S, metavar="SECONDS",
                        help=f"RunPod status polling interval; default {DEFAULT_POLL_INTERVAL_S}")
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR",
                        help=f"folder for the saved images; default ./{DEFAULT_OUT_DIR}")


def target_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Target:
    """The Target the parsed arguments ask for; JobError if the API key is missing."""
    env = os.environ if env is None else env
    if args.timeout <= 0:
        raise JobError(f"--timeout: must be positive, got {args.timeout}")
    if args.poll_interval <= 0:
        raise JobError(f"--poll-interval: must be positive, got {args.poll_interval}")
    if args.url:
        return Target(url=args.url.rstrip("/"), timeout_s=args.timeout, poll_interval_s=args.poll_interval)
    api_key = env.get(API_KEY_ENV, "").strip()
    if not api_key:
        raise JobError(f"--endpoint-id needs the {API_KEY_ENV} environment variable (a RunPod API key)")
    return Target(endpoint_id=args.endpoint_id, api_key=api_key,
                  timeout_s=args.timeout, poll_interval_s=args.poll_interval)


def encode_file(path: str | Path) -> str:
    """Raw base64 of a file's bytes (no data-URI prefix)."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"--image: {path} is not a file")
    return base64.b64encode(path.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------- submit and wait
def run_job(payload: dict, target: Target, log: Printer = print) -> JobResult:
    """Send `{"input": payload}` to the target and return the finished job's output.
    Raises JobError when the job fails, is cancelled, times out, or the output holds `error`."""
    body = json.dumps({"input": payload})
    if target.url:
        result = _run_local(body, target, log)
    else:
        result = _run_remote(body, target, log)
    if isinstance(result.output, dict) and result.output.get("error"):
        raise JobError(f"job {result.job_id} failed: {_error_text(result.output['error'])}")
    if not isinstance(result.output, dict):
        raise JobError(f"job {result.job_id}: expected a JSON object as output, got {type(result.output).__name__}")
    return result


def _run_local(body: str, target: Target, log: Printer) -> JobResult:
    url = f"{target.url}/runsync"
    log(f"POST {url}  ({_megabytes(len(body))} request)")
    started = time.monotonic()
    try:
        response = requests.post(url, data=body, headers={"Content-Type": "application/json"},
                                 timeout=(CONNECT_TIMEOUT_S, target.timeout_s))
    except requests.Timeout:
        raise JobError(f"no answer from {url} within {target.timeout_s:g} s (--timeout)") from None
    except requests.ConnectionError as exc:
        raise JobError(f"cannot reach {url}: is the worker running with --rp_serve_api? "
                       f"({exc.__class__.__name__})") from None
    job = _json_or_raise(response, url)
    job_id = str(job.get("id") or "")
    status = job.get("status")
    log(f"{status} {job_id} after {time.monotonic() - started:.1f} s")
    if status != "COMPLETED":
        raise JobError(f"job {job_id or '?'} {status}: {_error_text(job.get('error'))}")
    return JobResult(job_id=job_id, output=job.get("output"))


def _run_remote(body: str, target: Target, log: Printer) -> JobResult:
    if len(body) > RUN_MAX_REQUEST_BYTES:
        raise JobError(f"request is {_megabytes(len(body))}; RunPod's /run accepts at most "
                       f"{_megabytes(RUN_MAX_REQUEST_BYTES)}: use smaller or JPEG/WEBP input images")
    base = f"{RUNPOD_API_URL}/{target.endpoint_id}"
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"})

    try:
        response = session.post(f"{base}/run", data=body, timeout=(CONNECT_TIMEOUT_S, STATUS_REQUEST_TIMEOUT_S))
    except requests.RequestException as exc:
        raise JobError(f"cannot submit to {base}/run: {exc.__class__.__name__}") from None
    job = _json_or_raise(response, f"{base}/run")
    job_id = job.get("id")
    if not job_id:
        raise JobError(f"{base}/run answered without a job id: {_short(job)}")
    log(f"submitted job {job_id} ({_megabytes(len(body))} request) to endpoint {target.endpoint_id}")

    started = time.monotonic()
    last_line = None
    while True:
        elapsed = time.monotonic() - started
        if elapsed > target.timeout_s:
            _cancel(session, base, job_id, log)
            raise JobError(f"job {job_id} did not finish within {target.timeout_s:g} s (--timeout); cancelled")
        job = _poll_status(session, f"{base}/status/{job_id}", log)
        if job is not None:
            status = job.get("status", "?")
            line = f"{status}{_progress_text(job.get('output')) if status == 'IN_PROGRESS' else ''}"
            if line != last_line:
                log(f"[{elapsed:6.1f} s] {line}")
                last_line = line
            if status in TERMINAL_STATUSES:
                break
        time.sleep(target.poll_interval_s)

    if status != "COMPLETED":
        raise JobError(f"job {job_id} {status}: {_error_text(job.get('error') or job.get('output'))}")
    return JobResult(job_id=job_id, output=job.get("output"),
                     delay_ms=job.get("delayTime"), execution_ms=job.get("executionTime"))


def _poll_status(session: requests.Session, url: str, log: Printer) -> dict | None:
    """One status request. Network errors and 5xx answers are retried by the caller's loop;
    4xx answers (bad key, unknown job) end the wait."""
    try:
        response = session.get(url, timeout=(CONNECT_TIMEOUT_S, STATUS_REQUEST_TIMEOUT_S))
    except requests.RequestException as exc:
        log(f"status request failed ({exc.__class__.__name__}); retrying")
        return None
    if response.status_code >= 500:
        log(f"status request answered HTTP {response.status_code}; retrying")
        return None
    return _json_or_raise(response, url)


def _cancel(session: requests.Session, base: str, job_id: str, log: Printer) -> None:
    try:
        session.post(f"{base}/cancel/{job_id}", timeout=(CONNECT_TIMEOUT_S, STATUS_REQUEST_TIMEOUT_S))
    except requests.RequestException as exc:
        log(f"could not cancel job {job_id} ({exc.__class__.__name__}); cancel it in the RunPod console")


def _json_or_raise(response: requests.Response, url: str) -> dict:
    if response.status_code == 401:
        raise JobError(f"{url}: HTTP 401 unauthorized; check {API_KEY_ENV}")
    if response.status_code >= 400:
        raise JobError(f"{url}: HTTP {response.status_code}: {_short(response.text)}")
    try:
        data = response.json()
    except ValueError:
        raise JobError(f"{url}: answer is not JSON: {_short(response.text)}") from None
    if not isinstance(data, dict):
        raise JobError(f"{url}: expected a JSON object, got {_short(data)}")
    return data


def _progress_text(output: Any) -> str:
    if isinstance(output, dict) and "step" in output and "of" in output:
        return f"  step {output['step']}/{output['of']}"
    return ""


def _error_text(error: Any) -> str:
    """The worker's `{"error": "..."}`, or the runpod SDK's JSON-encoded exception report
    (error_type, error_message, error_traceback), as one readable line."""
    if error is None:
        return "no error message"
    if isinstance(error, dict) and "error" in error:
        error = error["error"]
    if isinstance(error, str):
        try:
            decoded = json.loads(error)
        except ValueError:
            return error
        error = decoded
    if isinstance(error, dict) and "error_message" in error:
        kind = str(error.get("error_type", "")).removeprefix("<class '").removesuffix("'>")
        return f"{kind}: {error['error_message']}" if kind else str(error["error_message"])
    return _short(error)


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# --------------------------------------------------------------------------- save
def file_stem(job_id: str | None) -> str:
    """The job id made safe for a file name, or a timestamp when there is none."""
    if job_id:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", job_id)
    return time.strftime("%Y%m%d-%H%M%S")


def image_bytes(entry: dict) -> bytes:
    """An output image entry's bytes: from `base64` when present, else downloaded from `url`."""
    if entry.get("base64"):
        try:
            return base64.b64decode(entry["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise JobError("an output image's base64 does not decode") from None
    url = entry.get("url")
    if not url:
        raise JobError(f"output image {entry.get('key') or ''} has neither base64 nor url")
    try:
        response = requests.get(url, timeout=(CONNECT_TIMEOUT_S, DOWNLOAD_TIMEOUT_S))
    except requests.RequestException as exc:
        raise JobError(f"download of {entry.get('key') or 'an output image'} failed: "
                       f"{exc.__class__.__name__}") from None
    if response.status_code != 200:
        raise JobError(f"download of {entry.get('key') or 'an output image'} failed: HTTP {response.status_code}")
    return response.content


def save_image(entry: dict, out_dir: Path, name: str, log: Printer = print) -> Path:
    """Write one image entry to `out_dir/<name>.<format>` and return the path."""
    data = image_bytes(entry)
    expected = entry.get("bytes")
    if isinstance(expected, int) and expected != len(data):
        log(f"warning: {name}: got {len(data)} bytes, the worker reported {expected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{entry.get('format') or 'png'}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- print
# The worker's stages in the order they run; any other stage is listed after total.
TIMING_ORDER = ("load", "lora_resolve", "lora", "decode", "inference", "composite", "encode", "archive", "upload",
                "total")


def format_ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def format_timings(timings: dict | None) -> str:
    if not timings:
        return "-"
    names = [n for n in TIMING_ORDER if n in timings] + [n for n in timings if n not in TIMING_ORDER]
    return " | ".join(f"{n} {format_ms(float(timings[n]))}" for n in names if isinstance(timings[n], (int, float)))


def format_cost(output: dict) -> str:
    cost = output.get("cost") or {}
    usd = cost.get("usd", output.get("cost_usd"))
    if usd is None:
        return "-"
    text = f"${usd:.6f}"
    if cost.get("gpu"):
        text += f"  ({cost['gpu']}"
        if cost.get("seconds") is not None:
            text += f", {cost['seconds']:.2f} s"
        if cost.get("usd_per_hour"):
            text += f" at ${cost['usd_per_hour']:.3f}/h"
        text += ")"
    return text


def describe_image(entry: dict) -> str:
    size = f"{entry.get('width')}x{entry.get('height')}" if entry.get("width") else ""
    nbytes = _size_text(entry["bytes"]) if isinstance(entry.get("bytes"), int) else ""
    return " ".join(part for part in (size, entry.get("format") or "", nbytes) if part)


LABEL_WIDTH = 10


def _line(label: str, text: str) -> str:
    # A label longer than the column still gets a space before its text.
    return f"{label:<{LABEL_WIDTH - 1}} {text}"


def print_header(result: JobResult, log: Printer = print) -> None:
    out = result.output
    log(_line("job", f"{result.job_id or '-'}  operation {out.get('operation', '-')}  seed {out.get('seed', '-')}"))
    ran = settings_text(out)
    if ran:
        log(_line("ran", ran))


def settings_text(output: dict) -> str:
    """The settings the worker reports it ran with, as one line: the worker's defaults
    for what the job left out."""
    parts = []
    if "num_inference_steps" in output:
        parts.append(f"{output['num_inference_steps']} steps")
    if "true_cfg_scale" in output:
        parts.append(f"cfg {output['true_cfg_scale']}")
    if isinstance(output.get("lightning"), dict):
        parts.append(f"lightning {output['lightning'].get('steps')}")
    for lora in output.get("loras") or []:
        parts.append(f"lora {lora.get('source')} x{lora.get('scale')}")
    if "cfg_normalize" in output:
        parts.append(f"cfg_normalize {str(output['cfg_normalize']).lower()}")
    if output.get("matte"):
        parts.append(f"matte {output['matte']}")
    return ", ".join(parts)


def print_footer(result: JobResult, log: Printer = print) -> None:
    out = result.output
    log(_line("timings", format_timings(out.get("timings_ms"))))
    if result.delay_ms is not None or result.execution_ms is not None:
        parts = []
        if result.delay_ms is not None:
            parts.append(f"queue {format_ms(float(result.delay_ms))}")
        if result.execution_ms is not None:
            parts.append(f"execution {format_ms(float(result.execution_ms))}")
        log(_line("runpod", " | ".join(parts)))
    log(_line("cost", format_cost(out)))


def print_saved(label: str, path: Path, entry: dict, log: Printer = print) -> None:
    log(_line(label, f"{path}  {describe_image(entry)}"))
    if entry.get("url"):
        log(_line("", entry["url"]))


# --------------------------------------------------------------------------- entry point helpers
def send_and_save(args: argparse.Namespace, build_payload: Callable[[argparse.Namespace], dict],
                  describe: Callable[[argparse.Namespace], str], save: Callable[[JobResult], object]) -> int:
    """A client's job from its parsed arguments: sent to the target they name with one line on
    what it is, then the result's header, what `save` writes, and its footer."""
    target = target_from_args(args)
    payload = build_payload(args)
    print(f"{payload['operation']}: {describe(args)} -> {target.label}")
    result = run_job(payload, target)
    print_header(result)
    save(result)
    print_footer(result)
    return 0


def run_cli(main: Callable[[], int]) -> None:
    """Run a client's main(): JobError prints one line and exits 1; Ctrl-C exits 130."""
    try:
        code = main()
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _size_text(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.0f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _megabytes(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"
