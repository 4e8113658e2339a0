"""`make serve`: handler.py behind RunPod's endpoint API on loopback, for the official SDK,
curl or an orchestrator.

Two faces on one server. Clients use RunPod's endpoint operations under
`/v2/<any endpoint id>/`: run, runsync, status, stream, cancel, health, purge-queue
(tools/endpoint_jobs.py keeps the jobs). The worker is `python -u handler.py` exactly as
RunPod starts it: the runpod SDK's own job loop, pointed by its RUNPOD_WEBHOOK_* variables
at this server's `/worker/` routes instead of RunPod (job-take, job-done, job-stream and the
job-stop channel). So progress, errors and refresh_worker travel as they do on RunPod,
through the SDK's code, and a cancel reaches a running job through the stop channel
(src/serving/stops.py).

    python tools/local_endpoint.py --port 8000    # tiny models unless HF_HOME is set
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.endpoint_jobs import IN_QUEUE, Job, JobBook  # noqa: E402
from tools.local_stack import LOOPBACK, REPO_ROOT, free_port, start_s3  # noqa: E402

log = logging.getLogger("local_endpoint")

DEFAULT_PORT = 8000
TINY_HF_HOME = REPO_ROOT / ".cache" / "hf"
# How long the worker's job-take and stop polls are held open when there is nothing to say.
WORKER_POLL_HOLD_S = 10.0
# RunPod's /runsync waits 90 s by default; `?wait=` takes 1000 to 300000 ms.
RUNSYNC_WAIT_MS = (90_000, 1_000, 300_000)
# RunPod's bounds on `policy.executionTimeout` (5 s to 7 days).
EXECUTION_TIMEOUT_MS = (5_000, 7 * 24 * 3600 * 1000)
# RunPod's payload limits (its operation reference: 10 MB on /run, 20 MB on /runsync).
MAX_BODY_BYTES = {"run": 10 * 1000 * 1000, "runsync": 20 * 1000 * 1000}
WEBHOOK_TIMEOUT_S = 10.0
WORKER_STOP_S = 20.0
# The SDK's job loop keeps its connections for its next request, which comes only after the
# job it runs: uvicorn's default (5 s) would close them under it ("Server disconnected").
KEEP_ALIVE_S = 24 * 3600


class BadRequest(ValueError):
    """A request RunPod would refuse: answered 400 (or `status_code`) with the reason."""

    def __init__(self, reason: str, status_code: int = 400):
        super().__init__(reason)
        self.status_code = status_code


# --- the server ------------------------------------------------------------------

def build_app(book: JobBook) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        book.loop = asyncio.get_running_loop()  # where other threads hand the jobs their news
        yield

    app = FastAPI(title="Local RunPod endpoint", docs_url=None, redoc_url=None, lifespan=lifespan)

    def not_found(job_id: str) -> JSONResponse:
        return JSONResponse({"error": f"request does not exist: {job_id}"}, status_code=404)

    async def submit(request: Request, operation: str) -> Job:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES[operation]:
            raise BadRequest(f"the body is {len(raw)} bytes; RunPod takes at most {MAX_BODY_BYTES[operation]} on "
                             f"/{operation}: send large images by URL (image_url)", status_code=413)
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("the body must be JSON: {\"input\": {...}}") from None
        if not isinstance(body, dict) or "input" not in body:
            raise BadRequest("the body must be a JSON object with an \"input\" key")
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise BadRequest(f"webhook: must be a URL string, not type {type(webhook).__name__}")
        return book.submit(body["input"], webhook, execution_timeout_s(body.get("policy")))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status_code)

    # The client's side: RunPod's endpoint operations.
    @app.post("/v2/{endpoint_id}/run")
    async def run(endpoint_id: str, request: Request):
        job = await submit(request, "run")
        return {"id": job.id, "status": job.status}

    @app.post("/v2/{endpoint_id}/runsync")
    async def runsync(endpoint_id: str, request: Request, wait: int = RUNSYNC_WAIT_MS[0]):
        default_ms, low, high = RUNSYNC_WAIT_MS
        if not low <= wait <= high:
            raise BadRequest(f"wait: {wait} ms is not allowed; allowed: {low} to {high} ms (default {default_ms})")
        job = await submit(request, "runsync")
        return (await book.wait_final(job.id, wait / 1000)).body()

    @app.api_route("/v2/{endpoint_id}/status/{job_id}", methods=["GET", "POST"])
    async def status(endpoint_id: str, job_id: str):
        return book.jobs[job_id].body() if job_id in book.jobs else not_found(job_id)

    @app.api_route("/v2/{endpoint_id}/stream/{job_id}", methods=["GET", "POST"])
    async def stream(endpoint_id: str, job_id: str):
        return book.read_stream(job_id) if job_id in book.jobs else not_found(job_id)

    @app.post("/v2/{endpoint_id}/cancel/{job_id}")
    async def cancel(endpoint_id: str, job_id: str):
        if job_id not in book.jobs:
            return not_found(job_id)
        job = book.cancel(job_id)
        return {"id": job.id, "status": job.status}

    @app.get("/v2/{endpoint_id}/health")
    async def health(endpoint_id: str):
        return book.health()

    @app.post("/v2/{endpoint_id}/purge-queue")
    async def purge_queue(endpoint_id: str):
        return {"removed": book.purge(), "status": "completed"}

    # The worker's side: what the runpod SDK's job loop asks RunPod.
    @app.get("/worker/job-take/{worker_id}")
    async def job_take(worker_id: str):
        job = await book.take(worker_id, WORKER_POLL_HOLD_S)
        return Response(status_code=204) if job is None else {"id": job.id, "input": job.input}

    @app.get("/worker/job-stop/{worker_id}")
    async def job_stop(worker_id: str):
        job_ids = await book.stop_ids(WORKER_POLL_HOLD_S)
        return {"jobsToStop": job_ids} if job_ids else Response(status_code=204)

    @app.post("/worker/job-done/{worker_id}")
    async def job_done(worker_id: str, id: str, request: Request):
        book.report(id, json.loads(await request.body()), is_stream=False)
        return {}

    @app.post("/worker/job-stream/{worker_id}")
    async def job_stream(worker_id: str, id: str, request: Request):
        book.report(id, json.loads(await request.body()), is_stream=True)
        return {}

    @app.get("/worker/ping/{worker_id}")
    async def ping(worker_id: str):
        return {}

    book.on_finish(send_webhook)
    return app


def execution_timeout_s(policy: Any) -> float | None:
    """`policy.executionTimeout` (ms) in seconds; None: the job runs as long as it takes."""
    if policy is None:
        return None
    if not isinstance(policy, dict):
        raise BadRequest(f"policy: must be an object, not type {type(policy).__name__}")
    timeout_ms = policy.get("executionTimeout")
    if timeout_ms is None:
        return None
    low, high = EXECUTION_TIMEOUT_MS
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or not low <= timeout_ms <= high:
        plain = isinstance(timeout_ms, (int, float)) and abs(timeout_ms) < 10**15  # a 5000-digit one stays out
        shown = repr(timeout_ms) if plain else f"a value of type {type(timeout_ms).__name__}"
        raise BadRequest(f"policy.executionTimeout: {shown} is not allowed; allowed: {low} to {high} ms (an integer)")
    return timeout_ms / 1000


def send_webhook(job: Job) -> None:
    """RunPod POSTs a finished job's status to its webhook; here too, from a thread."""
    if job.webhook is None or job.status == IN_QUEUE:
        return

    def post(url: str, body: dict) -> None:
        try:
            requests.post(url, json=body, timeout=WEBHOOK_TIMEOUT_S)
        except requests.RequestException as exc:
            log.warning("job %s: webhook failed: %s", body["id"], type(exc).__name__)

    threading.Thread(target=post, args=(job.webhook, job.body()), daemon=True).start()


