"""The jobs of the local endpoint (tools/local_endpoint.py): RunPod's job states, one queue,
one worker.

A job is IN_QUEUE until the worker takes it, IN_PROGRESS until the worker reports it, then
COMPLETED or FAILED; CANCELLED when cancelled (or purged from the queue); TIMED_OUT when it
runs past its `policy.executionTimeout`. A job cancelled or timed out while it runs is
named on the stop channel until the worker reports it; whatever the worker reports for it
then is dropped, as RunPod drops it. The worker takes one job at a time, in order.

Everything here runs on the server's event loop: no locks, and every change wakes the
requests held open for one (`_changed`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("local_endpoint")

IN_QUEUE, IN_PROGRESS = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED, TIMED_OUT = "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"
FINAL = (COMPLETED, FAILED, CANCELLED, TIMED_OUT)


@dataclass
class Job:
    id: str
    input: Any
    webhook: str | None = None
    execution_timeout_s: float | None = None
    status: str = IN_QUEUE
    output: Any = None  # the result; while IN_PROGRESS, the latest progress update
    error: str | None = None
    worker_id: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    stream: list[dict] = field(default_factory=list)  # chunks not yet read from /stream
    streamed: bool = False  # the handler streamed chunks of its own (a generator handler)

    def body(self) -> dict:
        """The job as RunPod's /status answers it."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = round((self.started - self.submitted) * 1000)
            body["workerId"] = self.worker_id
        if self.ended is not None and self.started is not None:
            body["executionTime"] = round((self.ended - self.started) * 1000)
        if self.output is not None and self.status in (IN_PROGRESS, COMPLETED, FAILED):
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class JobBook:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.stopping: set[str] = set()  # cancelled or timed out while the worker runs them
        self.running: str | None = None  # the job the worker holds, until it reports it
        self.worker_ready = False  # the worker has asked for a job: loaded and warmed up
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set as it starts
        self._changed = asyncio.Event()
        self._finished: list = []  # callbacks on each job that reaches a final state

    # --- the client's side -------------------------------------------------
    def submit(self, job_input: Any, webhook: str | None = None, execution_timeout_s: float | None = None) -> Job:
        job = Job(id=str(uuid.uuid4()), input=job_input, webhook=webhook, execution_timeout_s=execution_timeout_s)
        self.jobs[job.id] = job
        self.queue.append(job.id)
        log.info("job %s: %s", job.id, IN_QUEUE)
        self._change()
        return job

    async def wait_final(self, job_id: str, wait_s: float) -> Job:
        job = self.jobs[job_id]
        await self._wait_until(lambda: job.status in FINAL, wait_s)
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        if job.status == IN_QUEUE:
            self.queue.remove(job_id)
            self._finish(job, CANCELLED)
        elif job.status == IN_PROGRESS:
            self.stopping.add(job_id)
            self._finish(job, CANCELLED)
        return job

    def purge(self) -> int:
        removed = list(self.queue)
        self.queue.clear()
        for job_id in removed:
            self._finish(self.jobs[job_id], CANCELLED)
        return len(removed)

    def read_stream(self, job_id: str) -> dict:
        job = self.jobs[job_id]
        chunks, job.stream = job.stream, []
        return {"id": job.id, "status": job.status, "stream": chunks}

    def health(self) -> dict:
        counts = {status: 0 for status in (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED)}
        for job in self.jobs.values():
            if job.status in counts:
                counts[job.status] += 1
        busy = self.running is not None
        return {"jobs": {"completed": counts[COMPLETED], "failed": counts[FAILED], "inProgress": counts[IN_PROGRESS],
                         "inQueue": counts[IN_QUEUE], "retried": 0},
                "workers": {"idle": int(self.worker_ready and not busy), "running": int(busy)}}

    # --- the worker's side (the runpod SDK's job loop) ---------------------
    async def take(self, worker_id: str, hold_s: float) -> Job | None:
        """The next queued job for the worker, waiting up to `hold_s` for one."""
        self.worker_ready = True
        if self.running is not None:  # it asks again only once done with its last job, reported or not
            self.stopping.discard(self.running)
            self.running = None
        self._change()  # /health reads the worker as ready from its first poll on
        await self._wait_until(lambda: bool(self.queue), hold_s)
        if not self.queue:
            return None
        job = self.jobs[self.queue.popleft()]
        job.status, job.started, job.worker_id = IN_PROGRESS, time.monotonic(), worker_id
        self.running = job.id
        if job.execution_timeout_s is not None:
            asyncio.get_running_loop().call_later(job.execution_timeout_s, self._time_out, job)
        log.info("job %s: %s on worker %s", job.id, IN_PROGRESS, worker_id)
        self._change()
        return job

    async def stop_ids(self, hold_s: float) -> list[str]:
        await self._wait_until(lambda: bool(self.stopping), hold_s)
        return sorted(self.stopping)

    def report(self, job_id: str, data: dict, is_stream: bool) -> None:
        """A POST of the SDK's job loop: a progress update, a streamed chunk or the result."""
        job = self.jobs.get(job_id)
        if job is None:
            log.warning("the worker reported job %s, which this endpoint never gave it", job_id)
            return
        final = not is_stream and data.get("status") != IN_PROGRESS
        if final:
            self.stopping.discard(job_id)
            if self.running == job_id:
                self.running = None
        if job.status != IN_PROGRESS:  # cancelled or timed out meanwhile: dropped, as RunPod drops it
            if final:
                log.info("job %s: the worker ended it (%s); it stays %s", job_id,
                         data.get("error") or "completed", job.status)
            self._change()
            return
        if is_stream:
            job.streamed = True
            job.stream.append({"output": data.get("output")})
        elif not final:
            job.output = data.get("output")
            job.stream.append({"output": job.output})
        elif data.get("error"):
            job.output = data.get("output")
            job.error = str(data["error"])
            self._finish(job, FAILED)
        else:
            job.output = data.get("output")
            if not job.streamed:
                job.stream.append({"output": job.output})
            self._finish(job, COMPLETED)
        self._change()

    def worker_gone(self, returncode: int | None) -> None:
        """The worker process ended: the job it held fails, and no worker is ready."""
        self.worker_ready = False
        if self.running is not None:
            job = self.jobs[self.running]
            self.running = None
            self.stopping.discard(job.id)
            if job.status == IN_PROGRESS:
                job.error = f"worker: the worker process exited with code {returncode}; see its log"
                self._finish(job, FAILED)
        self._change()

    # --- within --------------------------------------------------------------
    def on_finish(self, callback) -> None:
        self._finished.append(callback)

    def _time_out(self, job: Job) -> None:
        if job.status == IN_PROGRESS:
            self.stopping.add(job.id)
            self._finish(job, TIMED_OUT)

    def _finish(self, job: Job, status: str) -> None:
        job.status = status
        job.ended = time.monotonic()
        log.info("job %s: %s%s", job.id, status, f": {job.error}" if job.error else "")
        for callback in self._finished:
            callback(job)
        self._change()

    def _change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, ready, hold_s: float) -> None:
        deadline = time.monotonic() + hold_s
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return
