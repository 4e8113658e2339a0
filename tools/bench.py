"""Benchmark of the worker's own job path on a GPU, with full-size Qwen models built in
memory from the published configs with random weights (speed does not depend on the
values; nothing can be downloaded on the GPU machine).

    COMPILE=true python tools/bench.py --out bench/results --label ours   # all cases, with regional compile
    python tools/bench.py --label stock                                    # the defaults: stock diffusers
    python tools/bench.py --cases edit,lightning4
    python tools/bench.py --levers --label levers     # each speed lever alone, transformer passes only
    python tools/bench.py --levers stock,fp8_compile_sglang,fp8_compile_cfg_batch --label levers-recipes
    QUANTIZE=fp8 COMPILE=true python tools/bench.py --label fp8
    python tools/bench.py --gpu-memory-gib 22 --cases edit2048_3,decompose1024_10 --label corners-24gb
    QUANTIZE=fp8 COMPILE=true python tools/bench.py --cases nocfg4,lightning4,lightning4_again,nocfg4 --breakdown
    python tools/bench.py --cases lightning_fp8_deviation --label lightning-fp8-deviation
    CAPTION_DECODER=graphed python tools/bench.py --cases decompose,decompose_caption --label caption-graphed
    QUANTIZE=fp8 COMPILE=true python tools/bench.py --cases lora_switching --published-on-disk /tmp/published         --label lora-switching

Each case runs `Worker.handle` (decode, pipeline, encode; no bucket) with the settings
the environment gives (COMPILE, ATTENTION_BACKEND, QUANTIZE, MEMORY_MODE, CAPTION_DECODER, as the worker
reads them; MEMORY_MODE defaults to resident here; `--gpu-memory-gib` caps the memory as a
smaller card would have, tells the worker's memory plan so (GPU_MEMORY_GIB), and leaves
MEMORY_MODE to `auto`) and records the per-stage times, the memory levers a job ran with
(or its refusal),
seconds per transformer pass, useful TFLOP/s and its share of the card's bf16 peak, and
peak GPU memory. Writes `<out>/<gpu>-<date>-<label>.json`.

What the Lightning, `lora_switching` and `--levers` cases measure, and how: docs/performance.md,
"The bench's cases".
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.job.codec import png_base64  # noqa: E402
from tools.bench_results import write_results  # noqa: E402
from src.job.schema import JobRequest  # noqa: E402
from src.models.fp8.linear import BLOCK_LINEARS, MODULATION_LINEARS  # noqa: E402
from src.models.lora.fp8_fusing import PublishedWeights, PublishedWeightsError, touched_linears  # noqa: E402
from src.models.lora.adapters import FusedLoras, adapters_for  # noqa: E402
from src.models.host import ModelHost, device_name  # noqa: E402
from src.models.files.snapshots import main_snapshot, write_snapshot  # noqa: E402
from src.models.files.tensors import ModelRef  # noqa: E402
from src.plumbing.config import Settings  # noqa: E402
from src.plumbing.metering import price_for  # noqa: E402
from src.serving.startup import get_ready  # noqa: E402
from src.serving.worker import Worker  # noqa: E402

# Qwen2.5-VL-7B-Instruct, the text encoder of every Qwen-Image model (its config.json).
TEXT_ENCODER_7B = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
VISION_7B = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}
# The real processor's pixel bounds (Qwen2.5-VL): the condition image becomes ~190 tokens.
PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
BF16_PEAK_TFLOPS = {"H100": 800.0, "H200": 800.0}  # dense bf16 matmul measured on these cards (~790-800)
LIGHTNING_RANK = 64
# The real Lightning file adapts every block linear but the modulation.
LIGHTNING_LAYERS = tuple(name for name in BLOCK_LINEARS if name not in MODULATION_LINEARS)


def random_module(factory):
    """Build a module straight on the GPU in bf16 with its default random init."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return factory().eval()
    finally:
        torch.set_default_dtype(previous)


