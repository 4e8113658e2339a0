"""LoRAs under QUANTIZE=fp8: each touched linear fused in bf16 from the published
weights, then quantized, and put back exactly afterwards.

PEFT only wraps `torch.nn.Linear`, and an `Fp8Linear`'s e4m3 values cannot take a LoRA's
small delta (a LoRA on plainly downcast FP8 weights draws line artifacts: register rows 24 and
29). So, per linear the adapters touch: the published bf16 weight (read by name from the
snapshot, `PublishedWeights`) plus each adapter's delta as PEFT's merge computes it
(`lora_delta`), quantized row-wise as at load (`fp8.rowwise_fp8`) and copied into the existing
parameters; the linears kept in bf16 (FP8_KEEP_BF16) take the same deltas on their live weights.

Invariants: in-place copies keep the compiled blocks valid (no recompile). Before a linear
changes, what it holds (e4m3 values and row scales, or the bf16 weight) is copied to CPU
memory, and `restore` copies it back: the base model is bit-identical after any LoRA job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

import torch

from src.models.files import tensors as weights
from src.models.fp8.linear import Fp8Linear, rowwise_fp8

log = logging.getLogger(__name__)

# Published weights read ahead of the GPU work, on threads: reading (the
# snapshot's files) overlaps the copies and matmuls of the linears before.
READ_AHEAD = 3


class PublishedWeightsError(RuntimeError):
    """The published weights a LoRA fuse needs are missing, unreadable, or not the
    weights the worker serves."""


class PublishedWeights(Mapping):
    """The edit transformer's weights as published (a diffusers `transformer` folder,
    sharded or one file), read by linear name ("transformer_blocks.0.attn.to_q") on demand
    and cast to `dtype`, as `from_pretrained(dtype=...)` casts them. Only the files'
    headers are held (`weights.stored_tensors`, which the FP8 cache reads with too)."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = folder, dtype
        self._stored: dict[str, weights.StoredTensor] | None = None

    def _index(self) -> dict[str, weights.StoredTensor]:
        """{tensor key: where its bytes lie}."""
        if self._stored is None:
            try:
                stored, _ = weights.stored_tensors(self.folder)
            except (OSError, weights.BadWeightFile) as exc:
                stored, why = {}, f"{type(exc).__name__}: {exc}"
            else:
                why = "no safetensors files"
            if not stored:
                raise PublishedWeightsError(
                    f"the edit transformer's published weights in {self.folder} cannot be read "
                    f"({why}); LoRAs under QUANTIZE=fp8 are fused into them")
            self._stored = stored
        return self._stored

    def __getitem__(self, linear: str) -> torch.Tensor:
        stored = self._index().get(f"{linear}.weight")
        if stored is None:
            raise KeyError(linear)
        return weights.read_tensor(stored).to(self.dtype)

    def __iter__(self):
        return (key.removesuffix(".weight") for key in self._index() if key.endswith(".weight"))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def spans(self, linears: list[str]) -> list[weights.Span]:
        """Where the published weights of `linears` lie (file, first byte, bytes), in file
        order: what reading them will read (headers only read here)."""
        stored = [self._index()[f"{name}.weight"] for name in linears if f"{name}.weight" in self._index()]
        return sorted((tensor.path, tensor.start, tensor.nbytes) for tensor in stored)

    def check(self, linears: list[str]) -> None:
        """PublishedWeightsError unless every one of `linears` is there (reads headers only)."""
        missing = [name for name in linears if f"{name}.weight" not in self._index()]
        if missing:
            raise PublishedWeightsError(f"the edit transformer's published weights in {self.folder} lack "
                                        f"{len(missing)} of the {len(linears)} linears LoRAs may touch "
                                        f"(first: {missing[0]}); LoRAs under QUANTIZE=fp8 are fused into them")


def lora_delta(adapter, module: str, like: torch.Tensor) -> torch.Tensor | None:
    """What diffusers' `fuse_lora` (PEFT's `Linear.merge`) adds to the weight of `module`
    for `adapter` at its scale, in `like`'s dtype and device; None when the adapter does
    not touch it. PEFT casts lora_A/lora_B to the base weight's dtype and device, and on
    the CPU multiplies half types in float32; its scaling is the adapter weight times
    lora_alpha / r, and diffusers sets lora_alpha = r for state dicts without alphas
    (converters fold a file's alpha into the weights, as `lora_state_dict` did here)."""
    factors = adapter.factors(module)
    if factors is None:
        return None
    down, up = (factor.to(like.device, like.dtype) for factor in factors)
    rank = up.shape[1]
    scaling = adapter.scale * rank / rank  # PEFT's `scale * lora_alpha / r`, kept as it computes it
    in_float = like.device.type == "cpu" and like.dtype in (torch.float16, torch.bfloat16)
    if in_float:
        down, up = down.float(), up.float()
    delta = (up @ down) * scaling
    return delta.to(like.dtype) if in_float else delta


