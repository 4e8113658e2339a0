"""Speed levers for the transformers on CUDA: the attention kernel and regional compile.

Both are switches (`ATTENTION_BACKEND`, `COMPILE`) because both change outputs at the
level of bf16 rounding: another kernel sums in another order. `tools/bench.py --levers`
measures each alone on the full-size transformer, with its speed and its deviation from
stock diffusers; README quotes the figures. On the CPU (tests, demo) neither applies, so
the fidelity tests compare against stock diffusers bit for bit.

Regional compile (diffusers' `compile_repeated_blocks`) compiles one transformer block
and reuses it for all 60, so compiling costs seconds, not minutes. It compiles with
dynamic shapes: every output size and reference count then runs the same compiled
code, and the warm-up at start compiles it once, so no job pays for it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Our names for diffusers' attention backends (diffusers.models.attention_dispatch).
ATTENTION_BACKENDS = {
    "sdpa": "native",  # torch's SDPA, which picks its kernel itself (flash at batch 1 without a mask)
    "cudnn": "_native_cudnn",  # SDPA's cuDNN kernel: Hopper-tuned
    "flash": "_native_flash",  # SDPA's FlashAttention-2 kernel
}
# What `auto` means on CUDA, from `tools/bench.py --levers` on an H100 (README): SDPA's
# own choice beat the cuDNN kernel (0.397 against 0.415 s per 1024x1024 pass) and
# FlashAttention-2 (0.466 s); regional compile took it to 0.284 s.
AUTO_ATTENTION_BACKEND = "sdpa"
AUTO_COMPILE = True


def attention_backend(setting: str, device: torch.device) -> str | None:
    """Our backend name for ATTENTION_BACKEND on this device; None: leave diffusers' default."""
    if device.type != "cuda":
        return None
    return AUTO_ATTENTION_BACKEND if setting == "auto" else setting


def compile_enabled(setting: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return AUTO_COMPILE if setting == "auto" else setting == "true"


def accelerate(transformer: torch.nn.Module, *, attention: str | None, compile_blocks: bool) -> None:
    """Set the transformer's attention kernel and compile its blocks, in place."""
    if attention is not None and attention != "sdpa":
        transformer.set_attention_backend(ATTENTION_BACKENDS[attention])
    if compile_blocks:
        # Compiled lazily, on the first forward: the warm-up job at start.
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    log.info("transformer %s: attention %s, compile %s", type(transformer).__name__, attention or "sdpa",
             "on" if compile_blocks else "off")
