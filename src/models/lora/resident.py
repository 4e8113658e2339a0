"""One adapter set held ready: its fused weights made once (at start) and kept beside the base
values of the same layers, so switching between the set and the base model needs no re-read,
no re-fuse and (shapes and dtypes unchanged) no recompile. Two places, chosen at start:

    on the device  (`PointedSet`) where the memory plan keeps room for one more copy of the
                   touched layers: the layers are pointed at the fused copy and back
                   (`tensor.data`), moving no bytes; a job that needs the room has the copy
                   released first, and the set's next job restages it from a page-locked copy.
    in CPU memory  (`CopiedSet`) else: fused and base copies in page-locked blocks of their
                   exact size, copied in place either way at the host link's speed.

Invariants: the fused values are exactly an on-the-spot fuse's (`FusedLoras.apply` makes
them); the base values are the layers' own, kept (device) or copied back bit for bit (CPU).
Sizes and switch times: docs/loras.md, docs/performance.md (LoRA switches).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from src.models.lora import fp8_fusing as fp8_loras
from src.models.files import tensors as weights
from src.models.fp8.linear import Fp8Linear
from src.models.fp8.packed import ProjectionView
from src.models.memory.modes import HostBlock, HostMemoryError

log = logging.getLogger(__name__)

GB = 1e9
# Left to the rest of the process (Python, the job's images, the CUDA context, a
# transformer waiting in CPU memory is counted apart) when checking the budget at start.
HOST_MARGIN_BYTES = 8 * 10**9


def _parameters(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The tensors a fuse changes, in the order `FusedLoras` saves them."""
    if isinstance(module, Fp8Linear):
        return (module.weight, module.weight_scale)
    return (module.weight,)


