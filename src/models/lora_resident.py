"""One adapter set held ready: its fused weights made once (at start) and kept in CPU
memory beside the base values of the same layers, so switching between the set and the
base model is a copy in place either way: no re-read of published weights, no re-fuse,
and (values changing in place, shapes and dtypes not) no recompile.

The fused values are exactly those of an on-the-spot fuse (`FusedLoras.apply` makes
them); the base values are the layers' own, copied back bit for bit. On a GPU both copies
live in page-locked memory of their exact size, so a switch runs at the host link's
speed: the full-coverage Lightning file touches 720 linears, 13.6 GB under FP8 (e4m3
values and row scales) or 27.2 GB in bf16, held twice.
"""

from __future__ import annotations

import logging

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
    """A set of adapters whose fused weights wait in CPU memory, with the base values."""

    def __init__(self, identity: tuple, linears: int, parameters: list[torch.Tensor], base: HostBlock,
                 fused: HostBlock):
        self.identity, self.linears = identity, linears
        self._parameters, self._base, self._fused = parameters, base, fused

    @property
    def host_bytes(self) -> int:
        return self._base.nbytes + self._fused.nbytes

    @classmethod
    def prepare(cls, pipeline, fused_loras, adapters: list, identity: tuple, pin: bool) -> "ResidentSet":
        """Fuse `adapters` once with `fused_loras` (the worker's on-the-spot fuse), keep the
        fused values and the originals in CPU memory, and put the base model back. Host
        memory peaks at the two copies (the originals move into their block one by one)."""
        fused_loras.apply(pipeline, adapters)
        originals = fused_loras.take_originals()  # {linear: tensors}; the weights stay fused
        modules = dict(pipeline.transformer.named_modules())
        names = list(originals)
        parameters = [p for name in names for p in _parameters(modules[name])]
        need = 2 * sum(HostBlock.sizes(parameters))
        available = available_host_bytes()
        held = sum(t.nbytes for tensors in originals.values() for t in tensors)  # freed as the blocks fill
        if available is not None and need - held > available - HOST_MARGIN_BYTES:
            _restore(parameters, [t for name in names for t in originals[name]])
            raise HostMemoryError(f"holding the fused set ready needs {need / GB:.1f} GB of CPU memory "
                                  f"(its {len(names)} linears twice: fused and base); "
                                  f"{(available + held) / GB:.1f} GB is available")
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
        log.info("LoRA set held ready: %d linears, %.1f GB of CPU memory%s", len(names), need / GB,
                 " (page-locked)" if pin else "")
        return cls(identity, len(names), parameters, base, fused)

    def load(self) -> None:
        """The fused values into the layers."""
        _restore(self._parameters, self._fused.views)

    def unload(self) -> None:
        """The base values back into the layers: bit-identical base model."""
        _restore(self._parameters, self._base.views)


def _restore(parameters: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values):
            parameter.copy_(value, non_blocking=True)  # page-locked sources: the copies queue
    if any(p.device.type == "cuda" for p in parameters[:1]):
        torch.cuda.synchronize()  # the switch's cost lands in the job's `lora` stage, not later
