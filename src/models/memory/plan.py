"""Which jobs fit the GPU: each job's activation memory, estimated from its shape before
any GPU work, against what the worker has beside its weights.

A job runs in stages one after another (text encoder, VAE encode, transformer passes, VAE
decode), and its peak is the largest stage; each stage grows with one measure of the job
(transformer tokens, decoded or encoded pixels), at rates measured on the worker's own job
path with a safety factor (docs/memory.md). Where a job does not fit, the levers that change
pixels a little are tried, least change first (`layers_one_at_a_time`, then `vae_tiling`), and
the job says which ran (`memory_levers`); a job that still does not fit is refused with the
limit in force and what would fit. `configure` picks, at start, the memory mode
(MEMORY_MODE=auto) and whether the transformers swap (TRANSFORMER_SWAP=auto): the fastest
arrangement that serves every job without streaming the transformers, else the fastest that
serves every edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from src.job.schema import InputError, JobRequest, MAX_LAYERS, SIZE_MAX, SIZE_MIN

GIB = 1024**3
MP = 1_000_000
# Bytes per unit, each the largest rate measured on the worker's job path (docs/memory.md,
# "The measured rates"); under FP8 activations are quantized per token beside their bf16 copies.
TRANSFORMER_BYTES_PER_TOKEN = {"none": 0.1 * GIB / 1000, "fp8": 0.17 * GIB / 1000}
# VAE decode without the feature cache (src/models/memory/image_vae.py).
DECODE_BYTES_PER_PIXEL = 1.97 * GIB / MP
TILED_DECODE_BYTES = 1 * GIB  # the measured tiled decode (docs/memory.md), with margin
ENCODE_BYTES_PER_PIXEL = 1.13 * GIB / (1024 * 1024)  # as measured for one 1024x1024 reference
TEXT_ENCODER_BYTES = 0.6 * GIB  # above the measured, with one image and with three
# Latents, prompt embeddings and the decoded image held between stages.
HELD_BYTES = int(0.25 * GIB)
SAFETY = 1.1
# Left free beside the weights and the job: cuBLAS and cuDNN workspaces, fragmentation.
RESERVE_BYTES = 1 * GIB
# A streamed component's share on the GPU while it runs, one part in use and the next
# copied in: two of the transformer's 60 blocks; two of the text encoder's largest
# leaves (its embedding table is 13% of it).
STREAMED_TRANSFORMER_SHARE = 2 / 60
STREAMED_TEXT_ENCODER_SHARE = 0.14
# The pipelines' own sizes: an edit's condition images are encoded at about 1 MP each
# (diffusers' VAE_IMAGE_SIZE), and a transformer token covers 16x16 pixels.
REFERENCE_PIXELS = 1024 * 1024
TOKEN_PIXELS = 16 * 16


@dataclass(frozen=True)
class JobShape:
    """What a job's memory depends on. An edit: its output pixels and reference images.
    A decomposition: its layers and their pixels (resolution squared), how many of its
    layers are then edited (each an edit of about 1 MP), and the most sub-layers one of
    its splits makes (each split a decomposition of a layer, at the same resolution)."""

    operation: str
    output_pixels: int
    references: int = 1
    layers: int = 0
    layer_edits: int = 0
    sub_layers: int = 0

    @property
    def tokens(self) -> int:
        if self.operation == "decompose":  # the layers, the composite and the condition image
            return (self.layers + 2) * self.output_pixels // TOKEN_PIXELS
        return (self.output_pixels + self.references * REFERENCE_PIXELS) // TOKEN_PIXELS


def stage_bytes(shape: JobShape, quantize: str, levers: tuple[str, ...] = (),
                streamed: dict[str, int] | None = None) -> dict[str, int]:
    """Each stage's estimated bytes (before the safety factor): its activations, and the
    parts of its model in flight when that model streams from CPU memory (`streamed`)."""
    decoded_frames = shape.layers if shape.operation == "decompose" else 1
    if "vae_tiling" in levers:
        decode = TILED_DECODE_BYTES
    elif "layers_one_at_a_time" in levers:
        decode = DECODE_BYTES_PER_PIXEL * shape.output_pixels
    else:
        decode = DECODE_BYTES_PER_PIXEL * shape.output_pixels * decoded_frames
    encoded = shape.output_pixels if shape.operation == "decompose" else REFERENCE_PIXELS
    stages = {
        "text_encoder": TEXT_ENCODER_BYTES,
        "vae_encode": ENCODE_BYTES_PER_PIXEL * encoded,
        "transformer": TRANSFORMER_BYTES_PER_TOKEN[quantize] * shape.tokens,
        "vae_decode": decode,
    }
    for stage, in_flight in (streamed or {}).items():
        stages[stage] += in_flight
    if shape.layer_edits:  # each runs as an edit of about 1 MP with one reference
        stages["layer_edit"] = need_bytes(JobShape("edit", REFERENCE_PIXELS), quantize, streamed=streamed)
    if shape.sub_layers:  # splits run one after another, with the job's levers: the largest counts
        split = JobShape("decompose", shape.output_pixels, layers=shape.sub_layers)
        stages["split"] = need_bytes(split, quantize, levers, streamed)
    return {name: int(value) for name, value in stages.items()}


def need_bytes(shape: JobShape, quantize: str, levers: tuple[str, ...] = (),
               streamed: dict[str, int] | None = None) -> int:
    """A job's estimated peak above the resident weights."""
    stages = stage_bytes(shape, quantize, levers, streamed)
    whole_runs = [stages.pop(name, 0) for name in ("layer_edit", "split")]  # need_bytes already
    return max(int(SAFETY * max(stages.values())) + HELD_BYTES, *whole_runs)


