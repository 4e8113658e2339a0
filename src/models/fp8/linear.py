"""QUANTIZE=fp8: the transformer blocks' linears as FP8 (e4m3) matmuls, with torch's own
scaled matmul (`torch._scaled_mm`), no extra package; those named in FP8_KEEP_BF16 (by
default the modulation linears and the image MLP's down-projection, SGLang's validated
recipe: `DEFAULT_FP8_KEEP_BF16`) stay bf16.

Each weight row gets one float32 scale, set once at load, that maps its largest value to
e4m3's largest (448); each activation row (one token) gets one at run time the same way.
The product of the two e4m3 matrices is rescaled by both and comes out in the model's
dtype. Under `COMPILE=true` the activation's scaling (absolute max, divide, cast) fuses
into one kernel before each matmul; eager, it costs a few small kernels per linear.

On the GPU this needs FP8 tensor cores (compute capability 8.9+: L4, L40S, H100, H200).
torch's CPU build runs the same matmul (slowly), so the tests run the FP8 job path on the
CPU with the tiny models.
"""

from __future__ import annotations

import torch

# The recipes are re-exported: callers of fp8 name them from here.
from src.plumbing.config import (BLOCK_LINEARS, DEFAULT_FP8_KEEP_BF16, FP8_RECIPES,  # noqa: F401
                                 MODULATION_LINEARS, RECIPE_VERSION)

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
# A row of zeros keeps a finite scale (and quantizes to zeros).
MIN_SCALE = 1e-12
# Hopper's faster FP8 accumulation (as torchao's and most FP8 inference stacks use); its
# effect is inside the deviation docs/performance.md reports.
FAST_ACCUMULATION = True
# FP8_PACK_QKV (src/models/fp8/packed.py): the packed module's name under a block's `attn`,
# and the three linears it packs, as diffusers' QwenDoubleStreamAttnProcessor2_0 calls
# them: the image stream's, then the text stream's.
PACKED_PROJECTIONS = {
    "packed_qkv": ("to_q", "to_k", "to_v"),
    "packed_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def rowwise_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` (n, k) as e4m3 values and one float32 scale per row: rows ≈ values * scale."""
    amax = rows.abs().amax(dim=-1, keepdim=True).float()
    # Times the reciprocal, not divided: torch's CUDA kernels divide by a scalar as a multiply
    # by its reciprocal and the CPU's divide exactly, so scales differed by an ulp between a
    # cache written on the CPU and a start on the GPU (docs/performance.md, the FP8 cache); a
    # multiply rounds the same on both (register row 27).
    scale = amax.clamp(min=MIN_SCALE) * (1.0 / E4M3_MAX)
    values = (rows.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


class Fp8Linear(torch.nn.Module):
    """A `torch.nn.Linear` whose weight is stored in e4m3 with one scale per output row,
    and whose input is quantized per token on each call."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = rowwise_fp8(linear.weight.detach())
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # (out, in)
        # (1, out): the layout the scaled matmul wants for the second operand's row scales.
        self.weight_scale = torch.nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scale = rowwise_fp8(x.reshape(-1, self.in_features))
        # weight.t() is column-major, as the scaled matmul needs its second operand.
        out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype, use_fast_accum=FAST_ACCUMULATION)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def quantize_blocks(transformer: torch.nn.Module, device: torch.device,
                    keep: tuple[str, ...] | frozenset[str] = DEFAULT_FP8_KEEP_BF16) -> int:
    """Replace the linears inside the transformer blocks by `Fp8Linear`s on `device`, one
    at a time, so the unquantized transformer never has to fit on the device whole. The
    linears named in `keep` (names inside a block, see BLOCK_LINEARS), the embedders and
    the output projection (small and closest to the pixels) stay as they are. Returns how
    many linears were replaced."""
    replaced = 0
    for block in transformer.transformer_blocks:
        for name, child in list(block.named_modules()):
            if type(child) is torch.nn.Linear and name not in keep:
                parent_name, _, attribute = name.rpartition(".")
                setattr(block.get_submodule(parent_name), attribute, Fp8Linear(child.to(device)))
                replaced += 1
    return replaced


def prepared_bytes(transformer: torch.nn.Module, keep: tuple[str, ...] | frozenset[str],
                   only: tuple[str, ...] | None = None) -> int:
    """GPU bytes of `transformer` once `quantize_blocks(keep=keep)` has run: one byte per
    weight of a quantized linear plus its row scales, the rest as it is stored (also right
    for a transformer already quantized). `only`: the blocks' linears of these names alone
    (what a LoRA set touching them takes)."""
    total = 0
    for name, parameter in transformer.named_parameters():
        parts = _packed_parts(name)
        if parts is not None:  # packed (already FP8): each of its linears' equal share
            share = len(parts) if only is None else sum(part in only for part in parts)
            total += parameter.numel() * parameter.element_size() * share // len(parts)
            continue
        block_linear = _block_linear_name(name)
        if only is not None and block_linear not in only:
            continue
        quantized = block_linear is not None and block_linear not in keep
        if quantized and name.endswith(".weight") and parameter.dtype != torch.float8_e4m3fn:
            rows = parameter.shape[0]
            total += parameter.numel() + rows * torch.finfo(torch.float32).bits // 8
        else:
            total += parameter.numel() * parameter.element_size()
    return total


def _packed_parts(parameter_name: str) -> tuple[str, ...] | None:
    """'transformer_blocks.3.attn.packed_qkv.weight' -> ('attn.to_q', 'attn.to_k', 'attn.to_v')."""
    parts = parameter_name.split(".")
    if parts[0] != "transformer_blocks" or len(parts) != 5 or parts[2] != "attn":
        return None
    names = PACKED_PROJECTIONS.get(parts[3])
    return None if names is None else tuple(f"attn.{name}" for name in names)


def _block_linear_name(parameter_name: str) -> str | None:
    """'transformer_blocks.3.img_mod.1.weight' -> 'img_mod.1' (None outside the block linears)."""
    parts = parameter_name.split(".")
    if parts[0] != "transformer_blocks" or len(parts) < 4:
        return None
    name = ".".join(parts[2:-1])
    return name if name in BLOCK_LINEARS else None