class NamedRandomWeights:
    """The edit transformer's block linears as a function of their names: random as
    `torch.nn.Linear` initialises them (uniform within 1/sqrt(in_features)), from a seed
    per name, made on the GPU in bf16. Written into the model before it is quantized, and
    given again to the FP8 LoRA fuse as its published originals: the same values, with no
    snapshot and nothing kept in memory."""

    def __init__(self, transformer: torch.nn.Module, device: str = "cuda"):
        self.device = device
        self.shapes = {name: tuple(module.weight.shape) for name, module in transformer.named_modules()
                       if type(module) is torch.nn.Linear and name.startswith("transformer_blocks.")}

    def __getitem__(self, name: str) -> torch.Tensor:
        out_features, in_features = self.shapes[name]
        generator = torch.Generator(self.device).manual_seed(zlib.crc32(name.encode()))
        uniform = torch.rand(out_features, in_features, generator=generator, device=self.device)
        return ((uniform * 2 - 1) / math.sqrt(in_features)).to(torch.bfloat16)

    def check(self, linears: list[str]) -> None:
        """As `PublishedWeights.check`: every linear a LoRA may touch is there."""
        missing = [name for name in linears if name not in self.shapes]
        if missing:
            raise PublishedWeightsError(f"no published weight for {len(missing)} linears (first: {missing[0]})")

    def spans(self, linears: list[str]) -> list:
        """As `PublishedWeights.spans`: nothing on disk, so nothing to read ahead."""
        return []

    def write_into(self, transformer: torch.nn.Module) -> None:
        with torch.no_grad():
            for name in self.shapes:
                transformer.get_submodule(name).weight.copy_(self[name])

    def save_snapshot(self, folder: Path, names: list[str]) -> Path:
        """`names` as a sharded diffusers `transformer` folder (one shard per block, with
        the index), each file then dropped from the page cache: the fuse reads them cold,
        as the worker reads its snapshot on a fresh machine."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for block in sorted({int(name.split(".")[1]) for name in names}):
            shard = f"block-{block:02d}.safetensors"
            tensors = {f"{name}.weight": self[name].cpu() for name in names if name.split(".")[1] == str(block)}
            save_file(tensors, str(folder / shard))
            weight_map.update(dict.fromkeys(tensors, shard))
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        os.sync()
        for shard in set(weight_map.values()):
            with open(folder / shard, "rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return folder


class RandomFullSizeHost(ModelHost):
    """`ModelHost` whose models are full-size and random, built in memory; the job path
    (for_operation, swapping, LoRA fusing) is the worker's own."""

    def __init__(self, settings: Settings, tiny_snapshot: Path, published_folder: Path | None = None):
        super().__init__(settings)  # the tiny models sit in the HF cache: the references resolve
        self.tiny_snapshot = tiny_snapshot
        self.edit_ref = ModelRef("Qwen/Qwen-Image-Edit-2511", "random-init", tiny_snapshot)
        self.layered_ref = ModelRef("Qwen/Qwen-Image-Layered", "random-init", tiny_snapshot)
        self.published_folder = published_folder  # --published-on-disk
        self.named_weights: NamedRandomWeights | None = None

    def edit_published_weights(self):
        """The FP8 LoRA fuse's bf16 originals: regenerated, or read from the snapshot written
        with --published-on-disk."""
        if self.published_folder is not None:
            return PublishedWeights(self.published_folder, self.dtype)
        return self.named_weights

    def load_edit(self):
        from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                               QwenImageTransformer2DModel)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from src.models.vl_processor import load_processor

        processor = load_processor(str(self.tiny_snapshot))
        processor.image_processor.min_pixels = PROCESSOR_MIN_PIXELS
        processor.image_processor.max_pixels = PROCESSOR_MAX_PIXELS
        processor.image_processor.size = {"shortest_edge": PROCESSOR_MIN_PIXELS, "longest_edge": PROCESSOR_MAX_PIXELS}
        config = Qwen2_5_VLConfig(text_config=TEXT_ENCODER_7B, vision_config=VISION_7B,
                                  image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
        pipeline = QwenImageEditPlusPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(self.tiny_snapshot / "scheduler"),
            vae=random_module(AutoencoderKLQwenImage),
            text_encoder=random_module(lambda: Qwen2_5_VLForConditionalGeneration(config)),
            tokenizer=processor.tokenizer,
            processor=processor,
            transformer=random_module(lambda: QwenImageTransformer2DModel(zero_cond_t=True)),
        )
        pipeline.set_progress_bar_config(disable=True)
        self.named_weights = NamedRandomWeights(pipeline.transformer)
        self.named_weights.write_into(pipeline.transformer)
        if self.published_folder is not None:
            lightning = [name for name in self.named_weights.shapes if name.split(".", 2)[2] in LIGHTNING_LAYERS]
            start = time.perf_counter()
            self.named_weights.save_snapshot(self.published_folder, lightning)
            print(f"published weights written to {self.published_folder} in {time.perf_counter() - start:.1f} s",
                  flush=True)
        return pipeline  # built on the GPU (fast); `prepare` then places it as the memory mode says

    def load_layered(self):
        from diffusers import AutoencoderKLQwenImage, QwenImageLayeredPipeline, QwenImageTransformer2DModel

        pipeline = QwenImageLayeredPipeline(
            scheduler=self.edit.scheduler, vae=random_module(lambda: AutoencoderKLQwenImage(input_channels=4)),
            text_encoder=self.edit.text_encoder, tokenizer=self.edit.tokenizer, processor=self.edit.processor,
            transformer=random_module(lambda: QwenImageTransformer2DModel(use_layer3d_rope=True,
                                                                          use_additional_t_cond=True)),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


class PassCounter:
    """Counts transformer forward passes and the tokens in each (image + text streams)."""

    def __init__(self):
        self.passes, self.tokens = 0, []

    def hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        self.passes += 1
        self.tokens.append((hidden.shape[1], text.shape[1] if text is not None else 0))


class StageClock:
    """Where a job's inference time goes: seconds inside the text encoder, the transformer
    passes and the VAE, each bracketed by device syncs (so `--breakdown` runs lose a little
    CPU-GPU overlap); the rest is the pipeline's own Python, the scheduler and the image
    conversions. Also each stage's peak GPU memory above what was allocated when it began:
    where a job's memory peak comes from."""

    STAGES = ("text_encoder", "transformer", "vae_encode", "vae_decode")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.peaks = dict.fromkeys(self.STAGES, 0)
        self.case_peak = 0  # the stages reset torch's peak counter: the case's own peak is kept here
        self.watched: set[int] = set()

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @staticmethod
    def allocated(peak: bool = False) -> int:
        """Bytes torch holds on the GPU now (or at its peak); 0 without CUDA (the CPU test)."""
        if not torch.cuda.is_available():
            return 0
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()

    def timed(self, stage: str, call):
        # functools.wraps keeps the wrapped method's signature (inspect follows __wrapped__):
        # transformers' `generate` checks its model kwargs against the text encoder's
        # `forward` signature, and refused the captioning inputs behind a bare (*args, **kwargs).
        @functools.wraps(call)
        def wrapper(*args, **kwargs):
            self.sync()
            self.case_peak = max(self.case_peak, self.allocated(peak=True))
            held = self.allocated()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[stage] += time.perf_counter() - start
                peak = self.allocated(peak=True)
                self.case_peak = max(self.case_peak, peak)
                self.peaks[stage] = max(self.peaks[stage], peak - held)
        return wrapper

    def attach(self, pipeline) -> None:
        """Watch a pipeline's models (a model shared by two pipelines is watched once)."""
        for stage, owner, names in (("text_encoder", pipeline.text_encoder, ("forward",)),
                                    ("transformer", pipeline.transformer, ("forward",)),
                                    ("vae_encode", pipeline.vae, ("encode",)),
                                    ("vae_decode", pipeline.vae, ("decode",))):
            if (id(owner), stage) in self.watched:
                continue
            self.watched.add((id(owner), stage))
            for name in names:  # instance attributes: the module's own forward stays as it is
                setattr(owner, name, self.timed(stage, getattr(owner, name)))

    def report(self, inference_s: float) -> dict:
        report = {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}
        report["rest"] = round(inference_s - sum(self.seconds.values()), 3)
        report["peak_above_stage_start_gib"] = {stage: round(peak / 2**30, 2) for stage, peak in self.peaks.items()}
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.peaks = dict.fromkeys(self.STAGES, 0)
        return report


def pass_flops(image_tokens: int, text_tokens: int, dim: int = 3072, layers: int = 60) -> float:
    """Useful FLOPs of one transformer pass: the linears (24·d² per token per block over
    both streams) plus attention (4·L²·d per block)."""
    length = image_tokens + text_tokens
    return layers * (24 * dim * dim * length + 4 * length * length * dim)


def photo_like(size, seed) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((size[1] // 8, size[0] // 8, 3), generator=generator)
    return Image.fromarray((noise * 255).byte().numpy()).resize(size, Image.Resampling.BICUBIC)


def write_lightning_lora(hf_home: Path, settings: Settings) -> None:
    """A random rank-64 LoRA with the real Lightning file's layout (kohya keys with alpha,
    12 layers per block), in the HF-cache place the worker looks for it."""
    from safetensors.torch import save_file

    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for block in range(60):
        for layer in LIGHTNING_LAYERS:
            out_features = 3072 * 4 if layer.endswith("net.0.proj") else 3072
            in_features = 3072 * 4 if layer.endswith("net.2") else 3072
            prefix = f"transformer_blocks.{block}.{layer}"
            tensors[f"{prefix}.lora_down.weight"] = (torch.randn(LIGHTNING_RANK, in_features, generator=generator) * 0.01).bfloat16()
            tensors[f"{prefix}.lora_up.weight"] = (torch.randn(out_features, LIGHTNING_RANK, generator=generator) * 0.01).bfloat16()
            tensors[f"{prefix}.alpha"] = torch.tensor(8.0).bfloat16()

    def fill(snapshot: Path) -> None:
        for steps in (4, 8):
            save_file(tensors, str(snapshot / settings.lightning_files[steps]))

    write_snapshot(hf_home, settings.lightning_repo, "0" * 40, fill)


CUSTOM_RANK = 16
CUSTOM_LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def write_custom_lora(folder: Path) -> Path:
    """A small random LoRA (rank 16 on the image stream's attention projections of every
    block, diffusers keys): the kind of customer LoRA a mixed endpoint serves."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for block in range(60):
        for layer in CUSTOM_LAYERS:
            prefix = f"transformer.transformer_blocks.{block}.{layer}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(CUSTOM_RANK, 3072, generator=generator) * 0.01).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(3072, CUSTOM_RANK, generator=generator) * 0.01).bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "custom_rank16_attention.safetensors"
    save_file(tensors, str(path))
    return path


CASES = {  # in the order they run: the edit transformer's cases first, then Layered's
    "edit": dict(operation="edit", images=1, num_inference_steps=40, true_cfg_scale=4.0),
    "nocfg4": dict(operation="edit", images=1, num_inference_steps=4, true_cfg_scale=1.0),
    # Several results per job: four images of one prompt, and two prompts of two images.
    "nocfg4_x4": dict(operation="edit", images=1, num_inference_steps=4, true_cfg_scale=1.0, num_images=4),
    "nocfg4_2x2": dict(operation="edit", images=1, num_inference_steps=4, true_cfg_scale=1.0, num_images=2,
                       prompt=["make the sky purple", "make the grass blue"]),
    "lightning4": dict(operation="edit", images=1, lightning=4),
    "lightning4_again": dict(operation="edit", images=1, lightning=4),
    "edit2": dict(operation="edit_multi", images=2, num_inference_steps=40, true_cfg_scale=4.0),
    "decompose": dict(operation="decompose", prompt="a room with a sofa and a lamp", layers=4, resolution=640,
                      num_inference_steps=50),
    "decompose_caption": dict(operation="decompose", prompt="", layers=4, resolution=640, num_inference_steps=50),
    # The schema's memory corners (2 steps: the peak does not grow with steps).
    "edit2048": dict(operation="edit", images=1, num_inference_steps=2, true_cfg_scale=4.0, width=2048, height=2048),
    "edit2048_3": dict(operation="edit_multi", images=3, num_inference_steps=2, true_cfg_scale=4.0,
                       width=2048, height=2048),
    "decompose1024_10": dict(operation="decompose", prompt="a room", layers=10, resolution=1024,
                             num_inference_steps=2),
    "decompose640_10": dict(operation="decompose", prompt="a room", layers=10, resolution=640,
                            num_inference_steps=2),
}


def run_case(worker: Worker, name: str, spec: dict, counter: PassCounter, clock: StageClock | None = None) -> dict:
    spec = dict(spec)
    images = [photo_like((1024, 1024), seed) for seed in range(spec.pop("images", 1))]
    job = {"image_base64": png_base64(images[0]), "prompt": spec.pop("prompt", "make the sky purple"),
           "seed": 1, "return_base64": True, **spec}
    if len(images) > 1:
        job["images_base64"] = [png_base64(image) for image in images[1:]]
    if spec["operation"] != "decompose":
        job.setdefault("width", 1024)
        job.setdefault("height", 1024)
    counter.passes, counter.tokens = 0, []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if clock:
        clock.case_peak = 0
    out = worker.handle({"id": f"bench-{name}", "input": job})
    torch.cuda.synchronize()
    if "error" in out:
        return {"case": name, "error": out["error"]}
    inference_s = out["timings_ms"]["inference"] / 1000
    flops = sum(pass_flops(image, text) for image, text in counter.tokens)
    peak = BF16_PEAK_TFLOPS["H200" if "H200" in torch.cuda.get_device_name() else "H100"]
    tflops = flops / inference_s / 1e12 if counter.passes else 0.0
    return {
        "case": name, "job": {k: v for k, v in job.items() if "base64" not in k},
        "timings_ms": out["timings_ms"], "results": len(out["images"]), "passes": counter.passes,
        "memory_levers": out.get("memory_levers", []),
        "tokens_per_pass": counter.tokens[0] if counter.tokens else None,
        "s_per_pass": round(inference_s / counter.passes, 4) if counter.passes else None,
        "useful_tflops": round(tflops, 1), "share_of_peak": round(tflops / peak, 3),
        "peak_gpu_gib": round(max(torch.cuda.max_memory_allocated(), clock.case_peak if clock else 0) / 2**30, 1),
        "cost_usd": out["cost_usd"],
        **({"inference_breakdown_s": clock.report(inference_s)} if clock else {}),
    }


class KwargsCatcher:
    """Keeps the keyword arguments of a module's first `calls` forward calls."""

    def __init__(self, module, calls: int = 1):
        self.calls, self.kept = calls, []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    @property
    def kwargs(self) -> dict | None:
        return self.kept[0] if self.kept else None

    def hook(self, module, args, kwargs):
        if len(self.kept) < self.calls:
            self.kept.append(dict(kwargs))


def transformer_inputs(worker: Worker, transformer, images: int) -> dict:
    """The kwargs of the edit transformer's pass in a 1024x1024 job with `images` references."""
    catcher = KwargsCatcher(transformer)
    # 2 steps: with 1, the models' scheduler gives a NaN timestep (see src/serving/response.py).
    run_case(worker, f"capture{images}", dict(operation="edit", images=images, num_inference_steps=2,
                                              true_cfg_scale=1.0), PassCounter())
    catcher.handle.remove()
    # Random weights give latents and text states far from a trained model's (often not
    # finite); for a deviation that means something, the streams get unit-normal values.
    generator = torch.Generator("cuda").manual_seed(images)
    for key in ("hidden_states", "encoder_hidden_states"):
        value = catcher.kwargs[key]
        catcher.kwargs[key] = torch.randn(value.shape, generator=generator, device="cuda", dtype=value.dtype)
    return catcher.kwargs


def cfg_pair_inputs(worker: Worker, transformer) -> tuple[dict, dict]:
    """The kwargs of one true-CFG step's two passes (prompt, then negative prompt) in a
    1024x1024 edit with one reference: the same latents, texts of their own lengths. As in
    `transformer_inputs`, the streams get unit-normal values."""
    catcher = KwargsCatcher(transformer, calls=2)
    run_case(worker, "capture-cfg", dict(operation="edit", images=1, num_inference_steps=2, true_cfg_scale=4.0),
             PassCounter())
    catcher.handle.remove()
    cond, uncond = catcher.kept
    generator = torch.Generator("cuda").manual_seed(7)
    latents = torch.randn(cond["hidden_states"].shape, generator=generator, device="cuda",
                          dtype=cond["hidden_states"].dtype)
    for kwargs in (cond, uncond):
        kwargs["hidden_states"] = latents
        text = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = torch.randn(text.shape, generator=generator, device="cuda", dtype=text.dtype)
    return cond, uncond


def uncompile(transformer) -> None:
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()


def tiny_models(hf_home: Path) -> Path:
    """The tiny models' HF cache at `hf_home` (built if missing): the configs, tokenizer and
    processor the full-size random models are built from."""
    subprocess.run([sys.executable, "tools/make_tiny_models.py", "--hf-home", str(hf_home)], check=True,
                   stdout=subprocess.DEVNULL)
    return hf_home


def timed_passes(transformer, kwargs: dict, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(seconds of the first call, mean seconds of the next `repeats`, the output)."""
    kwargs = {**kwargs, "return_dict": False}
    with torch.inference_mode():
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = transformer(**kwargs)[0]
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeats):
            transformer(**kwargs)
        torch.cuda.synchronize()
    return first, (time.perf_counter() - start) / repeats, out.float()


# Kernel families by name (CUDA kernel names as the profiler reports them), for --profile.
KERNEL_FAMILIES = (("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "scaled_mm")),
                   ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
                   ("compiled (Triton)", ("triton_",)))


def kernel_profile(transformer, kwargs: dict, top: int = 20) -> dict:
    """One pass under torch.profiler: each kernel's GPU milliseconds in the pass (top
    `top`), and the sums per family (GEMMs, attention, the compiled Triton kernels, the
    rest): where a pass's time goes, measured (`--levers ... --profile`)."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = {**kwargs, "return_dict": False}
    with torch.inference_mode():
        transformer(**kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            transformer(**kwargs)
            torch.cuda.synchronize()
    kernels = [(event.key, getattr(event, "self_device_time_total", 0.0) / 1e3, event.count)
               for event in prof.key_averages() if getattr(event, "self_device_time_total", 0.0) > 0]
    kernels.sort(key=lambda kernel: -kernel[1])
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        family = next((label for label, marks in KERNEL_FAMILIES if any(m in name.lower() for m in marks)), "other")
        families[family] = families.get(family, 0.0) + ms
    return {"gpu_ms": round(sum(ms for _, ms, _ in kernels), 2),
            "families_ms": {family: round(ms, 2) for family, ms in families.items()},
            "top": [{"kernel": name[:160], "ms": round(ms, 3), "calls": count} for name, ms, count in kernels[:top]]}


def deviation(out: torch.Tensor, reference: torch.Tensor) -> dict:
    return {"rel_l2": float((out - reference).norm() / reference.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)),
            "max_abs": float((out - reference).abs().max())}


LEVER_SETTINGS = ("COMPILE", "ATTENTION_BACKEND", "QUANTIZE", "MEMORY_MODE", "CAPTION_DECODER", "PRELOAD",
                  "CFG_BATCH", "FP8_KEEP_BF16", "LORA_FUSE_AFTER", "LORA_BRANCH_RANK", "LIGHTNING_RESIDENT_STEPS",
                  "COMPILE_CACHE_DIR", "FP8_PACK_QKV")
LEVERS = {  # name: (attention backend, compile, FP8 recipe or None for bf16, CFG as one batch of two, FP8_PACK_QKV)
    "stock": ("sdpa", False, None, False, False),
    "attention_cudnn": ("cudnn", False, None, False, False),
    "attention_flash": ("flash", False, None, False, False),
    "compile": ("sdpa", True, None, False, False),
    "compile_cudnn": ("cudnn", True, None, False, False),
    "cfg_batch": ("sdpa", False, None, True, False),
    "compile_cfg_batch": ("sdpa", True, None, True, False),
    # "default": the run's FP8_KEEP_BF16; the others name FP8_RECIPES (src/plumbing/config.py).
    "fp8": ("sdpa", False, "default", False, False),
    "fp8_compile": ("sdpa", True, "default", False, False),
    "fp8_compile_cfg_batch": ("sdpa", True, "default", True, False),
    "fp8_compile_all": ("sdpa", True, "all", False, False),
    "fp8_compile_modulation": ("sdpa", True, "modulation", False, False),
    "fp8_compile_sglang": ("sdpa", True, "sglang", False, False),
    "fp8_compile_vllm_omni": ("sdpa", True, "vllm-omni", False, False),
    # Q/K/V packed (src/models/fp8/packed.py); each is also compared with its unpacked twin
    # (the same name without "_packed") when that ran before it.
    "fp8_packed": ("sdpa", False, "default", False, True),
    "fp8_compile_packed": ("sdpa", True, "default", False, True),
    "fp8_compile_sglang_packed": ("sdpa", True, "sglang", False, True),
}
PACKED_SUFFIX = "_packed"


def set_precision(transformer, recipe: tuple[str, ...] | None, named: NamedRandomWeights, device,
                  packed: bool = False) -> None:
    """The block linears back in bf16 (the named random weights, the biases kept), then
    quantized keeping `recipe` in bf16 (None: all stay bf16), their Q/K/V packed when
    `packed`. Lets one run measure every recipe, in any order."""
    from src.models.fp8.linear import Fp8Linear, quantize_blocks
    from src.models.fp8.packed import pack_projections, unpack_projections

    unpack_projections(transformer)
    with torch.no_grad():
        for name, module in list(transformer.named_modules()):
            if isinstance(module, Fp8Linear):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                         device=device, dtype=torch.bfloat16)
                linear.weight.copy_(named[name])
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                parent, _, attribute = name.rpartition(".")
                setattr(transformer.get_submodule(parent), attribute, linear)
    if recipe is not None:
        quantize_blocks(transformer, device, keep=frozenset(recipe))
        if packed:
            pack_projections(transformer)


def timed_cfg_step(transformer, cond: dict, uncond: dict, batched: bool, repeats: int):
    """(seconds of the first call, mean seconds of one true-CFG step, the two outputs): the
    two passes one after the other, or as one batch of two (src/models/cfg_batch.py)."""
    from src.models.cfg_batch import _batch_of_two

    if batched:
        prompt = (cond["encoder_hidden_states"], cond.get("encoder_hidden_states_mask"))
        negative = (uncond["encoder_hidden_states"], uncond.get("encoder_hidden_states_mask"))
        first, mean, both = timed_passes(transformer, _batch_of_two(cond, prompt, negative), repeats)
        return first, mean, (both[:1], both[1:])
    first, mean, out_cond = timed_passes(transformer, cond, repeats)
    first_u, mean_u, out_uncond = timed_passes(transformer, uncond, repeats)
    return first + first_u, mean + mean_u, (out_cond, out_uncond)


def measure_levers(worker: Worker, names: list[str], record: dict, out_dir: Path, repeats: int = 5,
                   profile: bool = False) -> None:
    """Each lever's figures into `record["levers"]`, written after each (a run cut short keeps them)."""
    from src.models.acceleration import ATTENTION_BACKENDS, regional_compile
    from src.models.fp8.packed import pack_projections, unpack_projections
    from src.plumbing.config import FP8_RECIPES

    transformer = worker.host.edit.transformer
    one, two = transformer_inputs(worker, transformer, 1), transformer_inputs(worker, transformer, 2)
    cond, uncond = cfg_pair_inputs(worker, transformer)
    results = record.setdefault("levers", [])
    tokens = (one["hidden_states"].shape[1], one["encoder_hidden_states"].shape[1])
    record["cfg_step_tokens"] = [(kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1])
                                 for kwargs in (cond, uncond)]
    reference, reference_step, precision = None, None, None
    outputs: dict[str, tuple[torch.Tensor, tuple]] = {}  # each lever's pass and CFG step, for its packed twin
    recipes = {**FP8_RECIPES, "default": tuple(sorted(worker.settings.fp8_keep_bf16))}
    for name in names:
        attention, compiled, recipe, batched, packed = LEVERS[name]
        keep = None if recipe is None else recipes[recipe]
        uncompile(transformer)
        if precision is not None and keep is not None and precision[0] == keep and precision[1] != packed:
            # The same FP8 linears, only (un)packed: no round trip through bf16, which ran out
            # of memory on an 80 GB card going back from FP8 (docs/performance.md, Q/K/V packed).
            (pack_projections if packed else unpack_projections)(transformer)
            precision = (keep, packed)
        elif (keep, packed) != precision:
            set_precision(transformer, keep, worker.host.named_weights, worker.host.device, packed)
            precision = (keep, packed)
        transformer.set_attention_backend(ATTENTION_BACKENDS[attention])
        if compiled:
            regional_compile(transformer)
        try:
            first, per_pass, out = timed_passes(transformer, one, repeats)
            first_two, per_pass_two, _ = timed_passes(transformer, two, repeats)
            first_step, per_step, step = timed_cfg_step(transformer, cond, uncond, batched, repeats)
        except Exception as exc:  # a kernel this build lacks: say so, go on
            results.append({"lever": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(json.dumps(results[-1]), flush=True)
            continue
        reference = out if reference is None else reference
        reference_step = step if reference_step is None else reference_step
        outputs[name] = (out, step)
        twin = outputs.get(name.removesuffix(PACKED_SUFFIX)) if name.endswith(PACKED_SUFFIX) else None
        peak = BF16_PEAK_TFLOPS["H200" if "H200" in torch.cuda.get_device_name() else "H100"]
        results.append({
            "lever": name, "attention": attention, "compile": compiled, "fp8": recipe is not None,
            "fp8_keep_bf16": None if keep is None else sorted(keep), "fp8_recipe": recipe, "cfg_batch": batched,
            "fp8_pack_qkv": packed,
            # Against the same lever unpacked: the pass's and the CFG step's outputs bit for bit.
            "against_unpacked": None if twin is None else {
                "twin": name.removesuffix(PACKED_SUFFIX), "pass_bit_identical": bool(torch.equal(out, twin[0])),
                "cfg_step_bit_identical": all(bool(torch.equal(a, b)) for a, b in zip(step, twin[1])),
                **deviation(out, twin[0])},
            "tokens": tokens, "first_call_s": round(first, 2), "s_per_pass": round(per_pass, 4),
            "useful_tflops": round(pass_flops(*tokens) / per_pass / 1e12, 1),
            "share_of_peak": round(pass_flops(*tokens) / per_pass / 1e12 / peak, 3),
            "two_images": {"tokens": (two["hidden_states"].shape[1], two["encoder_hidden_states"].shape[1]),
                           "first_call_s": round(first_two, 2), "s_per_pass": round(per_pass_two, 4)},
            "deviation_from_stock": deviation(out, reference),
            # One true-CFG step (prompt and negative prompt passes), each output against stock's.
            "cfg_step": {"first_call_s": round(first_step, 2), "s_per_step": round(per_step, 4),
                         "deviation_from_stock": [deviation(got, want) for got, want in zip(step, reference_step)]},
            "gpu_allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 1),  # all weights on the GPU
        })
        if profile:
            results[-1]["kernel_profile"] = kernel_profile(transformer, one)
        print(json.dumps(results[-1]), flush=True)
        write_results(record, out_dir)
    uncompile(transformer)


def compile_deviation(worker: Worker) -> dict:
    """The compiled edit transformer's output against the same code run eagerly
    (torch.compiler's force_eager stance), on one 1024x1024 pass with one reference."""
    transformer = worker.host.for_operation("edit").transformer
    kwargs = {**transformer_inputs(worker, transformer, 1), "return_dict": False}
    with torch.inference_mode():
        compiled = transformer(**kwargs)[0].float()
        with torch.compiler.set_stance("force_eager"):
            eager = transformer(**kwargs)[0].float()
    return {"what": "regional compile against eager, edit transformer, 1024x1024, 1 reference",
            **deviation(compiled, eager)}


def lightning_fp8_deviation(worker: Worker) -> dict:
    """The edit transformer's pass (1024x1024, 1 reference) with the Lightning LoRA fused in
    bf16 by diffusers (the bf16 worker's way) against the same pass under FP8 with the LoRA
    fused by src/models/lora/fp8_fusing.py, beside FP8's own deviation without the LoRA and the LoRA's
    own effect. Needs a bf16 run (QUANTIZE unset); it quantizes the edit transformer, so
    it runs last."""
    from src.models.acceleration import regional_compile
    from src.models.fp8.linear import quantize_blocks

    host, settings = worker.host, worker.settings
    if settings.quantize != "none":
        return {"error": "lightning_fp8_deviation needs a bf16 run (QUANTIZE unset)"}
    pipeline = host.for_operation("edit")
    transformer = pipeline.transformer
    kwargs = {**transformer_inputs(worker, transformer, 1), "return_dict": False}
    adapters = adapters_for(JobRequest(image_base64="", prompt="-", lightning=4), settings, worker.loras)

    def one_pass() -> torch.Tensor:
        with torch.inference_mode():
            return transformer(**kwargs)[0].float()

    def timed_fuse(fused: FusedLoras) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fused.apply(pipeline, adapters)
        torch.cuda.synchronize()
        return round(time.perf_counter() - start, 2)

    base_bf16 = one_pass()
    bf16_fuse_s = timed_fuse(host.fused_loras)
    lora_bf16 = one_pass()
    host.fused_loras.apply(pipeline, [])  # the exact base again, then quantized as at load
    uncompile(transformer)
    quantize_blocks(transformer, host.device, keep=settings.fp8_keep_bf16)
    if settings.compile:
        regional_compile(transformer)
    base_fp8 = one_pass()
    touched = {name: transformer.get_submodule(name) for name in touched_linears(transformer, adapters)}
    before = {name: [p.detach().cpu() for p in module.parameters()] for name, module in touched.items()}
    fp8_fused = FusedLoras(host.edit_published_weights, host.dtype)
    fp8_fuse_s = timed_fuse(fp8_fused)
    lora_fp8 = one_pass()
    fp8_fused.apply(pipeline, [])
    restored = one_pass()
    exact = all(torch.equal(p.detach().cpu().view(torch.uint8), q.view(torch.uint8))
                for name, module in touched.items() for p, q in zip(module.parameters(), before[name]))
    return {
        "what": "edit transformer pass, 1024x1024, 1 reference, Lightning 4-step LoRA (random, rank 64)",
        "fp8_lora_against_bf16_lora": deviation(lora_fp8, lora_bf16),
        "fp8_base_against_bf16_base": deviation(base_fp8, base_bf16),
        # What the LoRA changes (its output minus the base's), and how much of that change
        # FP8 keeps: the LoRA's deltas are mostly smaller than an e4m3 step of the weights.
        "lora_effect_bf16": deviation(lora_bf16, base_bf16),
        "lora_effect_fp8_against_bf16": deviation(lora_fp8 - base_fp8, lora_bf16 - base_bf16),
        "restored_weights_bit_identical": exact, "pass_after_restore_equal": bool(torch.equal(restored, base_fp8)),
        "linears_fused": len(touched),
        "fuse_s": {"bf16_diffusers": bf16_fuse_s, "fp8_from_published": fp8_fuse_s},
    }


def lora_switching(worker: Worker, repeats: int = 3) -> dict:
    """Per-pass costs, switch costs and alternating sequences (see the module docstring).
    Needs the start `main` gives it (PRELOAD=edit,lightning: the 4-step set held ready)."""

    host, settings, switch = worker.host, worker.settings, worker.host.loras
    pipeline = host.for_operation("edit")
    transformer = pipeline.transformer
    lightning = adapters_for(JobRequest(image_base64="", prompt="-", lightning=4), settings, worker.loras)
    custom_source = str(Path(settings.lora_roots[0]) / "custom_rank16_attention.safetensors")
    custom = adapters_for(JobRequest(image_base64="", prompt="-", loras=[{"source": custom_source}]), settings,
                          worker.loras)
    if switch.resident is None or switch.branches is None:
        return {"error": "lora_switching needs the held-ready set and the branches (a start as PRELOAD=edit,lightning)"}
    kwargs = transformer_inputs(worker, transformer, 1)

    def timed(call) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        return round(time.perf_counter() - start, 3)

    outputs: dict[str, torch.Tensor] = {}

    def per_pass(name: str) -> float:
        first, mean, outputs[name] = timed_passes(transformer, kwargs, 5)
        return round(mean, 4) if first < 5 * mean + 1 else -round(mean, 4)  # negative: the first call compiled

    switch.apply(pipeline, [])
    record: dict = {"what": "edit transformer pass 1024x1024 with 1 reference; jobs as the lightning4/nocfg4 cases",
                    "resident_set": {"linears": switch.resident.linears,
                                     "held_gb": round(switch.resident.held_bytes / 1e9, 1),
                                     "held_on": switch.resident.where},
                    "branch_buffers_gib": round(switch.branches.buffer_bytes() / 2**30, 2),
                    "branch_padded_rank": switch.branches.padded_rank}
    passes, switches = {"base": per_pass("base")}, {}
    switches["resident_in_s"] = timed(lambda: switch.apply(pipeline, lightning))
    passes["lightning_resident_fused"] = per_pass("lightning_resident_fused")
    switches["resident_out_s"] = timed(lambda: switch.apply(pipeline, []))
    for name, adapters in (("lightning_unfused", lightning), ("custom_rank16_attention_unfused", custom)):
        switches[f"{name}_on_s"] = timed(lambda: switch.branches.activate(adapters))
        passes[name] = per_pass(name)
        switches[f"{name}_off_s"] = timed(switch.branches.deactivate)
    passes["base_again"] = per_pass("base_again")
    # Before: the on-the-spot fuse (published weights read from the snapshot under FP8) and restore.
    switches["lightning_fuse_on_the_spot_s"] = timed(lambda: host.fused_loras.apply(pipeline, lightning))
    passes["lightning_fused_on_the_spot"] = per_pass("lightning_fused_on_the_spot")
    switches["lightning_restore_s"] = timed(lambda: host.fused_loras.apply(pipeline, []))
    record["s_per_pass"], record["switch_s"] = passes, switches
    # Unfused against fused: rounding only (in bf16 the fused weight is rounded once more;
    # under FP8 the fused delta is quantized, the branch's is not), beside the LoRA's own effect.
    record["outputs"] = {
        "lightning_unfused_against_fused": deviation(outputs["lightning_unfused"], outputs["lightning_resident_fused"]),
        "lightning_effect": deviation(outputs["lightning_resident_fused"], outputs["base"]),
        "held_ready_equal_fused_on_the_spot": bool(torch.equal(outputs["lightning_resident_fused"],
                                                               outputs["lightning_fused_on_the_spot"])),
        "base_equal_after_every_switch": bool(torch.equal(outputs["base"], outputs["base_again"]))}
    record["unfused_pass_overhead"] = {name: round(abs(passes[name]) / abs(passes["base"]) - 1, 4)
                                       for name in ("lightning_unfused", "custom_rank16_attention_unfused",
                                                    "lightning_resident_fused")}
    print(json.dumps(record), flush=True)

    jobs = {"L": dict(CASES["lightning4"]), "B": dict(CASES["nocfg4"]),
            "C": dict(CASES["nocfg4"], loras=[{"source": custom_source}])}

    def run_jobs(sequence: str) -> list[float]:
        seconds = []
        for letter in sequence:
            spec = dict(jobs[letter])
            seconds.append(timed(lambda: run_case(worker, f"seq-{letter}", spec, PassCounter())))
        return seconds

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 3)

    sequences = {}
    for name, pair in (("lightning_base", "LB"), ("custom_base", "CB")):
        first, second = pair
        run_jobs(first)  # the first of a dedicated run pays its switch: not counted
        dedicated_first = run_jobs(first * repeats)
        run_jobs(second)
        dedicated_second = run_jobs(second * repeats)
        alternating = run_jobs(pair * repeats)
        dedicated = mean(dedicated_first + dedicated_second)
        sequences[name] = {"dedicated_s_per_job": dedicated, f"dedicated_{first}_s": mean(dedicated_first),
                           f"dedicated_{second}_s": mean(dedicated_second), "alternating_s_per_job": mean(alternating),
                           "alternating_jobs_s": alternating,
                           "overhead": round(mean(alternating) / dedicated - 1, 4)}
        print(json.dumps({name: sequences[name]}), flush=True)
    record["sequences"] = sequences
    record["lora_modes_seen"] = switch.mode
    return record


def host_memory() -> dict:
    """The CPU memory the process holds: streamed modes keep their weights there."""
    pinned = torch.cuda.host_memory_stats()
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
            "torch_pinned_peak_gib": round(pinned.get("allocated_bytes.peak", 0) / 2**30, 1)}


# Cases that measure something other than one job: name -> (results key, measure).
SPECIAL_CASES = {"deviation": ("compile_deviation", compile_deviation),
                 "lightning_fp8_deviation": ("lightning_fp8_deviation", lightning_fp8_deviation),
                 "lora_switching": ("lora_switching", lora_switching)}


def main() -> None:
    imported_at = time.time()  # the imports' end (tools/start_bench.py passes the process's start)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join([*CASES, "deviation"]),
                        help="comma list of cases; `deviation`: compiled against eager output; "
                             "`lightning_fp8_deviation` (bf16 runs, last): Lightning fused under FP8 against bf16")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="ours", help="names the results file: stock, ours...")
    parser.add_argument("--levers", nargs="?", const=",".join(LEVERS), default="",
                        help="measure these speed levers alone (default: all) instead of the cases; stock first")
    parser.add_argument("--tiny-hf-home", default="/tmp/bench-hf", help="tiny models: tokenizer and configs only")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="cap the GPU memory the worker may use after loading, as on a smaller card "
                             "(44 for a 48 GB card, 22 for a 24 GB one); set MEMORY_MODE to the mode to measure")
    parser.add_argument("--published-on-disk", default=None, type=Path, metavar="FOLDER",
                        help="QUANTIZE=fp8 Lightning cases: write the published bf16 weights the LoRA fuse reads "
                             "into FOLDER (27 GB) and read them from there cold, as the worker reads its snapshot")
    parser.add_argument("--start-only", action="store_true",
                        help="stop once ready (the start's stages in the results; tools/start_bench.py runs this)")
    parser.add_argument("--profile", action="store_true",
                        help="with --levers: one pass of each lever under torch.profiler, its kernels' GPU time")
    parser.add_argument("--breakdown", action="store_true",
                        help="split each case's inference time: text encoder, transformer passes, VAE, the rest")
    args = parser.parse_args()
    if args.start_only:  # the start's own log lines: each stage and warm pass with what it compiled
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    hf_home = tiny_models(Path(args.tiny_hf_home))
    tiny_snapshot = main_snapshot(hf_home, "Qwen/Qwen-Image-Edit-2511")
    env = {key: value for key, value in os.environ.items() if key in LEVER_SETTINGS}
    if args.levers:  # each lever is set by hand on a stock pipeline
        env = {"COMPILE": "false", "ATTENTION_BACKEND": "sdpa", "QUANTIZE": "none"}  # the environment's would mix in
    if args.gpu_memory_gib:  # the worker plans for the capped card, as it would for a real one
        env["GPU_MEMORY_GIB"] = str(args.gpu_memory_gib)
    else:
        env.setdefault("MEMORY_MODE", "resident")
    # Results come back inline (no bucket here): room for 2048x2048 and several-image jobs.
    settings = Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cuda", "MAX_INLINE_BYTES": str(2**31), **env})
    names = args.cases.split(",")
    # A start alone (--start-only) builds what PRELOAD names, as the worker does; cases build what they need.
    cases = [] if args.start_only else [name for name in names if name not in SPECIAL_CASES]
    if "lora_switching" in names:  # started as PRELOAD=edit,lightning starts; the custom LoRA on a LoRA root
        env["PRELOAD"] = "edit,lightning"
        env["LORA_ROOTS"] = str(hf_home / "bench-loras")
        write_custom_lora(hf_home / "bench-loras")
        settings = Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cuda", "MAX_INLINE_BYTES": str(2**31),
                                      **env})
    if any(name.startswith(("lightning", "lora")) for name in names) or "lightning" in settings.preload:
        write_lightning_lora(hf_home, settings)

    host = RandomFullSizeHost(settings, tiny_snapshot, args.published_on_disk)
    build_s = host.load()
    if any(CASES[name]["operation"] == "decompose" for name in cases):
        host.layered()  # as PRELOAD=edit,layered: built before the warm-up, which then covers it
    torch.cuda.empty_cache()
    memory_cap = None
    if args.gpu_memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_gib * 2**30 / total)
        memory_cap = {"gib": args.gpu_memory_gib}
    worker = Worker(settings, host, price_for(device_name(host.device), None), loras=host.lora_library())
    # As start_worker after its load: branches, compile cache, warm-up, LoRA set held ready, cache saved.
    # The levers measure the base pass, and re-quantize linears the branches would hold.
    get_ready(worker, lora_branches=not args.levers)
    warmup_s, loras_s = worker.startup_s.get("warmup", 0.0), worker.startup_s["loras"]
    save_s = worker.startup_s.get("compile_cache_save", 0.0)
    ready_at = time.time()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "label": args.label,
               "settings": {"attention_backend": settings.attention_backend, "compile": settings.compile,
                            "caption_decoder": settings.caption_decoder,
                            "quantize": settings.quantize, "fp8_keep_bf16": sorted(settings.fp8_keep_bf16),
                            "fp8_pack_qkv": settings.fp8_pack_qkv,
                            "cfg_batch": settings.cfg_batch,
                            "memory_mode": host.memory_mode},
               "memory_cap": memory_cap, "memory_mode": host.memory_mode,
               "swap_transformers": host.swap_transformers,
               "swap_page_locked": host.swap_transformers and host.swap.use_twins,
               "swap_moves_at_start": host.swap.moves_in,
               "memory_plan": host.plan.limits() if host.plan else None,
               "build_s": round(build_s, 1), "warmup_s": round(warmup_s, 1), "loras_prepare_s": round(loras_s, 1),
               "compile_cache": worker.compile_cache_state, "compile_cache_save_s": round(save_s, 1),
               "startup_s": {stage: round(seconds, 2) for stage, seconds in worker.startup_s.items()},
               "warm_passes": [span.as_dict() for span in worker.compile_meter.spans],
               "preload": sorted(settings.preload), "ready_at": ready_at, "imported_at": imported_at,
               "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 1),
               "host_memory_after_warmup": host_memory()}
    if args.levers:
        measure_levers(worker, args.levers.split(","), results, Path(args.out), profile=args.profile)
        return
    if args.start_only:
        write_results(results, Path(args.out))
        return
    counter = PassCounter()
    clock = StageClock() if args.breakdown else None
    handles = [host.edit.transformer.register_forward_pre_hook(counter.hook, with_kwargs=True)]
    results["cases"] = []
    for name in names:
        if name in SPECIAL_CASES:
            key, measure = SPECIAL_CASES[name]
            results[key] = measure(worker)
            print(json.dumps(results[key]), flush=True)
            write_results(results, Path(args.out))
            continue
        if CASES[name]["operation"] == "decompose" and len(handles) == 1:
            handles.append(host.layered().transformer.register_forward_pre_hook(counter.hook, with_kwargs=True))
        if clock:
            clock.attach(host.layered() if CASES[name]["operation"] == "decompose" else host.edit)
        result = run_case(worker, name, CASES[name], counter, clock)
        results["cases"].append(result)
        print(json.dumps(result), flush=True)
        results["host_memory"] = host_memory()
        write_results(results, Path(args.out))  # after each case: a run cut short keeps what it measured

    print(f"\n{'case':<18} {'inference s':>11} {'passes':>6} {'s/pass':>7} {'TFLOP/s':>8} {'peak':>6} {'GiB':>5}")
    for case in results["cases"]:
        if "error" in case:
            print(f"{case['case']:<18} error: {case['error']}")
            continue
        print(f"{case['case']:<18} {case['timings_ms']['inference'] / 1000:>11.2f} {case['passes']:>6} "
              f"{case['s_per_pass'] or 0:>7.3f} {case['useful_tflops']:>8.1f} {case['share_of_peak']:>6.0%} "
              f"{case['peak_gpu_gib']:>5.1f}")


if __name__ == "__main__":
    main()
