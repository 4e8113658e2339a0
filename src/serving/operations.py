"""The operations as calls of the diffusers pipelines, and nothing else.

Fidelity rule: for the same inputs and seed, what these return equals what the
pipeline returns when called directly (the tests check it pixel for pixel), called the
way the models' authors call it where that differs from diffusers' defaults
(docs/upstream-register.md). The only pixel work done here is what the job schema
promises around the call: RGBA inputs flattened onto a uniform matte before the edit
model sees them, alpha put back for single RGBA edits and edited layers, sub-layers
resized to their layer's size where the pipeline's rounding differs from it, and the
alpha-over composite of the layers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from src.job.schema import JobRequest, LayerEdit, LayerSplit
from src.models.cfg_batch import cfg_batched
from src.serving.shared_encodings import encodings_shared

ProgressFn = Callable[[dict], None]
PROGRESS_INTERVAL_S = 1.0


def generator_for(seed: int) -> torch.Generator:
    # A CPU generator gives the same noise on every device, so a seed reproduces
    # an image across GPU types and on the CPU.
    return torch.Generator("cpu").manual_seed(seed)


@dataclass(frozen=True)
class EditResult:
    image: Image.Image
    prompt_index: int
    seed: int


def edit(pipeline, request: JobRequest, images: list[Image.Image], seed: int,
         progress: ProgressFn, scheduler=None, cfg_batch: bool = False) -> list[EditResult]:
    """edit and edit_multi: `num_images` results for each prompt, prompts in order. Result
    k is the pipeline's call with its prompt and seed `request.output_seed(seed, k)`, so
    it equals the single-image job with that prompt and seed; the encodings those calls
    share are computed once (src/serving/shared_encodings.py). `scheduler` replaces the
    pipeline's for these calls (Lightning LoRAs come with their own). `cfg_batch`
    (CFG_BATCH) runs each step's two true-CFG passes as one batch (src/models/cfg_batch.py)."""
    alpha = images[0].getchannel("A") if len(images) == 1 and images[0].mode == "RGBA" else None
    matte = request.matte_for(len(images))
    inputs = [flatten(image, matte) for image in images]
    width, height = request.output_size()
    if request.auto_resize is False and width is None and height is None:
        width, height = _keep_size(images[0].size, request.snap)
    runs = [(prompt_index, prompt) for prompt_index, prompt in enumerate(request.prompts)
            for _ in range(request.num_images)]
    results = []
    with _scheduler_swapped(pipeline, scheduler), encodings_shared(pipeline):
        for index, (prompt_index, prompt) in enumerate(runs):
            result_seed = request.output_seed(seed, index)
            image_progress = progress if len(runs) == 1 else (
                lambda update, index=index: progress({**update, "image": index + 1, "images": len(runs)}))
            result = _call_edit(pipeline, inputs, prompt, request.negative_prompt, request.cfg_scale,
                                request.guidance_scale, request.steps, width, height, result_seed, image_progress,
                                cfg_batch)
            if alpha is not None:
                if alpha.size != result.size:  # resized once: every result has the same size
                    alpha = alpha.resize(result.size, Image.Resampling.LANCZOS)
                result = result.convert("RGBA")
                result.putalpha(alpha)
            results.append(EditResult(result, prompt_index, result_seed))
    return results


def edit_layer(pipeline, layer: Image.Image, edit: LayerEdit, seed: int, guidance_scale: float, matte: str,
               progress: ProgressFn, cfg_batch: bool = False) -> Image.Image:
    """One RGBA layer edited by an instruction, as `edit` does an RGBA image: the layer
    flattened onto `matte` is edited and the layer's alpha put back unchanged, so an edit
    recolours or redraws what is inside the layer's shape and never moves its edges.

    The edit runs at the pipeline's own size (about 1 MP at the layer's aspect, as the
    authors call it), the size the pipeline encodes the layer at, and its RGB is resized
    to the layer's (Lanczos) before the alpha goes on. Asked for a smaller size (640x640
    layers), the model lines its output up with the middle of the larger condition
    (centred rope positions) and returns a zoomed-in crop that the alpha no longer fits
    (docs/upstream-register.md, row 5)."""
    rgb = _call_edit(pipeline, [flatten(layer, matte)], edit.prompt, edit.negative_prompt, edit.true_cfg_scale,
                     guidance_scale, edit.steps, None, None, seed, progress, cfg_batch)
    if rgb.size != layer.size:
        rgb = rgb.resize(layer.size, Image.Resampling.LANCZOS)
    result = rgb.convert("RGBA")
    result.putalpha(layer.getchannel("A"))
    return result


