"""One job across several GPUs: diffusers' context parallelism (Ulysses attention over NCCL),
one process per GPU, each holding the whole pipeline and 1/N of the transformer's tokens.

`PARALLEL` (`off` by default, `auto`, or a number of ranks) decides. The process RunPod starts
is rank 0: it spawns the others, checks each job (`parse_request`) and draws its seed, so a bad
input never reaches another rank; it broadcasts the job on a gloo control group, every rank runs
`Worker.handle`, and only rank 0 stores and answers.

Invariant: no rank waits for a collective another rank will never join. Before each transformer
call the ranks vote; a rank whose part failed votes "done", the others stop with `PeerFailed`,
and rank 0 answers with the real error. The start (load, then warm-up) uses the same lockstep.
Outputs equal one GPU's up to rounding (docs: README "Several GPUs"). Not covered: a failure
inside a transformer call, or a `JOB_TIMEOUT_S` stop, leaves the others in NCCL until
`COLLECTIVE_TIMEOUT` (the worker is replaced); S3 LoRA sources fail on ranks without a bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from src.job.schema import InputError, SEED_LIMIT, parse_request
from src.models.files.early_read import EarlyRead
from src.plumbing.config import ConfigError, Settings
from src.serving.startup import start_worker, warm_up

log = logging.getLogger(__name__)

# A collective inside a job (Ulysses all-to-all, a vote) that waits this long means a
# rank is lost: NCCL then tears the process down and RunPod replaces the worker.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The other ranks wait on the control group for the next job for as long as the worker
# sits idle. A rank that dies closes its sockets, so the others fail at once anyway.
IDLE_TIMEOUT = timedelta(days=30)
LOOPBACK = "127.0.0.1"
# The device README's NCCL rule: NVLink multicast (NVLS) off.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}
SHUTDOWN = ("shutdown",)
# Keys of a job's input that only rank 0 acts on: the other ranks never store results.
RANK0_ONLY_KEYS = ("r2", "return_base64")


class PeerFailed(RuntimeError):
    """Raised on a rank before a transformer call that another rank will never join."""


class StartFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class ParallelPlan:
    """How many ranks, on which device type. `world_size` 1: no parallelism."""

    world_size: int = 1
    device_type: str = "cuda"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        # gloo next to NCCL: diffusers' Ulysses-anything exchanges sequence sizes over
        # gloo when the group has it, and job messages stay on the CPU.
        return "cpu:gloo,cuda:nccl" if self.device_type == "cuda" else "gloo"

    @classmethod
    def for_settings(cls, settings: Settings, cuda_devices: int) -> "ParallelPlan":
        """PARALLEL and DEVICE (checked by Settings); `cuda_devices` is `torch.cuda.device_count()`."""
        on_cpu = settings.device == "cpu" or cuda_devices == 0
        device_type = "cpu" if on_cpu else "cuda"
        if settings.parallel == "off":
            return cls(1, device_type)
        if settings.parallel == "auto":
            return cls(1 if on_cpu else max(cuda_devices, 1), device_type)
        ranks = int(settings.parallel)
        if not on_cpu and ranks > cuda_devices:
            raise ConfigError(f"PARALLEL: {ranks} ranks but {cuda_devices} GPUs are visible")
        return cls(ranks, device_type)


# ----------------------------------------------------------------------------
# Ranks: the process group, the control group and the lockstep votes.

@dataclass
class Ranks:
    rank: int
    world_size: int
    device_type: str
    control: Any  # a gloo ProcessGroup with IDLE_TIMEOUT: jobs, votes, errors
    stopped_by_peer: bool = False

    @classmethod
    def join(cls, rank: int, plan: ParallelPlan, port: int) -> "Ranks":
        if plan.device_type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(plan.backend, init_method=f"tcp://{LOOPBACK}:{port}", rank=rank,
                                world_size=plan.world_size, timeout=COLLECTIVE_TIMEOUT)
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        return cls(rank, plan.world_size, plan.device_type, control)

    def send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> tuple:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def _vote(self, done: bool) -> int:
        """How many ranks are done with the current piece of work (this one included)."""
        count = torch.tensor([int(done)])
        dist.all_reduce(count, group=self.control)
        return int(count.item())

    def check_peers(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook on each parallel transformer: go on only if no rank is done."""
        if self._vote(done=False):
            self.stopped_by_peer = True
            raise PeerFailed("another rank's part of this job failed")

    def lockstep(self, work: Callable[[], Any],
                 error_of: Callable[[Any], str | None] = lambda result: None) -> tuple[Any, list[str | None]]:
        """Run `work` on every rank; returns its result here and every rank's error (None: fine).

        A rank that finishes, or fails, keeps voting "done" until all are: ranks still
        inside the work stop at their next transformer call (`check_peers`)."""
        self.stopped_by_peer = False
        result, error = None, None
        try:
            result = work()
            error = error_of(result)
        except Exception as exc:
            log.exception("rank %d: work failed", self.rank)
            error = f"{type(exc).__name__}: {exc}"
        while self._vote(done=True) < self.world_size:
            pass
        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error, group=self.control)
        return result, errors

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Start-up on every rank, the job loop of ranks 1..N-1, and rank 0's side.

