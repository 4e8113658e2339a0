"""Where the VAE's GPU memory goes, with the full-size Qwen VAEs (random weights).

    python tools/vae_memory.py --out bench/results --label vae-memory

Measures, for the edit model's VAE (one frame) and Layered's (N layers, one frame each),
the peak above the memory held before the call, for the whole call and for each part of
the decoder (conv_in, the mid block, each up block, conv_out): with diffusers' own path
(its video feature cache), with `src.models.memory.image_vae.for_images` (no cache), and whether the two
give the same bits; the layers decoded one at a time (`enable_slicing`) and their
difference from one batch; VAE tiling's peak and its pixel deviation; the encode of one
reference image both ways; and the mid block's single-head attention (head dim 384)
under each SDPA kernel. Writes `<out>/<gpu>-<date>-<label>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.models.memory import image_vae# noqa: E402
from tools.bench_results import write_results  # noqa: E402

GIB = 2**30
LATENT_CHANNELS = 16
SPATIAL_COMPRESSION = 8


def peak_above_start(call) -> tuple[object, float]:
    """(result, GiB the call allocated at its peak above what was held before it)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    return result, round((torch.cuda.max_memory_allocated() - start) / GIB, 2)


class PartPeaks:
    """Peak memory above the part's start, for each named child of the decoder."""

    def __init__(self, decoder):
        self.peaks: dict[str, float] = {}
        self.handles = []
        parts = {"conv_in": decoder.conv_in, "mid_block": decoder.mid_block, "conv_out": decoder.conv_out}
        parts.update({f"up_blocks.{i}": block for i, block in enumerate(decoder.up_blocks)})
        for name, module in parts.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._end(name)))
        self._started: dict[str, int] = {}

    def _start(self, name: str) -> None:
        torch.cuda.synchronize()
        self._started[name] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def _end(self, name: str) -> None:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - self._started[name]) / GIB
        self.peaks[name] = round(max(self.peaks.get(name, 0.0), peak), 2)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def random_vae(**kwargs):
    from diffusers import AutoencoderKLQwenImage

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return AutoencoderKLQwenImage(**kwargs).eval()
    finally:
        torch.set_default_dtype(previous)


def latents(frames: int, side: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator("cuda").manual_seed(seed)
    shape = (frames, LATENT_CHANNELS, 1, side // SPATIAL_COMPRESSION, side // SPATIAL_COMPRESSION)
    return torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)


def as_8bit(decoded: torch.Tensor) -> torch.Tensor:
    """What the pipelines' postprocess turns into pixels: [-1, 1] to 0..255."""
    return ((decoded.float().clamp(-1, 1) / 2 + 0.5) * 255).round().to(torch.uint8)


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    delta = (as_8bit(a).int() - as_8bit(b).int()).abs()
    return {"equal_8bit": bool((delta == 0).all()), "max_abs_8bit": int(delta.max()),
            "mean_abs_8bit": round(float(delta.float().mean()), 4), "bitwise_equal": bool(torch.equal(a, b))}


def with_part_peaks(vae, call) -> tuple[object, float, dict]:
    parts = PartPeaks(vae.decoder)
    try:
        result, peak = peak_above_start(call)
    finally:
        parts.remove()
    return result, peak, parts.peaks


@torch.no_grad()
def decode_case(input_channels: int, frames: int, side: int, tiling: bool) -> dict:
    """One VAE: diffusers' path, then `for_images`, then slicing and tiling on top."""
    vae = random_vae(input_channels=input_channels)
    z = latents(frames, side)
    result = {"frames": frames, "side": side}
    stock, result["stock_peak_gib"], result["stock_parts_peak_gib"] = with_part_peaks(vae, lambda: vae.decode(z).sample)
    image_vae.for_images(vae)
    lean, result["for_images_peak_gib"], result["for_images_parts_peak_gib"] = with_part_peaks(
        vae, lambda: vae.decode(z).sample)
    result["for_images_vs_stock"] = difference(lean, stock)
    del stock
    if frames > 1:
        vae.enable_slicing()
        sliced, result["for_images_one_at_a_time_peak_gib"] = peak_above_start(lambda: vae.decode(z).sample)
        vae.disable_slicing()
        result["one_at_a_time_vs_batch"] = difference(sliced, lean)
        del sliced
    if tiling:
        vae.enable_tiling()
        tiled, result["tiled_peak_gib"] = peak_above_start(lambda: vae.decode(z).sample)
        vae.disable_tiling()
        result["tiled_vs_whole"] = difference(tiled, lean)
    return result


@torch.no_grad()
def encode_case(input_channels: int, side: int) -> dict:
    vae = random_vae(input_channels=input_channels)
    x = torch.rand(1, input_channels, 1, side, side, device="cuda", dtype=torch.bfloat16) * 2 - 1
    result = {"side": side}
    stock, result["stock_peak_gib"] = peak_above_start(lambda: vae.encode(x).latent_dist.mode())
    image_vae.for_images(vae)
    lean, result["for_images_peak_gib"] = peak_above_start(lambda: vae.encode(x).latent_dist.mode())
    result["for_images_bitwise_equal"] = bool(torch.equal(lean, stock))
    return result


@torch.no_grad()
def attention_kernels(side: int, dim: int = 384) -> dict:
    """The decoder mid block's attention at `side` output pixels: one head of `dim`."""
    tokens = (side // SPATIAL_COMPRESSION) ** 2
    q, k, v = (torch.randn(1, 1, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    result = {"tokens": tokens, "head_dim": dim}
    reference = None
    for name, backend in (("default", None), ("math", SDPBackend.MATH), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            def run():
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            out, peak = peak_above_start(run)
        except RuntimeError as exc:
            result[name] = {"error": str(exc).splitlines()[0][:160]}
            continue
        entry = {"peak_gib": peak}
        if reference is None:
            reference = out
        else:
            entry["bitwise_equal_default"] = bool(torch.equal(out, reference))
            entry["max_abs_vs_default"] = float((out.float() - reference.float()).abs().max())
        result[name] = entry
        del out
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="vae-memory")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "label": args.label}
    results["attention_2048"] = attention_kernels(2048)
    results["attention_1024"] = attention_kernels(1024)
    cases = (("edit_decode", 3, 1, 1024, True), ("edit_decode", 3, 1, 2048, True),
             ("layered_decode", 4, 4, 640, False), ("layered_decode", 4, 10, 640, False),
             ("layered_decode", 4, 10, 1024, False))
    for name, channels, frames, side, tiling in cases:
        results.setdefault(name, []).append(decode_case(channels, frames, side, tiling))
        print(json.dumps(results[name][-1]), flush=True)
        write_results(results, Path(args.out))
    results["edit_encode"] = [encode_case(3, side) for side in (1024, 2048)]
    results["layered_encode"] = [encode_case(4, 1024)]
    write_results(results, Path(args.out))

if __name__ == "__main__":
    main()
