"""LoRA adapters run unfused: beside the base weights, as a side branch of each linear
they touch, y = base(x) + scale * B(A(x)), for `torch.nn.Linear` and `Fp8Linear` alike.

A switch copies a few hundred MB of adapter weights instead of fusing and restoring; each
pass pays the branches' matmuls (docs/loras.md). Every block linear gets the branch at start
by changing its class to a subclass of its own whose forward adds the branch when
`lora_branch_on` is set, so names, parameters and state dict stay as they are.

Invariants: the base weights are never written, so the base model stays exact. Two layouts:
exact (eager: each adapter at its own rank, as PEFT's unfused `lora.Linear.forward`, bit for
bit diffusers' `load_lora_weights` + `set_adapters` without fusing) and padded (`COMPILE=true`:
one buffer pair per linear at `LORA_BRANCH_RANK`, scales folded into B, zeros elsewhere, so
every set runs the same compiled blocks and no switch recompiles; padding adds exact zeros,
folding the scale rounds once more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.models.fp8.linear import Fp8Linear
from src.models.fp8.packed import ProjectionView

_BRANCHED_CLASSES: dict[type, type] = {}


def _branched(cls: type) -> type:
    """`cls` with the side branch (one class per base class: the compiled code sees one type)."""
    if cls not in _BRANCHED_CLASSES:
        class Branched(cls):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                if not self.lora_branch_on:
                    return out
                if self.lora_parts is None:  # padded: scales folded into the up buffer
                    return out + F.linear(F.linear(x, self.lora_down), self.lora_up)
                for down, up, scale in self.lora_parts:  # exact: PEFT's arithmetic, adapter by adapter
                    out = out + F.linear(F.linear(x.to(down.dtype), down), up) * scale
                return out

        Branched.__name__ = Branched.__qualname__ = f"LoraBranched{cls.__name__}"
        _BRANCHED_CLASSES[cls] = Branched
    return _BRANCHED_CLASSES[cls]


def _unbranched(cls: type) -> type:
    """The class a branched linear had before (a transformer given branches again)."""
    return next((base for base, branched in _BRANCHED_CLASSES.items() if branched is cls), cls)


def _parts(adapters: list, module: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scale) of each adapter that touches `module`, in order."""
    return [(*factors, adapter.scale) for adapter in adapters if (factors := adapter.factors(module))]


def block_linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linears that get branches: every `torch.nn.Linear` and `Fp8Linear` of the blocks,
    and under FP8_PACK_QKV the packed projections' views (by the linears' own names; the
    packed module itself is no linear of the model)."""
    return {name: module for name, module in transformer.named_modules()
            if name.startswith("transformer_blocks.")
            and _unbranched(type(module)) in (torch.nn.Linear, Fp8Linear, ProjectionView)}


def padded_bytes(transformer: torch.nn.Module, padded_rank: int, dtype: torch.dtype) -> int:
    """GPU bytes the padded layout allocates on `transformer` (counted by the memory plan
    before they exist)."""
    return sum(padded_rank * (m.in_features + m.out_features) for m in block_linears(transformer).values()) \
        * dtype.itemsize


class LoraBranches:
    """The side branches of one transformer's block linears, and the set they run."""

    def __init__(self, transformer: torch.nn.Module, dtype: torch.dtype, *, padded_rank: int | None):
        """`dtype`: the pipeline's (the activations'), which the branches compute in;
        `padded_rank`: the padded layout with this rank (COMPILE=true); None: exact."""
        self.dtype, self.padded_rank = dtype, padded_rank
        self.linears = block_linears(transformer)
        for module in self.linears.values():
            module.__class__ = _branched(_unbranched(type(module)))
            module.lora_branch_on = False
            module.lora_parts = None
            if padded_rank is not None:
                like = dict(dtype=dtype, device=module.weight.device)
                module.register_buffer("lora_down", torch.zeros(padded_rank, module.in_features, **like),
                                       persistent=False)
                module.register_buffer("lora_up", torch.zeros(module.out_features, padded_rank, **like),
                                       persistent=False)
        self.on = False

    def buffer_bytes(self) -> int:
        if self.padded_rank is None:
            return 0
        return sum(m.lora_down.nbytes + m.lora_up.nbytes for m in self.linears.values())

    def fits(self, adapters: list) -> bool:
        """Whether the set can run as branches: it touches block linears only and, padded,
        no linear gets more than the padded rank in all."""
        touched = set().union(*(adapter.modules() for adapter in adapters))
        if not touched <= self.linears.keys():
            return False
        if self.padded_rank is None:
            return True
        return all(sum(down.shape[0] for down, _, _ in _parts(adapters, name)) <= self.padded_rank
                   for name in touched)

    def activate(self, adapters: list) -> None:
        """Run `adapters` (a set that `fits`) beside the weights from the next forward on."""
        self.deactivate()
        try:
            with torch.no_grad():
                for name, module in self.linears.items():
                    parts = _parts(adapters, name)
                    if self.padded_rank is not None:
                        self._fill_padded(module, parts)
                        module.lora_branch_on = True  # all of them: one compiled structure
                    elif parts:
                        # PEFT casts lora_A/lora_B to the base layer's dtype when it loads them,
                        # and scales by `scale * lora_alpha / r` with lora_alpha = r (src/models/lora/fp8_fusing.py).
                        device = module.weight.device
                        module.lora_parts = [(down.to(device, self.dtype), up.to(device, self.dtype),
                                              scale * down.shape[0] / down.shape[0])
                                             for down, up, scale in parts]
                        module.lora_branch_on = True
        except BaseException:
            self.deactivate()
            raise
        self.on = True

    def activate_empty(self) -> None:
        """Every branch on with nothing in it (padded: zeros, the output unchanged): the
        warm-up compiles the branched blocks with it."""
        self.deactivate()
        with torch.no_grad():
            for module in self.linears.values():
                if self.padded_rank is not None:
                    module.lora_down.zero_()
                    module.lora_up.zero_()
                    module.lora_branch_on = True
        self.on = True

    def deactivate(self) -> None:
        for module in self.linears.values():
            module.lora_branch_on = False
            module.lora_parts = None
        self.on = False

    @staticmethod
    def _fill_padded(module: torch.nn.Module, parts: list) -> None:
        down_buffer, up_buffer = module.lora_down, module.lora_up
        rank = 0
        for down, up, scale in parts:
            r = down.shape[0]
            down_buffer[rank:rank + r].copy_(down)
            up_buffer[:, rank:rank + r].copy_(up.to(up_buffer.device, torch.float32) * scale)
            rank += r
        down_buffer[rank:].zero_()
        up_buffer[:, rank:].zero_()

