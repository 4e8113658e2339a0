"""The answer to a job: its outputs stored, and the output dict RunPod returns.

`encode_and_store` and `archive_and_store` upload (or inline) what a job made, each under
its own stage; `edit_output`, `decompose_output` and `composite_output` say what was made
and how; `finish` is the one place that adds the timings, the cost and the warnings to an output.
Warnings say what the worker did differently from what the job asked (a memory lever, an
inline image left out, a 1-step image); they never fail a job.
"""

from __future__ import annotations

from PIL import Image

from src.job.schema import JobRequest
from src.plumbing.config import BucketConfig, Settings
from src.plumbing.metering import Price, StageTimer
from src.plumbing.storage import Bucket, UploadPolicy
from src.serving import archives
from src.serving.layers import LayerStack, describe_layers
from src.serving.results import encode_all, store_images

# diffusers' FlowMatchEulerDiscreteScheduler with the models' shift_terminal=0.02 divides
# 0 by 0 for a single step, so a 1-step image is black. Served as the pipeline gives it
# (health checks use 1 step), with this note.
ONE_STEP_WARNING = ("num_inference_steps: with 1 step the models' scheduler (shift_terminal) yields NaN "
                    "and a black image; use 2 or more for a real image")
LIGHTNING_SCHEDULER = "FlowMatchEulerDiscreteScheduler, shift 3 (ModelTC/Qwen-Image-Lightning)"
# What each memory lever changes, said in the job's warnings when it ran.
LEVER_NOTES = {
    "layers_one_at_a_time": "the layers were VAE-decoded one at a time instead of in one batch (pixels may differ "
                            "by a few levels of 255)",
    "vae_tiling": "the VAE decoded in overlapping tiles (pixels differ slightly from an untiled decode)",
}


def bucket_for(request: JobRequest, settings: Settings) -> Bucket | None:
    """Where the job's outputs go: the job's own bucket (`r2`), else the env's, else none (inline)."""
    policy = UploadPolicy.from_settings(settings)
    if request.r2 is not None:
        r2 = request.r2
        config = BucketConfig(bucket_name=r2.bucket_name, access_key_id=r2.access_key_id,
                              secret_access_key=r2.secret_access_key.get_secret_value(),
                              endpoint_url=r2.endpoint_url, region=r2.region)
        # A job's endpoint is untrusted: checked by the SSRF guard, its connections pinned.
        return Bucket.for_job(config, settings.presign_expiry_s, policy, settings.address_policy)
    if settings.bucket is not None:
        return Bucket(settings.bucket, settings.presign_expiry_s, policy)
    return None


def encode_and_store(named: list[tuple[str, Image.Image]], request: JobRequest, bucket: Bucket | None,
                     job_id: str, timer: StageTimer, settings: Settings) -> tuple[list[dict], list[str]]:
    """The images encoded (`encode`) and uploaded or inlined (`upload`). Returns (entries, warnings)."""
    with timer.stage("encode"):
        encoded = encode_all(named, request.output_format, request.output_quality, settings.png_compress_level)
    with timer.stage("upload"):
        return store_images(
            encoded, request.output_format, bucket=bucket, prefix=settings.bucket_prefix,
            job_id=job_id, inline=request.wants_base64 or bucket is None,
            max_inline_bytes=settings.max_inline_bytes,
        )


def archive_and_store(stack: LayerStack, request: JobRequest, bucket: Bucket | None, entries: list[dict],
                      timer: StageTimer, settings: Settings) -> tuple[dict, list[str]]:
    """The final stack (split layers as groups of their sub-layers) and its composite in
    one file, next to the images. Returns the output's `archive` entry and warnings."""
    composite = stack.archived_composite
    with timer.stage("archive"):
        data = archives.build(request.archive, stack.archived(), composite, settings.png_compress_level)
    with timer.stage("upload"):
        return archives.store_archive(
            data, request.archive, layer_count=stack.archived_layer_count, size=composite.size, bucket=bucket,
            image_entries=entries, inline=request.wants_base64 or bucket is None,
            max_inline_bytes=settings.max_inline_bytes)


def lever_warnings(levers: tuple[str, ...], retried: bool) -> list[str]:
    """The memory levers a job ran with, and why."""
    cause = ("the first attempt ran out of GPU memory and the job was run again" if retried
             else "the job would not fit this worker's GPU memory otherwise")
    return [f"memory: {LEVER_NOTES[lever]}: {cause}" for lever in levers]


def request_warnings(request: JobRequest, quantize: str) -> list[str]:
    """What an edit or decompose job asked for that ran otherwise: `use_fp8` against the
    worker's QUANTIZE, a 1-step image."""
    warnings = []
    if request.use_fp8 is not None and request.use_fp8 != (quantize == "fp8"):
        warnings.append(f"use_fp8: accepted for compatibility; this worker's precision is set by its "
                        f"QUANTIZE setting ({quantize}: "
                        f"{'FP8' if quantize == 'fp8' else 'the published bf16 weights'})")
    if request.steps == 1:
        warnings.append(ONE_STEP_WARNING)
    warnings += [f"edits[{i}].{ONE_STEP_WARNING}" for i, edit in enumerate(request.edits) if edit.steps == 1]
    return warnings


def job_output(request: JobRequest, seed: int, model: dict, entries: list[dict], adapters: list,
               lightning_repo: str, archive: dict | None = None, matte: str | None = None) -> dict:
    """An edit or decompose job's output, before `finish`: what ran (model, seed, steps,
    LoRAs, matte) and what it made."""
    output: dict = {
        "success": True,
        "operation": request.operation,
        "seed": seed,
        "num_inference_steps": request.steps,
        "true_cfg_scale": request.cfg_scale,
        "model": model,
        "images": entries,
    }
    if request.lightning:
        output["lightning"] = {"steps": request.lightning, "repo": lightning_repo, **adapters[0].describe(),
                               "true_cfg_scale": 1.0, "scheduler": LIGHTNING_SCHEDULER}
    if request.loras:
        output["loras"] = [adapter.describe() for adapter in adapters[1 if request.lightning else 0:]]
    if matte is not None:
        output["matte"] = matte
    if request.operation == "decompose":
        output["cfg_normalize"] = request.cfg_normalize
        output.update(describe_layers(entries, request, seed))
        if archive is not None:
            output["archive"] = archive
    else:
        first = entries[0]
        output.update(output_url=first["url"], r2_key=first["key"], image_size=[first["width"], first["height"]])
        if "base64" in first:
            output["edited_image_base64"] = first["base64"]
    return output


def composite_output(entries: list[dict], size: tuple[int, int], archive: dict | None = None) -> dict:
    """A `composite` job's output, before `finish`."""
    output: dict = {"success": True, "operation": "composite", "images": entries, "composite": entries[0],
                    "image_size": [size[0], size[1]]}
    if archive is not None:
        output["archive"] = archive
    return output


def finish(output: dict, timer: StageTimer, price: Price, warnings: list[str],
           start_load_s: float | None = None) -> dict:
    """`output` with the job's stage timings (`start_load_s`: the start-up load, reported
    once, in the first job's `load`), its cost from the seconds it took, and its warnings."""
    timings = timer.report()
    if start_load_s is not None:
        timings["load"] = round(start_load_s * 1000 + timings.get("load", 0.0), 1)
    output["timings_ms"] = timings
    output["inference_time_ms"] = int(timings.get("inference", 0))
    output["cost"] = price.cost(timer.elapsed_s())
    output["cost_usd"] = output["cost"]["usd"]
    if warnings:
        output["warnings"] = warnings
    return output