def cfg_pair(shape: JobShape) -> JobShape:
    """A shape at least as large as a CFG step run as one batch of two (CFG_BATCH,
    src/models/cfg_batch.py): an edit's tokens twice; for a decomposition, its layer edits'
    (each about 1 MP with one reference). Its other stages double too: an overestimate, so
    a job batched by this measure fits."""
    if shape.operation == "decompose":
        shape = JobShape("edit", REFERENCE_PIXELS)
    return replace(shape, output_pixels=2 * shape.output_pixels, references=2 * shape.references)


def shape_for(request: JobRequest, image_sizes: list[tuple[int, int]]) -> JobShape:
    """The shape of a job whose images have these sizes, as the pipelines will run it."""
    if request.operation == "decompose":
        return JobShape("decompose", request.resolution ** 2, layers=request.layers, layer_edits=len(request.edits),
                        sub_layers=max((split.layers for split in request.split), default=0))
    width, height = request.output_size()
    if request.auto_resize is False and width is None and height is None:
        width, height = (max(SIZE_MIN, min(SIZE_MAX, side)) for side in image_sizes[0])
    # Unset sides: about 1 MP at the last image's aspect ratio, as the edit pipeline picks them.
    last_width, last_height = image_sizes[-1]
    default_width = math.sqrt(REFERENCE_PIXELS * last_width / last_height)
    pixels = (width or default_width) * (height or default_width * last_height / last_width)
    return JobShape("edit", int(pixels), references=len(image_sizes))


def lever_choices(operation: str) -> list[tuple[str, ...]]:
    """The levers to try for an operation, least change first: none, then what applies;
    the last is all of them (what an out-of-memory error is retried with)."""
    if operation == "decompose":
        return [(), ("layers_one_at_a_time",), ("layers_one_at_a_time", "vae_tiling")]
    return [(), ("vae_tiling",)]


# The largest jobs the schema accepts.
LARGEST_EDIT = JobShape("edit", SIZE_MAX * SIZE_MAX, references=3)
LARGEST_DECOMPOSE = JobShape("decompose", 1024 * 1024, layers=MAX_LAYERS)


@dataclass(frozen=True)
class MemoryPlan:
    """What this worker has for a job's activations, and what it runs or refuses."""

    budget_bytes: int
    quantize: str
    situation: str  # for errors and the log: "NVIDIA L40S, 44 GiB; memory mode text_offload, ..."
    streamed: dict[str, int] = field(default_factory=dict)  # stage: bytes of its model in flight

    def levers_for(self, shape: JobShape, key: str) -> tuple[str, ...]:
        """The levers `shape` needs to fit (none when it fits as it is), or InputError naming
        `key`, the memory it needs, what this worker has, and what would fit."""
        choices = lever_choices(shape.operation)
        for levers in choices:
            if self.job_bytes(shape, levers) <= self.budget_bytes:
                return levers
        least = self.job_bytes(shape, choices[-1])
        raise InputError(f"{key}: {describe(shape)} about {math.ceil(least / GIB)} GiB of GPU memory beyond "
                         f"the weights; this worker has {self.budget_bytes / GIB:.0f} GiB ({self.situation}); "
                         f"{self.what_fits(shape)}")

    def job_bytes(self, shape: JobShape, levers: tuple[str, ...] = ()) -> int:
        """`need_bytes` on this worker: its precision and its streamed models."""
        return need_bytes(shape, self.quantize, levers, self.streamed)

    def fits_cfg_batch(self, shape: JobShape, levers: tuple[str, ...], held_bytes: int = 0) -> bool:
        """Whether `shape`'s CFG steps may run as one batch of two: `cfg_pair(shape)` fits
        with the job's levers beside `held_bytes` (a held LoRA copy)."""
        return self.job_bytes(cfg_pair(shape), levers) <= self.budget_bytes - held_bytes

    def runs_every_edit_without_levers(self) -> bool:
        """Whether the largest edit (so every edit) fits as it is."""
        return self.job_bytes(LARGEST_EDIT) <= self.budget_bytes

    def fits(self, shape: JobShape) -> bool:
        return self.job_bytes(shape, lever_choices(shape.operation)[-1]) <= self.budget_bytes

    def what_fits(self, shape: JobShape) -> str:
        if shape.operation == "decompose":
            layers = max((n for n in range(2, shape.layers) if self.fits(replace(shape, layers=n))), default=None)
            options = [f"use at most {layers} layers"] if layers else []
            sub_layers = max((n for n in range(2, shape.sub_layers) if self.fits(replace(shape, sub_layers=n))),
                             default=None)
            if sub_layers:
                options.append(f"split into at most {sub_layers} layers")
            if shape.output_pixels > 640 * 640 and self.fits(replace(shape, output_pixels=640 * 640)):
                options.append("resolution 640")
            return ", or ".join(options) if options else "this worker cannot decompose at this size"
        side = max((s for s in range(256, SIZE_MAX + 1, 16) if self.fits(replace(shape, output_pixels=s * s))),
                   default=None)
        if side is None:
            return "send fewer images" if shape.references > 1 else "this worker cannot run this edit"
        return f"use at most {side}x{side} output pixels (width, height)"

    def limits(self) -> str:
        """The corners this worker serves, for the start-up log and docs/memory.md."""
        edit = self.what_fits(LARGEST_EDIT) if not self.fits(LARGEST_EDIT) else "every edit"
        decompose = ("every decomposition" if self.fits(LARGEST_DECOMPOSE)
                     else f"decompositions at 1024: {self.what_fits(LARGEST_DECOMPOSE)}")
        return f"{self.budget_bytes / GIB:.1f} GiB for activations ({self.situation}): {edit}; {decompose}"