def fused_weight(base: torch.Tensor, adapters: list, module: str) -> torch.Tensor:
    """`base` plus each adapter's delta, added one adapter at a time in order, as PEFT's
    merge adds them (each sum rounded to `base`'s dtype)."""
    fused = base.clone()
    for adapter in adapters:
        delta = lora_delta(adapter, module, fused)
        if delta is not None:
            fused += delta
    return fused


def touched_linears(transformer: torch.nn.Module, adapters: list) -> list[str]:
    """The transformer's linears any adapter changes, in the transformer's module order."""
    wanted = set().union(*(adapter.modules() for adapter in adapters))
    return [name for name, _ in transformer.named_modules() if name in wanted]


def published_reads(transformer: torch.nn.Module, adapters: list) -> list[str]:
    """The linears whose published weights `fused_linears` reads, in its order: the FP8 ones
    `adapters` touch (a bf16 linear's live weight is its original)."""
    modules = dict(transformer.named_modules())
    return [name for name in touched_linears(transformer, adapters) if isinstance(modules[name], Fp8Linear)]


def fused_linears(transformer: torch.nn.Module, adapters: list, published: Mapping, dtype: torch.dtype):
    """Each linear `adapters` change, in module order, with its fused tensors: (name, module,
    tensors), the tensors in the order of the module's (weight, and for `Fp8Linear` its
    row scales), on the module's device, the module itself unchanged. An FP8 linear's
    values come from its published bf16 weight (`dtype`, the pipeline's), checked first to
    quantize to what the module serves; a bf16 linear's from its live weight."""
    modules = dict(transformer.named_modules())
    names = touched_linears(transformer, adapters)
    fp8_names = published_reads(transformer, adapters)
    pin = any(modules[name].weight.device.type == "cuda" for name in fp8_names)
    # The published weights are read READ_AHEAD linears ahead, on threads, in the order used.
    reads = weights.in_order_on_threads(lambda name: _published_weight(published, name, pin), fp8_names,
                                        READ_AHEAD, READ_AHEAD)
    with torch.no_grad(), closing(reads):
        for name in names:
            module = modules[name]
            if not isinstance(module, Fp8Linear):  # kept in bf16: the live weight is the original
                yield name, module, (fused_weight(module.weight, adapters, name),)
                continue
            read_name, published_weight = next(reads)
            assert read_name == name
            original = published_weight.to(module.weight.device, dtype, non_blocking=True)
            _check_same_base(module, original, name)
            values, scale = rowwise_fp8(fused_weight(original, adapters, name))
            yield name, module, (values, scale.reshape(module.weight_scale.shape))


def fuse(transformer: torch.nn.Module, adapters: list, published: Mapping, dtype: torch.dtype,
         saved: dict[str, tuple[torch.Tensor, ...]]) -> int:
    """Fuse `adapters` into `transformer` in place (`fused_linears`'s values). Each changed
    linear's current tensors go into `saved` (CPU) first, so `restore` can put them back
    even if this fails part way. Returns how many linears changed."""
    changed = 0
    with torch.no_grad():
        for name, module, tensors in fused_linears(transformer, adapters, published, dtype):
            live = (module.weight, module.weight_scale) if isinstance(module, Fp8Linear) else (module.weight,)
            saved[name] = tuple(tensor.detach().to("cpu", copy=True) for tensor in live)
            for target, value in zip(live, tensors):
                target.copy_(value)
            changed += 1
    return changed


def restore(transformer: torch.nn.Module, saved: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """Copy what `fuse` saved back into the same parameters: the base model, bit for bit."""
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, tensors in saved.items():
            module = modules[name]
            module.weight.copy_(tensors[0])
            if isinstance(module, Fp8Linear):
                module.weight_scale.copy_(tensors[1])


def _published_weight(published: Mapping, name: str, pin: bool) -> torch.Tensor:
    """`published[name]`, on a reader thread; for a GPU, copied into page-locked memory
    there, so the file's pages are read on this thread and the copy to the GPU can be
    asynchronous."""
    try:
        weight = published[name]
    except KeyError:
        raise PublishedWeightsError(f"the edit transformer's published weights lack {name}; LoRAs under "
                                    "QUANTIZE=fp8 are fused into them") from None
    if pin and weight.device.type == "cpu":
        # torch's host allocator keeps these blocks (rounded up to powers of two, register
        # row 23) for reuse: READ_AHEAD of them at a time, under 1 GB for the largest linears.
        weight = torch.empty_like(weight, pin_memory=True).copy_(weight)
    return weight


def _check_same_base(module: Fp8Linear, original: torch.Tensor, name: str) -> None:
    """The published weight, quantized as at load, must give the values the worker serves:
    otherwise the snapshot is not the model in memory (another revision, a corrupt file)."""
    values, scale = rowwise_fp8(original)
    if not (torch.equal(values.view(torch.uint8), module.weight.view(torch.uint8))
            and torch.equal(scale.reshape(module.weight_scale.shape), module.weight_scale)):
        raise PublishedWeightsError(f"{name}: the published weight, quantized, differs from the FP8 weight this "
                                    "worker serves; the snapshot does not match the loaded model")