# --- the server and the worker as processes ------------------------------------

@dataclass
class LocalEndpoint:
    url: str  # http://127.0.0.1:<port>; the SDK's endpoint_url_base is url + "/v2"
    book: JobBook
    server: uvicorn.Server
    thread: threading.Thread
    worker: subprocess.Popen
    log_path: Path | None
    stopping: bool = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        self.stopping = True
        self.worker.terminate()  # the SDK's job loop ends on SIGTERM
        try:
            self.worker.wait(timeout=WORKER_STOP_S)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        self.server.should_exit = True
        self.thread.join()


def worker_env(url: str) -> dict[str, str]:
    """The variables RunPod gives a worker, pointing the runpod SDK's job loop here."""
    return {
        "RUNPOD_POD_ID": "local-worker",
        "RUNPOD_WEBHOOK_GET_JOB": f"{url}/worker/job-take/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{url}/worker/job-done/$RUNPOD_POD_ID?id=$ID",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{url}/worker/job-stream/$RUNPOD_POD_ID?id=$ID",
        "RUNPOD_WEBHOOK_PING": f"{url}/worker/ping/$RUNPOD_POD_ID",
        # Its start-up checks of disk, memory and the internet are about RunPod's machines.
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
    }


def start_endpoint(env: dict[str, str], log_path: Path | None = None, port: int | None = None,
                   wait_ready_s: float | None = 300) -> LocalEndpoint:
    """The server on 127.0.0.1:`port`, then handler.py with `env` added to this environment,
    its output to `log_path` (or this process's). With `wait_ready_s`, returns once the
    worker asks for its first job (it loads and warms up first)."""
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    book = JobBook()
    server = uvicorn.Server(uvicorn.Config(build_app(book), host=LOOPBACK, port=port, log_level="warning",
                                           timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name="local-endpoint", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the endpoint could not listen on {url}")
        time.sleep(0.05)
    output = open(log_path, "wb") if log_path else None
    try:
        worker = subprocess.Popen([sys.executable, "-u", "handler.py"], cwd=REPO_ROOT,
                                  env={**os.environ, **env, **worker_env(url)},
                                  stdout=output, stderr=subprocess.STDOUT if output else None)
    finally:
        if output:
            output.close()
    endpoint = LocalEndpoint(url, book, server, thread, worker, log_path)
    threading.Thread(target=_watch_worker, args=(endpoint,), name="worker-watch", daemon=True).start()
    if wait_ready_s is None:
        return endpoint
    deadline = time.monotonic() + wait_ready_s
    while not book.worker_ready:
        if worker.poll() is not None or time.monotonic() > deadline:
            endpoint.stop()
            state = f"exited with {worker.returncode}" if worker.returncode is not None else "not ready"
            raise RuntimeError(f"worker {state} after {wait_ready_s:g} s at most:\n{endpoint.log()[-3000:]}")
        time.sleep(0.2)
    return endpoint


def _watch_worker(endpoint: LocalEndpoint) -> None:
    """The worker's end fails the job it held (on the server's loop, where the jobs live)."""
    returncode = endpoint.worker.wait()
    if not endpoint.stopping:
        log.error("the worker exited with code %s", returncode)
        endpoint.book.loop.call_soon_threadsafe(endpoint.book.worker_gone, returncode)


# --- make serve -----------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or DEFAULT_PORT))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    env: dict[str, str] = {}
    if "HF_HOME" not in os.environ:
        env.update(HF_HOME=str(TINY_HF_HOME), DEVICE=os.environ.get("DEVICE", "cpu"))
        print(f"HF_HOME is not set: serving the TINY RANDOM models in {TINY_HF_HOME} (their images are noise)")
    s3 = None
    if "BUCKET_ENDPOINT_URL" not in os.environ:
        s3 = start_s3()
        env.update(s3.env())
        print(f"results go to a loopback S3 at {s3.endpoint_url}, bucket {s3.bucket}")
    # SIGTERM (a supervisor, `kill`) stops the worker and the S3 too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    endpoint = start_endpoint(env, port=args.port, wait_ready_s=None)
    print(f"RunPod's endpoint API at {endpoint.url}/v2/<any endpoint id>/ "
          f"(runpod SDK: runpod.endpoint_url_base = \"{endpoint.url}/v2\"); jobs queue while the worker starts",
          flush=True)
    try:
        returncode = endpoint.worker.wait()
        print(f"the worker exited with code {returncode}", file=sys.stderr)
    except KeyboardInterrupt:
        returncode = 0
    finally:
        endpoint.stop()
        if s3:
            s3.stop()
    sys.exit(returncode)


if __name__ == "__main__":
    main()