def describe(shape: JobShape) -> str:
    """The job as the subject of a refusal, with its verb."""
    side = math.isqrt(shape.output_pixels)
    if shape.operation == "decompose":
        split = f" and a split into {shape.sub_layers}" if shape.sub_layers else ""
        return f"{shape.layers} layers at resolution {side}{split} need"
    images = "1 image" if shape.references == 1 else f"{shape.references} images"
    return f"a {shape.output_pixels / MP:.1f}-megapixel output with {images} needs"


@dataclass(frozen=True)
class WeightBytes:
    """GPU bytes of the components, as prepared (bf16, or FP8 transformers)."""

    text_encoder: int
    transformer: int  # one; Layered's has the same shape
    vae: int  # one; Layered's is about the same
    layered_text_encoder: int = 0  # when Layered's differs from the edit model's
    # The edit transformer's padded LoRA branches (COMPILE=true), allocated after the plan;
    # not in offload, where LoRA jobs are refused.
    lora_branches: int = 0

    def resident(self, mode: str, both_transformers: bool) -> int:
        """What `mode` keeps on the GPU between jobs."""
        text = 0 if mode in ("text_offload", "offload") else self.text_encoder + self.layered_text_encoder
        transformers = 0 if mode == "offload" else (self.transformer * (2 if both_transformers else 1)
                                                    + self.lora_branches)
        return text + transformers + 2 * self.vae

    def streamed(self, mode: str) -> dict[str, int]:
        """The bytes a streamed model has on the GPU while its stage runs."""
        in_flight = {}
        if mode in ("text_offload", "offload"):
            in_flight["text_encoder"] = int(self.text_encoder * STREAMED_TEXT_ENCODER_SHARE)
        if mode == "offload":
            in_flight["transformer"] = int(self.transformer * STREAMED_TRANSFORMER_SHARE)
        return in_flight


@dataclass(frozen=True)
class Arrangement:
    mode: str
    swap: bool
    plan: MemoryPlan


def configure(capacity_bytes: int, weights: WeightBytes, quantize: str, *, mode_setting: str = "auto",
              swap_setting: str = "auto", gpu: str = "GPU") -> Arrangement:
    """The memory mode and transformer swap (each `auto` or forced) and the plan they leave."""
    modes = ("resident", "text_offload") + (() if quantize == "fp8" else ("offload",))
    modes = modes if mode_setting == "auto" else (mode_setting,)
    swaps = {"auto": (False, True), "never": (False,), "always": (True,)}[swap_setting]
    arrangements = [_arrangement(capacity_bytes, weights, quantize, mode, swap, gpu)
                    for mode in modes for swap in (swaps if mode != "offload" else (False,))]
    serving_edits = [a for a in arrangements if a.plan.fits(LARGEST_EDIT)]
    for arrangement in serving_edits:  # every job served, without streaming the transformers
        if arrangement.mode != "offload" and arrangement.plan.fits(LARGEST_DECOMPOSE):
            return arrangement
    if serving_edits:  # else decompositions at the corners are refused rather than every job slowed
        return serving_edits[0]
    if mode_setting == "auto" and quantize == "fp8":  # FP8 cannot stream its transformer
        return _arrangement(capacity_bytes, weights, quantize, "offload", False, gpu)
    return arrangements[-1]


def _arrangement(capacity_bytes: int, weights: WeightBytes, quantize: str, mode: str, swap: bool,
                 gpu: str) -> Arrangement:
    budget = capacity_bytes - RESERVE_BYTES - weights.resident(mode, both_transformers=not swap)
    placement = ("transformers streamed" if mode == "offload"
                 else "one transformer on the GPU at a time" if swap else "both pipelines resident")
    situation = f"{gpu}, {capacity_bytes / GIB:.0f} GiB; memory mode {mode}, {placement}"
    return Arrangement(mode, swap, MemoryPlan(max(budget, 0), quantize, situation, weights.streamed(mode)))
