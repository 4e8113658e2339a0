"""A job its endpoint cancels (or times out) while it runs ends before its next step.

RunPod names such jobs on a per-job stop channel, a long-poll beside the job-take URL
(runpod SDK 1.12: `rp_job.get_stop_signals`). The SDK answers a stop by cancelling the
job's asyncio task, which cannot interrupt a synchronous handler like this one: the SDK's
event loop is blocked while the job runs. So while a job runs, a thread here polls the
same channel with the SDK's own client, and the job's progress callback, which the
pipelines call between denoising steps, raises `JobStopped` once the job was named.

Invariants: the channel is polled only while a job runs; a stop naming another job is
ignored; the check reads a flag and never touches the models, so outputs are unchanged.
Without a channel (the SDK's local API server, the tests' in-process worker) nothing is
polled. `tools/local_endpoint.py` serves the channel locally; on RunPod the SDK polls it
too, so whether a stop reaches this poll there first is RunPod's choice (not tried there).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)

# Bounds one long-poll, as the SDK bounds its own (`stop_signals_fetcher_timeout`).
POLL_TIMEOUT_S = 90.0
# Between polls that came back at once or named a job, and after a failed poll: never a
# busy loop, whatever the server does.
POLL_FLOOR_S = 1.0
# Failed polls back off, doubling from POLL_FLOOR_S to this.
MAX_RETRY_S = 60.0

StopIds = Callable[[], list[str]]


class JobStopped(RuntimeError):
    """Raised between steps of a job its endpoint stopped."""


class StopChannel:
    """Polls `stop_ids` (one long-poll per call) on a thread of its own while a job runs."""

    def __init__(self, stop_ids: StopIds):
        self._stop_ids = stop_ids
        self._lock = threading.Lock()
        self._job_id: str | None = None
        self._stopped = threading.Event()
        self._job_running = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_sdk(cls) -> "StopChannel | None":
        """The channel the runpod SDK derives from RUNPOD_WEBHOOK_GET_JOB, or None when it
        derives none. The SDK is imported here, not at import time: importing it sets up
        the root logger."""
        try:
            from runpod.serverless.modules import rp_job
        except ImportError:  # started outside the SDK (tools/cuda_smoke.py on a bare GPU machine)
            return None
        return cls(_sdk_stop_ids) if rp_job._job_stop_url() else None

    @contextmanager
    def watching(self, job_id: str) -> Iterator[Callable[[], None]]:
        """While the block runs, stops naming `job_id` are heard; yields the check that
        raises `JobStopped` once one was."""
        with self._lock:
            self._job_id = job_id
            self._stopped.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="stop-channel", daemon=True)
            self._thread.start()
        self._job_running.set()
        try:
            yield self._raise_if_stopped
        finally:
            self._job_running.clear()
            with self._lock:
                self._job_id = None

    def _raise_if_stopped(self) -> None:
        if self._stopped.is_set():
            raise JobStopped("stopped: the endpoint cancelled this job or its time ran out")

    def _listen(self) -> None:
        failures = 0
        while True:
            self._job_running.wait()
            started = time.monotonic()
            try:
                job_ids = self._stop_ids()
            except asyncio.TimeoutError:  # a long-poll that heard nothing (TimeoutError from 3.11)
                continue
            except Exception as exc:  # the next poll may work; the job runs on meanwhile
                retry_s = min(POLL_FLOOR_S * 2 ** failures, MAX_RETRY_S)
                # Once per run of failures, and the type only: a client error's text carries the URL.
                log.log(logging.WARNING if failures == 0 else logging.DEBUG,
                        "stop channel: poll failed (%s); retrying in %g s", type(exc).__name__, retry_s)
                failures += 1
                time.sleep(retry_s)
                continue
            failures = 0
            with self._lock:
                if self._job_id in job_ids and not self._stopped.is_set():
                    log.info("job %s: stop received; it ends before its next step", self._job_id)
                    self._stopped.set()
            if job_ids or time.monotonic() - started < POLL_FLOOR_S:
                time.sleep(POLL_FLOOR_S)


def _sdk_stop_ids() -> list[str]:
    """One poll of the channel by the SDK's own client, on an event loop of this thread."""
    from runpod.http_client import AsyncClientSession
    from runpod.serverless.modules.rp_job import get_stop_signals

    async def poll() -> list[str]:
        async with AsyncClientSession() as session:
            return await asyncio.wait_for(get_stop_signals(session), POLL_TIMEOUT_S)

    return asyncio.run(poll())
