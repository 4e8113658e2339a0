"""Speed levers for the transformers on CUDA: the attention kernel, regional compile, and
the check that the device can run FP8 (`src/fp8.py` does the quantizing).

All are switches (`QUANTIZE`, `ATTENTION_BACKEND`, `COMPILE`), off by default: another
kernel sums in another order, and FP8 rounds every weight and activation, so outputs
change, and a change is only turned on once its deviation on the real weights is known.
`tools/bench.py --levers` measures each alone on the full-size transformer; README quotes
the figures. On the CPU (tests, demo) the attention kernel and compile do not apply, so
the fidelity tests compare against stock diffusers bit for bit; FP8 runs there too (slowly),
so its job path is tested.

Regional compile (diffusers' `compile_repeated_blocks`) compiles one transformer block
and reuses it for all 60, so compiling costs seconds, not minutes. It compiles with
dynamic shapes: every output size and reference count then runs the same compiled
code, and the warm-up at start compiles it once, so no job pays for it.
"""

from __future__ import annotations

import logging

import torch

from src.plumbing.config import ConfigError

log = logging.getLogger(__name__)

# Our names for diffusers' attention backends (diffusers.models.attention_dispatch).
ATTENTION_BACKENDS = {
    "sdpa": "native",  # torch's SDPA, which picks its kernel itself
    "cudnn": "_native_cudnn",  # SDPA's cuDNN kernel: Hopper-tuned
    "flash": "_native_flash",  # SDPA's FlashAttention-2 kernel
}
# On the H100 SDPA's own choice already is the cuDNN kernel (`tools/attention_bench.py`:
# 595 TFLOP/s at an edit's 8,689 tokens, FlashAttention-2 348), and forcing a kernel through
# diffusers' backends made a pass slower (0.415 and 0.466 s against 0.397 s). So `sdpa`,
# diffusers' default, stays the default.


# FP8 matmuls need Ada or Hopper tensor cores (compute capability 8.9+).
FP8_MIN_CAPABILITY = (8, 9)


def check_supported(quantize: str, device: torch.device) -> None:
    """ConfigError (a start failure, before any loading) when `device` cannot run `quantize`.
    The CPU runs FP8 matmuls in software (tests); a GPU needs FP8 tensor cores."""
    if quantize == "none" or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"QUANTIZE={quantize} needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, "
            f"H100, H200); this worker has {torch.cuda.get_device_name(device)} (compute capability "
            f"{'.'.join(map(str, capability))})")


def accelerate(transformer: torch.nn.Module, device: torch.device, *, attention: str, compile_blocks: bool) -> None:
    """Set the transformer's attention kernel and compile its blocks, in place. CUDA only."""
    if device.type != "cuda":
        return
    if attention != "sdpa":
        transformer.set_attention_backend(ATTENTION_BACKENDS[attention])
    if compile_blocks:
        # Compiled lazily, on the first forward: the warm-up job at start (or, for a
        # Layered pipeline loaded on first use, that first decompose job).
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    log.info("transformer %s: attention %s, compile %s", type(transformer).__name__, attention,
             "on" if compile_blocks else "off")
