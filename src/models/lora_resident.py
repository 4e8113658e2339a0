"""One adapter set held ready: its fused weights made once (at start) and kept beside
the base values of the same layers, so switching between the set and the base model needs
no re-read of published weights, no re-fuse and (shapes and dtypes unchanged) no
recompile. Two places to hold it, chosen at start:

    on the device  where the memory plan has room for one more copy of the touched
                   layers without refusing or slowing any job it served: the layers are
                   pointed at the fused copy and back (`tensor.data`), a switch of
                   microseconds that moves no bytes
    in CPU memory  else: both copies (fused and base) in page-locked blocks of their
                   exact size, copied in place either way at the host link's speed

The fused values are exactly those of an on-the-spot fuse (`FusedLoras.apply` makes
them); the base values are the layers' own, kept (device) or copied back bit for bit
(CPU). The full-coverage Lightning file touches 720 linears: 13.6 GB under FP8 (e4m3
values and row scales) or 27.2 GB in bf16, per copy.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from src.models.fp8 import Fp8Linear
from src.models.memory import HostBlock, HostMemoryError

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


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ResidentSet:
    """A set of adapters whose fused weights wait beside the base values (module doc)."""

    def __init__(self, identity: tuple, linears: int, parameters: list[torch.Tensor], base: list[torch.Tensor],
                 fused: list[torch.Tensor], *, pointed: bool, blocks: tuple[HostBlock, ...]):
        self.identity, self.linears, self.pointed = identity, linears, pointed
        self._parameters, self._base, self._fused = parameters, base, fused
        self._blocks = blocks  # the memory behind `base` and `fused` (and its page lock)

    @property
    def held_bytes(self) -> int:
        return sum(block.nbytes for block in self._blocks)

    @property
    def where(self) -> str:
        return "device" if self.pointed else "host"

    @classmethod
    def prepare(cls, pipeline, fused_loras, adapters: list, identity: tuple, pin: bool,
                reserve_device: Callable[[int], bool] | None = None) -> "ResidentSet":
        """Fuse `adapters` once with `fused_loras` (the worker's on-the-spot fuse), keep the
        fused values beside the originals, and put the base model back. `reserve_device(n)`
        says whether n more bytes may stay on the device (and reserves them); else both
        copies go to CPU memory, which then peaks at the two copies (the originals move
        into their block one by one)."""
        fused_loras.apply(pipeline, adapters)
        originals = fused_loras.take_originals()  # {linear: tensors}; the weights stay fused
        modules = dict(pipeline.transformer.named_modules())
        names = list(originals)
        parameters = [p for name in names for p in _parameters(modules[name])]
        saved = [t for name in names for t in originals[name]]
        if reserve_device is not None and reserve_device(sum(HostBlock.sizes(parameters))):
            try:
                fused = HostBlock(parameters, device=parameters[0].device)
                with torch.no_grad():
                    for view, parameter in zip(fused.views, parameters):
                        view.copy_(parameter)
            finally:
                _restore(parameters, saved)
            log.info("LoRA set held ready on %s: %d linears, %.1f GB beside the base weights",
                     parameters[0].device, len(names), fused.nbytes / GB)
            return cls(identity, len(names), parameters, [p.data for p in parameters], fused.views,
                       pointed=True, blocks=(fused,))
        need = 2 * sum(HostBlock.sizes(parameters))
        available = available_host_bytes()
        held = sum(t.nbytes for t in saved)  # freed as the blocks fill
        if available is not None and need - held > available - HOST_MARGIN_BYTES:
            _restore(parameters, saved)
            raise HostMemoryError(f"holding the fused set ready needs {need / GB:.1f} GB of CPU memory "
                                  f"(its {len(names)} linears twice: fused and base); "
                                  f"{(available + held) / GB:.1f} GB is available")
        del saved
        base = HostBlock(parameters)
        views = iter(base.views)
        moved = 0
        try:
            for name in names:  # one linear at a time: the originals' memory goes as the block fills
                for tensor in originals.pop(name):
                    next(views).copy_(tensor)
                    moved += 1
            fused = HostBlock(parameters)
            with torch.no_grad():
                for view, parameter in zip(fused.views, parameters):
                    view.copy_(parameter)
        except BaseException:
            rest = [t for name in names if name in originals for t in originals[name]]
            _restore(parameters, base.views[:moved] + rest)
            raise
        _restore(parameters, base.views)
        if pin:
            base.pin()
            fused.pin()
        log.info("LoRA set held ready in CPU memory: %d linears, %.1f GB%s", len(names), need / GB,
                 " (page-locked)" if pin else "")
        return cls(identity, len(names), parameters, base.views, fused.views, pointed=False, blocks=(base, fused))

    def load(self) -> None:
        """The fused values into the layers."""
        self._switch(self._fused)

    def unload(self) -> None:
        """The base values back into the layers: bit-identical base model."""
        self._switch(self._base)

    def _switch(self, values: list[torch.Tensor]) -> None:
        if self.pointed:
            for parameter, value in zip(self._parameters, values):
                parameter.data = value
        else:
            _restore(self._parameters, values)


def _restore(parameters: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values):
            parameter.copy_(value, non_blocking=True)  # page-locked sources: the copies queue
    if any(p.device.type == "cuda" for p in parameters[:1]):
        torch.cuda.synchronize()  # the switch's cost lands in the job's `lora` stage, not later