def _held(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The parameters that hold what `_parameters` gives: those themselves, but for a packed
    projection's linear (FP8_PACK_QKV), whose tensors are rows of its packed module's: the
    packed ones, whole (a set is held, and pointed at, a parameter at a time)."""
    if isinstance(module, ProjectionView):
        return (module.packed.weight, module.packed.weight_scale)
    return _parameters(module)


class ResidentSet:
    """A set of adapters whose fused weights wait beside the base values (module doc)."""

    where = ""

    def __init__(self, identity: tuple, linears: int, parameters: list[torch.Tensor]):
        self.identity, self.linears, self._parameters = identity, linears, parameters

    @property
    def held_bytes(self) -> int:
        raise NotImplementedError

    def load(self) -> None:
        """The fused values into the layers."""
        raise NotImplementedError

    def unload(self) -> None:
        """The base values back into the layers: bit-identical base model."""
        raise NotImplementedError


class CopiedSet(ResidentSet):
    """Fused and base values in CPU memory, copied into the layers in place."""

    where = "host"

    def __init__(self, identity: tuple, linears: int, parameters: list[torch.Tensor], base: HostBlock,
                 fused: HostBlock):
        super().__init__(identity, linears, parameters)
        self._base, self._fused = base, fused

    @property
    def held_bytes(self) -> int:
        return self._base.nbytes + self._fused.nbytes

    def load(self) -> None:
        _restore(self._parameters, self._fused.views)

    def unload(self) -> None:
        _restore(self._parameters, self._base.views)


class PointedSet(ResidentSet):
    """The fused copy on the device, the layers pointed at it; its CPU copy stages it again
    after a `release`. Made on the device (`_hold_on_device`), the set has no CPU copy until
    its first release, which copies it out first: the start does not pay for a copy that
    only the rare job needing the room uses."""

    where = "device"

    def __init__(self, identity: tuple, linears: int, parameters: list[torch.Tensor],
                 fused_on_host: HostBlock | None, on_device: HostBlock | None = None, pin: bool = False):
        super().__init__(identity, linears, parameters)
        self._base = [p.data for p in parameters]  # the layers' own storage, never written
        self._fused_on_host = fused_on_host  # None: not copied out yet (then `on_device` is given)
        self._on_device = on_device  # staged already (the fused values made there), or None
        self._pin = pin

    @property
    def held_bytes(self) -> int:
        return sum(HostBlock.sizes(self._parameters))

    @property
    def staged(self) -> bool:
        return self._on_device is not None

    def stage(self) -> None:
        """The device copy made from the CPU copy (at start, and after a release)."""
        if self._on_device is None:
            block = HostBlock(self._parameters, device=self._parameters[0].device)
            _restore(block.views, self._fused_on_host.views)
            self._on_device = block

    def release(self) -> None:
        """Free the device copy (the layers must hold their base values: `unload` first),
        copied out to CPU memory first where it has no CPU copy yet."""
        if self._on_device is not None and self._fused_on_host is None:
            start = time.perf_counter()
            self._fused_on_host = _copied_out(self._on_device, self._parameters, self._pin)
            log.info("LoRA set held ready: device copy copied out to CPU memory in %.1f s before its release",
                     time.perf_counter() - start)
        self._on_device = None

    def load(self) -> None:
        self.stage()
        for parameter, value in zip(self._parameters, self._on_device.views):
            parameter.data = value

    def unload(self) -> None:
        for parameter, value in zip(self._parameters, self._base):
            parameter.data = value


def hold(pipeline, fused_loras, adapters: list, identity: tuple, pin: bool,
         reserve_device: Callable[[int], bool] | None = None) -> ResidentSet:
    """Fuse `adapters` once, keep the fused values (and, in CPU memory, the base values) and
    leave the layers with their base values. `reserve_device(n)` says whether n more bytes
    may stay on the device (and reserves them). Under FP8 the fuse's values are made
    straight into their block (`FusedLoras.fused_linears`), the layers never written; in
    bf16 diffusers fuses in place (`FusedLoras.apply`), and CPU memory then peaks at the
    copies kept plus the originals, which move into their block one by one."""
    start = time.perf_counter()
    if fused_loras.fuses_fp8:
        modules = dict(pipeline.transformer.named_modules())
        names = fp8_loras.touched_linears(pipeline.transformer, adapters)
        parameters = list(dict.fromkeys(p for name in names for p in _held(modules[name])))  # each one once
        if reserve_device is not None and reserve_device(sum(HostBlock.sizes(parameters))):
            return _hold_on_device(pipeline, fused_loras, adapters, identity, pin, names, parameters, start)
        return _hold_in_host_memory(pipeline, fused_loras, adapters, identity, pin, names, parameters, start)
    fused_loras.apply(pipeline, adapters)
    originals = fused_loras.take_originals()  # {linear: tensors}; the weights stay fused
    modules = dict(pipeline.transformer.named_modules())
    names = list(originals)
    parameters = [p for name in names for p in _parameters(modules[name])]  # as `originals`, linear by linear
    size = sum(HostBlock.sizes(parameters))
    on_device = reserve_device is not None and reserve_device(size)
    need = size if on_device else 2 * size
    available = weights.available_memory_bytes()
    held = sum(t.nbytes for tensors in originals.values() for t in tensors)  # freed as the blocks fill
    if available is not None and need - held > available - HOST_MARGIN_BYTES:
        _restore(parameters, [t for name in names for t in originals[name]])
        copies = "its fused values" if on_device else "its linears twice: fused and base"
        raise HostMemoryError(f"holding the fused set ready needs {need / GB:.1f} GB of CPU memory "
                              f"({len(names)} linears, {copies}); {(available + held) / GB:.1f} GB is available")
    base = None
    moved: list[torch.Tensor] = []  # originals already in `base`, by whole linears
    try:
        fused = HostBlock(parameters)
        with torch.no_grad():
            for view, parameter in zip(fused.views, parameters):
                view.copy_(parameter)
        if not on_device:
            base = HostBlock(parameters)
            views = iter(base.views)
            for name in names:  # one linear at a time: the originals' memory goes as the block fills
                copied = [next(views).copy_(tensor) for tensor in originals[name]]
                moved += copied
                del originals[name]
    except BaseException:
        _restore(parameters, moved + [t for name in names if name in originals for t in originals[name]])
        raise
    _restore(parameters, [t for name in names for t in originals[name]] if on_device else base.views)
    if pin:
        fused.pin()
        if base is not None:
            base.pin()
    if on_device:
        resident = PointedSet(identity, len(names), parameters, fused)
        resident.stage()
    else:
        resident = CopiedSet(identity, len(names), parameters, base, fused)
    log.info("LoRA set held ready %s: %d linears, %.1f GB a copy%s, in %.1f s", "on the GPU (and in CPU memory, "
             "to stage it again)" if on_device else "in CPU memory (fused and base)", len(names), size / GB,
             ", page-locked" if pin else "", time.perf_counter() - start)
    return resident


def _hold_on_device(pipeline, fused_loras, adapters: list, identity: tuple, pin: bool, names: list[str],
                    parameters: list[torch.Tensor], start: float) -> PointedSet:
    """FP8: the fused values made straight into one device block; its CPU copy waits for its
    first release (`PointedSet.release`), the CPU memory for it checked now. Nothing is
    copied out or page-locked at start (docs/performance.md has the times)."""
    size = sum(HostBlock.sizes(parameters))
    _check_host_memory(size, f"{len(names)} linears, its fused values")
    on_device = _fused_block(pipeline, fused_loras, adapters, parameters,
                             HostBlock(parameters, device=parameters[0].device))
    log.info("LoRA set held ready on the GPU: %d linears, %.1f GB, fused there in %.1f s (copied out to CPU "
             "memory only if a job needs the room)", len(names), size / GB, time.perf_counter() - start)
    return PointedSet(identity, len(names), parameters, None, on_device=on_device, pin=pin)


def _hold_in_host_memory(pipeline, fused_loras, adapters: list, identity: tuple, pin: bool, names: list[str],
                         parameters: list[torch.Tensor], start: float) -> CopiedSet:
    """FP8 without room on the device: the base values and the fused ones copied straight
    into two CPU blocks, page-locked before they are written (`pin`), so every copy runs at
    the link's speed and no value passes through pageable memory."""
    size = sum(HostBlock.sizes(parameters))
    _check_host_memory(2 * size, f"{len(names)} linears, its linears twice: fused and base")
    blocks = [HostBlock.page_locked(parameters) if pin else HostBlock(parameters) for _ in range(2)]
    allocated = time.perf_counter()
    base = blocks[0]
    with torch.no_grad():
        for view, parameter in zip(base.views, parameters):
            view.copy_(parameter)
    fused = _fused_block(pipeline, fused_loras, adapters, parameters, blocks[1])
    log.info("LoRA set held ready in CPU memory (fused and base): %d linears, %.1f GB a copy%s, in %.1f s "
             "(%.1f s of it allocating%s)", len(names), size / GB, ", page-locked" if pin else "",
             time.perf_counter() - start, allocated - start, " and page-locking" if pin else "")
    return CopiedSet(identity, len(names), parameters, base, fused)


def _check_host_memory(need: int, what: str) -> None:
    available = weights.available_memory_bytes()
    if available is not None and need > available - HOST_MARGIN_BYTES:
        raise HostMemoryError(f"holding the fused set ready needs {need / GB:.1f} GB of CPU memory ({what}); "
                              f"{available / GB:.1f} GB is available")


def _fused_block(pipeline, fused_loras, adapters: list, parameters: list[torch.Tensor],
                 block: HostBlock) -> HostBlock:
    """`block` filled with the fused values `FusedLoras.apply` would write (FP8), the layers
    left as they are. A packed projection's tensors take their base values first: the rows
    the set leaves alone keep them; every other tensor the fuse writes whole."""
    view_of = {id(parameter): view for parameter, view in zip(parameters, block.views)}
    modules = dict(pipeline.transformer.named_modules())
    packed = {id(tensor) for name in fp8_loras.touched_linears(pipeline.transformer, adapters)
              if isinstance(modules[name], ProjectionView) for tensor in _held(modules[name])}
    with torch.no_grad():
        for parameter, view in zip(parameters, block.views):
            if id(parameter) in packed:
                view.copy_(parameter)
        for _, module, tensors in fused_loras.fused_linears(pipeline, adapters):
            for target, value in zip(_slots(module, view_of), tensors):
                target.copy_(value)
    if parameters and parameters[0].device.type == "cuda":
        torch.cuda.synchronize()
    return block


def _slots(module: torch.nn.Module, view_of: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Where a linear's `_parameters` sit in a block of `_held` tensors (`view_of`: by the
    held tensor's id): a packed projection's are its rows of the packed views."""
    if isinstance(module, ProjectionView):
        rows = module.packed.rows(module.index)
        return view_of[id(module.packed.weight)][rows], view_of[id(module.packed.weight_scale)][:, rows]
    return tuple(view_of[id(parameter)] for parameter in _parameters(module))


def _copied_out(on_device: HostBlock, parameters: list[torch.Tensor], pin: bool) -> HostBlock:
    """A CPU copy of a device block, page-locked where `pin` (staging it again then runs at
    the link's speed); pageable, with a log line, where the page lock is refused."""
    try:
        host = HostBlock.page_locked(parameters) if pin else HostBlock(parameters)
    except HostMemoryError as exc:
        log.warning("LoRA set held ready: %s; its CPU copy stays pageable (slower to stage again)", exc)
        host = HostBlock(parameters)
    with torch.no_grad():
        host.block.copy_(on_device.block, non_blocking=host.pinned)
    if on_device.block.device.type == "cuda":
        torch.cuda.synchronize()
    return host


def _restore(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for target, value in zip(targets, values):
            target.copy_(value, non_blocking=True)  # page-locked sources: the copies queue
    if any(t.device.type == "cuda" for t in targets[:1]):
        torch.cuda.synchronize()  # the switch's cost lands in the job's `lora` stage, not later