def start_on_ranks(settings: Settings, ranks: Ranks, early_read: EarlyRead | None = None):
    """Load, parallelize and warm up, in lockstep. Raises StartFailed naming the rank.
    `early_read`: rank 0's read-ahead of the weights, begun by handler.py before the imports."""
    unwarmed = dataclasses.replace(settings, warmup=False)
    worker, errors = ranks.lockstep(lambda: start_worker(unwarmed, early_read, ranks))
    _raise_first(errors, "load")
    # Collective, so only once every rank has loaded; from here on a Layered pipeline that
    # loads during a job runs under it too, on every rank.
    worker.host.start_parallel()
    if settings.warmup:
        _, errors = ranks.lockstep(lambda: warm_up(worker))
        _raise_first(errors, "warm-up")
    return worker


def _raise_first(errors: list[str | None], stage: str) -> None:
    for rank, error in enumerate(errors):
        if error is not None:
            raise StartFailed(f"parallel {stage} failed on rank {rank}: {error}")


def follower_job(job: dict) -> dict:
    """A job as ranks 1..N-1 run it: no bucket, no inline output asked for."""
    job_input = {key: value for key, value in job["input"].items() if key not in RANK0_ONLY_KEYS}
    return {**job, "input": job_input}


def _follower_main(rank: int, plan: ParallelPlan, settings: Settings, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s",
                        force=True)  # importing runpod (handler.py, re-imported by spawn) set up logging
    os.environ.update(NCCL_ENV)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    ranks = Ranks.join(rank, plan, port)
    try:
        # The weights are read ahead once, by rank 0 (handler.py's early read, or its later
        # read-ahead): every rank's load finds them in the one page cache of this host.
        worker = start_on_ranks(dataclasses.replace(settings, bucket=None, weights_prefetch="off"), ranks)
    except StartFailed as exc:
        log.error("%s", exc)
        sys.exit(1)
    worker.stops = None  # rank 0 alone hears the endpoint's stops; its stopped job stops the others' at the next vote
    try:
        while (message := ranks.receive()) != SHUTDOWN:
            _, job = message
            ranks.lockstep(lambda: worker.handle(follower_job(job)), _error_of)
    except RuntimeError as exc:  # a collective failed: rank 0 or another rank is gone
        log.error("rank %d: lost the other ranks (%s); exiting", rank, exc)
        sys.exit(1)
    ranks.close()


def _error_of(result: dict) -> str | None:
    return result.get("error")


@dataclass
class Leader:
    """Rank 0: the worker RunPod talks to, and the processes of the other ranks."""

    worker: Any
    ranks: Ranks
    followers: list = field(default_factory=list)

    @classmethod
    def launch(cls, settings: Settings, plan: ParallelPlan, early_read: EarlyRead | None = None) -> "Leader":
        """Spawn ranks 1..N-1, join them as rank 0, and start the worker on all ranks (rank 0
        taking over `early_read`, handler.py's read-ahead of the weights)."""
        os.environ.update(NCCL_ENV)  # inherited by the spawned ranks
        port = _free_port()
        context = multiprocessing.get_context("spawn")
        followers = [context.Process(target=_follower_main, args=(rank, plan, settings, port),
                                     name=f"rank{rank}", daemon=True)
                     for rank in range(1, plan.world_size)]
        for process in followers:
            process.start()
        ranks = Ranks.join(0, plan, port)
        try:
            worker = start_on_ranks(settings, ranks, early_read)
        except StartFailed:
            _stop(followers)
            ranks.close()
            raise
        return cls(worker, ranks, followers)

    def handle(self, job: dict, progress=None) -> dict:
        progress = progress or (lambda update: None)
        job_input = job.get("input")
        # 1. Refused here, before any rank sees it.
        try:
            request = parse_request(job_input)
        except InputError as exc:
            return {"error": str(exc)}
        if request.operation == "composite":  # no model runs: rank 0 alone
            return self.worker.handle(job, progress)
        if request.seed is None:  # one seed for all ranks
            job = {**job, "input": {**job_input, "seed": secrets.randbelow(SEED_LIMIT)}}
        # 2. All ranks run it; 3. rank 0 answers, with another rank's error if that stopped it.
        try:
            self.ranks.send(("job", job))
            result, errors = self.ranks.lockstep(lambda: self.worker.handle(job, progress), _error_of)
        except RuntimeError as exc:  # a collective failed: a rank is gone
            log.error("parallel: lost contact with the other ranks: %s", exc)
            return {"error": "parallel: lost contact with another GPU's process; this worker will be replaced",
                    "refresh_worker": True}
        if "error" in result and self.ranks.stopped_by_peer:
            for rank, error in enumerate(errors[1:], start=1):
                if error and "PeerFailed" not in error:
                    return {"error": f"parallel: rank {rank}: {error}"}
        return result

    def shutdown(self, timeout_s: float = 30.0) -> list[int | None]:
        """Stop the other ranks; returns their exit codes. A rank that does not take the
        message in `timeout_s` (stuck in a collective) is terminated."""
        sender = threading.Thread(target=self._send_shutdown, name="shutdown", daemon=True)
        sender.start()
        sender.join(timeout_s)
        for process in self.followers:
            process.join(timeout_s if not sender.is_alive() else 0)
        codes = [process.exitcode for process in self.followers]
        _stop(self.followers)
        if not sender.is_alive():  # else its collective still holds the group
            self.ranks.close()
        return codes

    def _send_shutdown(self) -> None:
        try:
            self.ranks.send(SHUTDOWN)
        except RuntimeError:  # already gone
            pass


def _stop(processes: list) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]
