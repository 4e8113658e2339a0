"""JOB_TIMEOUT_S: a job that runs too long ends with a clear error, and the worker takes
the next job.

A diffusers pipeline cannot be interrupted from outside, and a step callback runs only
between denoising steps, which at 2048x2048 with three images are many seconds apart.
So the check sits in forward pre-hooks on the blocks of the pipelines' models (every
transformer block, text-encoder layer and VAE block): a job past its time raises
`JobTimeout` before its next block, and overshoots by one block's compute at most.

No hook can stop a single call that never returns (a hung kernel). So the job runs on a
helper thread: if it has not ended `grace_s` after its deadline, the handler answers
with the timeout error and `refresh_worker: true`, RunPod replaces the worker, and a job
that reaches this worker meanwhile first waits for the stuck one, since two jobs must
never share the pipelines.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

# How long past its deadline a job may take to reach its next block: a generous bound on
# one block's compute. A job still inside one block after that is treated as hung.
STUCK_GRACE_S = 30.0


class JobTimeout(RuntimeError):
    """Raised on the job's thread, before its next block, once its time is up."""


@dataclass
class _Run:
    """One guarded job: its deadline, and where the hooks stopped it."""

    limit_s: float
    started: float
    stopped_at: str | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.limit_s


# The guarded job running on this thread, if any. Hooks fire on whichever thread runs a
# model; only a guarded job's thread carries a deadline (warm-up and tests do not).
_current = threading.local()


def _stop_if_late(block_name: str):
    def hook(module, args):
        run: _Run | None = getattr(_current, "run", None)
        if run is not None and time.monotonic() > run.deadline:
            run.stopped_at = run.stopped_at or block_name
            raise JobTimeout(f"timeout: past JOB_TIMEOUT_S ({run.limit_s:g} s), stopped before {block_name}")
    return hook


def blocks_of(name: str, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The model, its direct children (e.g. a VAE's encoder and decoder, whose `encode`
    and `decode` are not `forward`) and the members of its outermost ModuleLists:
    transformer blocks, text-encoder layers, VAE up and down blocks. Lists inside a block
    (its MLP's layers) are left alone: one check per block is enough."""
    yield name, model
    for child_name, child in model.named_children():
        yield f"{name}.{child_name}", child
    blocks: list[str] = []
    for list_name, module in model.named_modules():
        inside_a_block = any(list_name.startswith(block + ".") for block in blocks)
        if isinstance(module, torch.nn.ModuleList) and not inside_a_block:
            for index, block in enumerate(module):
                blocks.append(f"{list_name}.{index}")
                yield f"{name}.{list_name}.{index}", block


class JobGuard:
    """Runs each job with a deadline. `timeout_s` 0 or None: jobs run as they are."""

    def __init__(self, timeout_s: float | None, grace_s: float = STUCK_GRACE_S):
        self.timeout_s = timeout_s or None
        self.grace_s = grace_s
        self._hooked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._watched: weakref.WeakSet = weakref.WeakSet()  # pipelines already walked
        # Held by a job's thread while it runs, and so by a stuck one until it ends.
        self._pipelines_free = threading.Lock()

    def watch(self, pipeline) -> int:
        """Hook the blocks of every model in a diffusers pipeline (once each; models that
        pipelines share, like the text encoder, are hooked once). Returns how many blocks
        were newly hooked. Without a timeout there is nothing to check: no hooks at all,
        so the models run exactly as they load."""
        if self.timeout_s is None or pipeline in self._watched:
            return 0
        self._watched.add(pipeline)
        added = 0
        for component, model in pipeline.components.items():
            if not isinstance(model, torch.nn.Module):
                continue
            for name, block in blocks_of(component, model):
                if block not in self._hooked:
                    block.register_forward_pre_hook(_stop_if_late(name))
                    self._hooked.add(block)
                    added += 1
        return added

    def run(self, job: Callable[[], dict]) -> dict:
        """`job()`'s output; or, past the deadline, the timeout error."""
        if self.timeout_s is None:
            return job()
        if not self._pipelines_free.acquire(timeout=self.timeout_s):
            return {"error": "timeout: an earlier job is still stuck on this worker's pipelines; "
                             "this worker will be replaced", "refresh_worker": True}
        run = _Run(limit_s=self.timeout_s, started=time.monotonic())
        outcome: dict = {}
        thread = threading.Thread(target=self._run_on_thread, args=(job, run, outcome), name="job", daemon=True)
        thread.start()
        thread.join(self.timeout_s + self.grace_s)
        elapsed_s = time.monotonic() - run.started
        if thread.is_alive():
            log.error("job still running %.0f s after JOB_TIMEOUT_S; asking for a fresh worker", elapsed_s - run.limit_s)
            return {"error": f"timeout: past JOB_TIMEOUT_S ({run.limit_s:g} s) and still inside one step "
                             f"{self.grace_s:g} s later; this worker will be replaced", "refresh_worker": True}
        if run.stopped_at is not None:
            return {"error": f"timeout: past JOB_TIMEOUT_S ({run.limit_s:g} s); stopped after {elapsed_s:.1f} s, "
                             f"before {run.stopped_at}"}
        if "exception" in outcome:
            raise outcome["exception"]
        return outcome["output"]

    def _run_on_thread(self, job: Callable[[], dict], run: _Run, outcome: dict) -> None:
        _current.run = run
        try:
            outcome["output"] = job()
        except BaseException as exc:  # handed to the caller's thread, which raises it
            outcome["exception"] = exc
        finally:
            _current.run = None
            self._pipelines_free.release()
