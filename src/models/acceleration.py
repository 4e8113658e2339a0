"""Speed levers for the transformers on CUDA: the attention kernel, regional compile, and
the check that the device can run FP8 (`src/models/fp8/linear.py` does the quantizing). And, on a
multi-GPU worker (PARALLEL), the transformer's side of context parallelism
(`enable_context_parallel`); src/serving/parallel.py runs the ranks.

Invariants: all are switches (`QUANTIZE`, `ATTENTION_BACKEND`, `COMPILE`), off by default,
because another kernel sums in another order and FP8 rounds, so outputs change; one is turned
on only once its deviation on the real weights is known (docs/performance.md). On the CPU the
attention kernel and compile do not apply, so the fidelity tests compare against stock
diffusers bit for bit; FP8 runs there too. Regional compile (`compile_repeated_blocks`)
compiles one block with dynamic shapes and reuses it for all 60: every output size and
reference count runs the same compiled code, compiled once at the warm-up. Every block gets
the same kind of input for that: the first block's would otherwise be views (the outputs of
`img_in` and `txt_in`) where the others get fresh tensors, and Dynamo guards on a view's base,
so each block structure would be traced and compiled twice (`regional_compile` gives the
first block tensors of their own), and Python floats are constants, so a process's first
compile traces its block once (`regional_compile` says why).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Protocol

import torch

from src.plumbing.config import ConfigError

log = logging.getLogger(__name__)

# Our names for diffusers' attention backends (diffusers.models.attention_dispatch).
ATTENTION_BACKENDS = {
    "sdpa": "native",  # torch's SDPA, which picks its kernel itself
    "cudnn": "_native_cudnn",  # SDPA's cuDNN kernel: Hopper-tuned
    "flash": "_native_flash",  # SDPA's FlashAttention-2 kernel
}
# SDPA's own choice on Hopper already is the cuDNN kernel, and forcing one through diffusers'
# backends made a pass slower (docs/performance.md, "Attention"). So `sdpa`, diffusers'
# default, stays the default.


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
        regional_compile(transformer)
    log.info("transformer %s: attention %s, compile %s", type(transformer).__name__, attention,
             "on" if compile_blocks else "off")


def regional_compile(transformer: torch.nn.Module, backend: str = "inductor") -> None:
    """Regional compile of the transformer's blocks, one graph for all of them: the outputs of
    `img_in` and `txt_in` (the first block's inputs, views) are detached, so the first block
    gets tensors of its own as every later block does. `detach()` under no_grad is the same
    memory and values without the view's base, which Dynamo would guard on. `backend`: the
    CPU tests' `eager`."""
    if not getattr(transformer, "_fresh_block_inputs", False):
        for name in ("img_in", "txt_in"):
            getattr(transformer, name).register_forward_hook(_detached_output)
        transformer._fresh_block_inputs = True
    # Process-wide: the floats Dynamo meets are constants here (eps, p; LoRA scales are folded
    # into tensors, src/models/lora/branches.py), so guarding on their values recompiles nothing,
    # and the first compile is not traced twice (TensorifyScalarRestartAnalysis).
    torch._dynamo.config.specialize_float = True
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend=backend)


def _detached_output(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


class ParallelRanks(Protocol):
    """The ranks of a multi-GPU worker, as a transformer joins them (src/serving/parallel.py's Ranks)."""

    rank: int
    world_size: int
    device_type: str

    def check_peers(self, module: torch.nn.Module, args: tuple) -> None: ...


def enable_context_parallel(transformer: torch.nn.Module, ranks: ParallelRanks) -> bool:
    """diffusers' Ulysses attention across all ranks, and the lockstep vote, on one
    transformer. Collective: every rank calls it, in the same order. Returns False when
    the transformer was already parallel."""
    from diffusers import ContextParallelConfig

    if getattr(transformer, "_parallel_config", None) is not None:
        return False
    # Any sequence length and head count: the text tokens' count depends on the prompt.
    config = ContextParallelConfig(ulysses_degree=ranks.world_size, ulysses_anything=True)
    with _one_device_on_cpu(ranks.device_type):
        transformer.enable_parallelism(config=config)
    transformer.register_forward_pre_hook(ranks.check_peers)
    log.info("rank %d: %s under context parallelism (Ulysses, %d ranks)", ranks.rank,
             type(transformer).__name__, ranks.world_size)
    return True


@contextmanager
def _one_device_on_cpu(device_type: str):
    """diffusers picks each rank's device as `rank % torch.accelerator.device_count()`
    (ModelMixin._resolve_parallel_config), which divides by zero where there is no
    accelerator. For the CPU check only, that count reads 1 during the call."""
    if device_type != "cpu":
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count