def _call_edit(pipeline, images: list[Image.Image], prompt: str, negative_prompt: str, true_cfg_scale: float,
               guidance_scale: float, steps: int, width: int | None, height: int | None, seed: int,
               progress: ProgressFn, cfg_batch: bool = False) -> Image.Image:
    with cfg_batched(pipeline, cfg_batch):  # per call: it pairs this call's prompt and negative prompt
        return pipeline(
            image=images,
            prompt=prompt,
            negative_prompt=negative_prompt,
            true_cfg_scale=true_cfg_scale,
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            width=width,
            height=height,
            generator=generator_for(seed),
            callback_on_step_end=_progress_callback(steps, progress),
        ).images[0]


def decompose(pipeline, request: JobRequest, image: Image.Image, seed: int,
              progress: ProgressFn) -> list[Image.Image]:
    """One image to `request.layers` RGBA layers, back to front (`composite` stacks them).
    An empty prompt is captioned by the pipeline: diffusers' own `get_image_caption`, or
    the decoder the warm-up installed (CAPTION_DECODER, `src/models/captioning.py`)."""
    return _call_layered(pipeline, request, image, request.prompt, request.layers, seed, progress)


def split_layer(pipeline, request: JobRequest, layer: Image.Image, split: LayerSplit, seed: int,
                progress: ProgressFn) -> list[Image.Image]:
    """One RGBA layer decomposed again into `split.layers` sub-layers, back to front: the
    Layered pipeline called on the layer as it is (alpha kept, as the authors' README
    calls it on an RGBA image) with the job's settings and seed and the split's own
    prompt (empty: the pipeline captions the layer, as the authors' demo does an image
    sent without one).

    The pipeline sizes its output from the resolution and the input's aspect, rounded to
    32, so a layer's sub-layers can come out 32 pixels off the layer's size; they are then
    resized to it (Lanczos, on premultiplied alpha), so that they stack over the layers."""
    sub_layers = _call_layered(pipeline, request, layer, split.prompt, split.layers, seed, progress)
    return [sub_layer if sub_layer.size == layer.size else sub_layer.resize(layer.size, Image.Resampling.LANCZOS)
            for sub_layer in sub_layers]


def _call_layered(pipeline, request: JobRequest, image: Image.Image, prompt: str, layers: int, seed: int,
                  progress: ProgressFn) -> list[Image.Image]:
    return pipeline(
        image=image.convert("RGBA"),
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        true_cfg_scale=request.cfg_scale,
        guidance_scale=request.guidance_scale,
        num_inference_steps=request.steps,
        layers=layers,
        resolution=request.resolution,
        # The authors' settings (Qwen-Image-Layered README and demo app), not diffusers' defaults.
        cfg_normalize=request.cfg_normalize,
        use_en_prompt=True,  # caption in English when the prompt is empty
        generator=generator_for(seed),
        callback_on_step_end=_progress_callback(request.steps, progress),
    ).images[0]


def composite(layers: list[Image.Image]) -> Image.Image:
    """Alpha-over of RGBA layers, the first at the back."""
    canvas = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        canvas = Image.alpha_composite(canvas, layer.convert("RGBA"))
    return canvas


def flatten(image: Image.Image, matte: str) -> Image.Image:
    """An RGBA image alpha-composited onto a flat `matte` ('#rrggbb'), as RGB: the model
    sees what the user sees, never the colours stored under transparent pixels."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, matte)
    return Image.alpha_composite(background, image).convert("RGB")


def _keep_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The input's own size, clamped to the schema's 256..2048 and rounded down to `multiple`."""
    return tuple(max(256, min(2048, side)) // multiple * multiple for side in size)  # type: ignore[return-value]


@contextmanager
def _scheduler_swapped(pipeline, scheduler):
    if scheduler is None:
        yield
        return
    original = pipeline.scheduler
    pipeline.scheduler = scheduler
    try:
        yield
    finally:
        pipeline.scheduler = original


def _progress_callback(total_steps: int, progress: ProgressFn):
    """A diffusers step callback that reports {"step", "of"} at most once a second,
    and always for the last step."""
    last_sent = [0.0]

    def on_step_end(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        now = time.monotonic()
        done = step + 1
        if done == total_steps or now - last_sent[0] >= PROGRESS_INTERVAL_S:
            last_sent[0] = now
            progress({"step": done, "of": total_steps})
        return {}

    return on_step_end
