"""How each job's adapter set runs on the edit transformer, chosen per job:

    base      no adapters: the base weights, exact
    resident  the set held ready (PRELOAD=lightning): the layers pointed at its fused copy on
              the device, or that copy copied in from CPU memory (src/models/lora/resident.py)
    unfused   side branches beside the base weights (src/models/lora/branches.py): a cheap switch,
              a small cost per pass
    fused     fused into the weights on the spot (src/models/lora/adapters.py FusedLoras): the switch costs
              a fuse and later a restore, the passes run at base speed

A set that is not resident runs unfused until LORA_FUSE_AFTER consecutive jobs have asked
for it; that job fuses it, and it stays fused while the same set keeps coming. A set the
branches cannot take (a linear outside the blocks, more than LORA_BRANCH_RANK under
compile) is fused at once. Whatever ran before, the base weights are bit-identical after
any switch back to the base model.
"""

from __future__ import annotations

import logging
from typing import Callable

from src.models.lora.branches import LoraBranches
from src.models.lora.resident import PointedSet, ResidentSet, hold
from src.models.lora.adapters import Adapter, FusedLoras, identity_of

log = logging.getLogger(__name__)

BASE = ("base", ())
# While weights change, and after a change that failed part way: the next job restores
# the base model by every way it could have left it before running anything.
UNKNOWN = ("unknown", ())


class LoraSwitch:
    def __init__(self, fused: FusedLoras, fuse_after: int):
        self.fused = fused
        self.fuse_after = fuse_after
        self.branches: LoraBranches | None = None  # installed at start (install_branches)
        self.resident: ResidentSet | None = None
        self.current = BASE  # (how, set identity)
        self._last, self._streak = (), 0  # the last job's set and how many jobs in a row asked for it

    @property
    def mode(self) -> str:
        return self.current[0]

    def install_branches(self, transformer, dtype, padded_rank: int | None) -> None:
        self.branches = LoraBranches(transformer, dtype, padded_rank=padded_rank)

    def hold_ready(self, pipeline, adapters: list[Adapter], pin: bool,
                   reserve_device: Callable[[int], bool] | None = None) -> ResidentSet:
        """Make `adapters` the resident set (the base model is served meanwhile); held on the
        device where `reserve_device` grants the bytes (src/models/lora/resident.py)."""
        self.apply(pipeline, [])
        self.resident = hold(pipeline, self.fused, adapters, identity_of(adapters), pin, reserve_device)
        return self.resident

    def device_copy_bytes(self) -> int:
        """GPU bytes the held set's device copy takes now (0: none, or released); the same
        size as its CPU copy."""
        resident = self.resident
        return resident.held_bytes if isinstance(resident, PointedSet) and resident.staged else 0

    def release_device_copy(self, pipeline) -> None:
        """Free the held set's device copy for a job that needs the room (the base weights
        back first if the set is in use); its next job stages it again."""
        if self.device_copy_bytes():
            if self.mode in ("resident", "unknown"):  # the layers may point at the copy
                self._leave(pipeline)
            self.resident.release()
            log.info("LoRA set held ready: device copy released for a job that needs the memory")

    def to_base(self, pipeline) -> None:
        """The base weights back, whatever ran (before the transformer leaves the device:
        its CPU copy holds the base weights)."""
        if self.current != BASE:
            self._leave(pipeline)

    def target(self, adapters: list[Adapter]) -> tuple[str, tuple]:
        """How the next job with `adapters` runs (counting it in the streak)."""
        identity = identity_of(adapters)
        if not adapters:
            return BASE
        if self.resident is not None and identity == self.resident.identity:
            return ("resident", identity)
        if self.current == ("fused", identity):
            return self.current  # stays fused while it keeps coming
        streak = self._streak + 1 if identity == self._last else 1
        if (self.branches is None or not self.branches.fits(adapters)
                or (self.fuse_after and streak >= self.fuse_after)):
            return ("fused", identity)
        return ("unfused", identity)

    def needs_change(self, adapters: list[Adapter]) -> bool:
        """Whether the next job with `adapters` changes what runs (GPU work: timed as `lora`)."""
        return self.target(adapters) != self.current

    def apply(self, pipeline, adapters: list[Adapter]) -> str:
        """Make the transformer run exactly `adapters` for the next job; returns how."""
        target = self.target(adapters)
        identity = identity_of(adapters)
        self._streak = self._streak + 1 if identity == self._last else 1
        self._last = identity
        if target == self.current:
            return target[0]
        self._leave(pipeline)
        self.current = UNKNOWN
        how = target[0]
        if how == "resident":
            self.resident.load()
        elif how == "unfused":
            self.branches.activate(adapters)
        elif how == "fused":
            self.fused.apply(pipeline, adapters)
        self.current = target
        log.info("LoRA set %s (%d adapters, job %d in a row)", how, len(adapters), self._streak)
        return how

    def _leave(self, pipeline) -> None:
        """Back to the base weights from whatever runs now."""
        how = self.current[0]
        self.current = UNKNOWN
        if how in ("resident", "unknown") and self.resident is not None:
            self.resident.unload()
        if how in ("unfused", "unknown") and self.branches is not None:
            self.branches.deactivate()
        if how in ("fused", "unknown"):
            self.fused.restore(pipeline)
        self.current = BASE
