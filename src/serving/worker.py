"""One job, start to finish: parse, decode, run, encode, store, respond.

The worker is made ready by src/serving/startup.py and answers through src/serving/response.py.
Everything that can be wrong with a job's input is found before the GPU is used.
Every failure becomes `{"error": "<key>: <reason>"}` and the worker stays ready for
the next job; CUDA out-of-memory also asks RunPod for a fresh worker.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from src.job.codec import decode_image, open_image
from src.job.schema import InputError, JobRequest, SEED_LIMIT, error_text, parse_request
from src.models.compile_meter import CompileMeter
from src.models.host import ModelHost
from src.models.lora.adapters import LoraLibrary, adapters_for, lightning_scheduler
from src.plumbing.config import Settings
from src.plumbing.metering import Price, StageTimer
from src.plumbing.storage import StorageError
from src.plumbing.url_fetch import FetchLimits, fetch_bytes
from src.serving import operations, response
from src.serving.layers import LayerStack, check_edit_count, check_same_size, edit_seed
from src.serving.operations import ProgressFn
from src.serving.results import OutputTooLarge
from src.serving.stops import JobStopped, StopChannel

log = logging.getLogger(__name__)

# diffusers' Qwen transformer has 4096 text rope positions, starting after the output's
# largest half-side in patches (64 at 2048 px), and the edit pipeline never truncates its
# prompt: a longer text sequence fails inside the transformer (docs/upstream-register.md,
# row 16). The condition images' vision tokens (about 190 each, three at most) and the
# template take about 600 of them, so an edit prompt of this many tokens always fits.
MAX_EDIT_PROMPT_TOKENS = 3000


def no_progress(update: dict) -> None:
    pass


@dataclass
class Worker:
    """A started worker (src/serving/startup.py): its models, settings and price, and what its
    start did. `handle` runs one job."""

    settings: Settings
    host: ModelHost
    price: Price
    startup_s: dict[str, float] = field(default_factory=dict)
    # The start-up load is reported once, in the first job's timings.
    unreported_load_s: float | None = None
    loras: LoraLibrary | None = None
    compile_cache_state: str = "off"  # COMPILE_CACHE_DIR at start: "warm" (loaded), "cold" or "off"
    # The endpoint's stop channel (src/serving/stops.py), heard while a job runs; None without one.
    stops: StopChannel | None = None
    # The start's warm passes, each with what torch.compile did in it (logged; tools/bench.py writes them).
    compile_meter: CompileMeter = field(default_factory=CompileMeter)

    def handle(self, job: dict, progress: ProgressFn = no_progress) -> dict:
        timer = StageTimer()
        job_id = str(job.get("id") or uuid.uuid4())
        try:
            with self._stop_checked(job_id, progress) as checked_progress:
                return self._run(job_id, job.get("input"), timer, checked_progress)
        except JobStopped as exc:
            log.info("job %s %s", job_id, exc)
            return {"error": str(exc)}
        except (InputError, StorageError, OutputTooLarge) as exc:
            error = error_text(str(exc))
            log.info("job %s refused: %s", job_id, error)
            return {"error": error}
        except torch.OutOfMemoryError:
            log.error("job %s: CUDA out of memory; asking for a fresh worker", job_id)
            torch.cuda.empty_cache()
            return {"error": "inference: CUDA out of memory; try a smaller width/height or fewer images "
                             "(this worker will be replaced)", "refresh_worker": True}
        except Exception as exc:  # the worker must survive anything a job does
            log.exception("job %s failed", job_id)
            return {"error": error_text(f"internal: {type(exc).__name__}: {exc}")}

    @contextlib.contextmanager
    def _stop_checked(self, job_id: str, progress: ProgressFn):
        """`progress`, raising JobStopped between steps once the endpoint stopped the job."""
        if self.stops is None:
            yield progress
            return

        def checked(update: dict) -> None:
            try:
                stop_if_stopped()
            except JobStopped as exc:
                raise JobStopped(f"{exc}; stopped after step {update['step']} of {update['of']}") from None
            progress(update)

        with self.stops.watching(job_id) as stop_if_stopped:
            yield checked

    def _run(self, job_id: str, job_input, timer: StageTimer, progress: ProgressFn) -> dict:
        # 1. Everything that can be wrong with the input, before any GPU work.
        request = parse_request(job_input)
        if request.operation == "composite":
            return self._run_composite(job_id, request, timer)
        check_edit_count(request, self.settings.max_layer_edits)
        self._check_prompt_count(request)
        self._check_edit_prompt_tokens(request)
        self._check_loras_allowed(request)
        bucket = response.bucket_for(request, self.settings)
        images = self._input_images(request, timer)
        _check_alpha_format(request, images)
        levers = self.host.memory_levers(request, [image.size for image in images])  # or InputError: too big
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_LIMIT)
        with timer.stage("lora_resolve"):  # files read and checked on the CPU; URLs downloaded once
            adapters = adapters_for(request, self.settings, self.loras,
                                    s3_client_for=(lambda: bucket.client) if bucket else None)
        if not adapters:
            timer.ms.pop("lora_resolve")

        # 2. The pipeline call. An out-of-memory error that still happens (an estimate that
        #    was wrong, fragmentation) is retried once with every memory lever the job has.
        retried = False
        try:
            named, results, stack = self._infer(request, images, seed, adapters, levers, timer, progress)
        except torch.OutOfMemoryError:
            strongest = self.host.strongest_levers(request.operation)
            log.warning("job %s: CUDA out of memory with levers %s; retrying once with %s", job_id,
                        list(levers) or "none", list(strongest))
            torch.cuda.empty_cache()
            levers, retried = strongest, True
            named, results, stack = self._infer(request, images, seed, adapters, levers, timer, progress)

        # 3. Encode, store, respond.
        entries, warnings = response.encode_and_store(named, request, bucket, job_id, timer, self.settings)
        warnings += response.lever_warnings(levers, retried)
        if request.operation != "decompose":
            for entry, result in zip(entries, results):
                entry.update(prompt_index=result.prompt_index, seed=result.seed)
        archive = None
        if request.archive:
            archive, archive_warnings = response.archive_and_store(stack, request, bucket, entries, timer,
                                                                   self.settings)
            warnings += archive_warnings
        warnings += response.request_warnings(request, self.settings.quantize)
        model = self.host.layered_ref if request.operation == "decompose" else self.host.edit_ref
        output = response.job_output(request, seed, model.describe(), entries, adapters, self.settings.lightning_repo,
                                     archive, _matte_used(request, images))
        output = response.finish(output, timer, self.price, warnings, self._take_start_load_s())
        if levers:
            output["memory_levers"] = list(levers)
        return output

    def _infer(self, request: JobRequest, images: list[Image.Image], seed: int, adapters: list,
               levers: tuple[str, ...], timer: StageTimer, progress: ProgressFn):
        """The job's pipeline calls: (named images, edit results or None, layer stack or None)."""
        cfg_batch = self.host.batches_cfg(request, [image.size for image in images], levers)  # CFG_BATCH, if room
        pipeline = self._ready_pipeline(request.operation, adapters, timer)
        scheduler = lightning_scheduler(pipeline.scheduler) if request.lightning else None
        with timer.stage("inference"), self.host.saving_memory(pipeline, levers):
            if request.operation != "decompose":
                results = operations.edit(pipeline, request, images, seed, progress, scheduler,
                                          cfg_batch=cfg_batch)
                named = [(_result_name(k, len(results)), result.image) for k, result in enumerate(results)]
                return named, results, None
            layers = operations.decompose(pipeline, request, images[0], seed, progress)
            # Splits run on the Layered pipeline still in place, before the edits swap it out.
            splits = self._split_layers(pipeline, request, layers, seed, progress)
        stack = LayerStack(layers, self._edit_layers(request, layers, seed, levers, timer, progress, cfg_batch), splits)
        if request.resize_to_input:
            stack = stack.resized(images[0].size)
        return stack.named_images(), None, stack

    def _input_images(self, request: JobRequest, timer: StageTimer) -> list[Image.Image]:
        """The job's images, fetched (URLs, under the SSRF guard) and decoded, each checked
        against MAX_IMAGE_BYTES and MAX_IMAGE_PIXELS."""
        sources = request.image_sources
        settings = self.settings
        if request.image_base64 is None:
            limits = FetchLimits(max_bytes=settings.max_image_bytes, max_bytes_setting="MAX_IMAGE_BYTES",
                                 connect_timeout_s=settings.fetch_connect_timeout_s,
                                 total_timeout_s=settings.fetch_timeout_s, idle_timeout_s=settings.fetch_timeout_s)
            with timer.stage("fetch"), ThreadPoolExecutor(max_workers=len(sources)) as pool:
                downloads = list(pool.map(
                    lambda source: fetch_bytes(source[1], source[0], settings.address_policy, limits), sources))
            with timer.stage("decode"):
                return [open_image(raw, key, settings.max_image_pixels, request.operation)
                        for (key, _), raw in zip(sources, downloads)]
        with timer.stage("decode"):
            return [decode_image(data, key, settings.max_image_bytes, settings.max_image_pixels, request.operation)
                    for key, data in sources]

    def _check_prompt_count(self, request: JobRequest) -> None:
        if len(request.prompts) > self.settings.max_prompts:
            raise InputError(f"prompt: {len(request.prompts)} prompts; this worker allows at most "
                             f"{self.settings.max_prompts} per job (MAX_PROMPTS)")

    def _check_edit_prompt_tokens(self, request: JobRequest) -> None:
        """Edit prompts, counted in the text encoder's tokens (a character can be several)."""
        if request.operation == "decompose":  # Layered cuts its text-only prompts at 512 tokens itself
            texts = [(f"edits[{i}].{key}", getattr(edit, key)) for i, edit in enumerate(request.edits)
                     for key in ("prompt", "negative_prompt")]
        else:
            named = ([(f"prompt[{i}]", text) for i, text in enumerate(request.prompt)]
                     if isinstance(request.prompt, list) else [("prompt", request.prompt)])
            texts = [*named, ("negative_prompt", request.negative_prompt)]
        for key, text in texts:
            count = self.host.prompt_tokens(text)
            if count > MAX_EDIT_PROMPT_TOKENS:
                raise InputError(f"{key}: {count} tokens; at most {MAX_EDIT_PROMPT_TOKENS} (the edit model's text "
                                 "positions); shorten it")

    def _check_loras_allowed(self, request: JobRequest) -> None:
        """LoRAs are fused into the weights held on the GPU: streamed weights cannot take them."""
        if not (request.lightning or request.loras):
            return
        key = "lightning" if request.lightning else "loras"
        if self.host.memory_mode == "offload":
            raise InputError(f"{key}: LoRAs fuse into the transformer's weights on the GPU, and this worker "
                             "streams them from CPU memory (MEMORY_MODE offload); use a GPU that holds the "
                             "transformer (resident or text_offload)")

    def _split_layers(self, pipeline, request: JobRequest, layers: list[Image.Image], seed: int,
                      progress: ProgressFn) -> dict[int, list[Image.Image]]:
        """The job's splits, each layer decomposed again with the job's settings and seed."""
        return {split.layer: operations.split_layer(
                    pipeline, request, layers[split.layer], split, seed,
                    lambda update, stage=f"split[{i}]": progress({**update, "stage": stage}))
                for i, split in enumerate(request.split)}

    def _edit_layers(self, request: JobRequest, layers: list[Image.Image], seed: int, levers: tuple[str, ...],
                     timer: StageTimer, progress: ProgressFn, cfg_batch: bool = False) -> dict[int, Image.Image]:
        """The job's edits, each on its layer, by the edit pipeline on its base weights."""
        if not request.edits:
            return {}
        pipeline = self._ready_pipeline("edit", [], timer)  # layer edits run on the base model
        edited = {}
        with timer.stage("inference"), self.host.saving_memory(pipeline, levers):
            for i, edit in enumerate(request.edits):
                stage = f"edits[{i}]"
                edited[edit.layer] = operations.edit_layer(
                    pipeline, layers[edit.layer], edit, edit_seed(request, i, seed), request.guidance_scale,
                    request.matte_for(1), lambda update, stage=stage: progress({**update, "stage": stage}),
                    cfg_batch=cfg_batch)
        return edited

    def _ready_pipeline(self, operation: str, adapters: list, timer: StageTimer):
        """The pipeline that runs `operation`, ready for it: Layered loaded on its first job
        and, on a GPU too small for both transformers, this one back from CPU memory (timed
        as `load`); for edits, exactly `adapters` applied (switching sets timed as `lora`)."""
        with timer.stage("load") if self.host.needs_loading(operation) else contextlib.nullcontext():
            pipeline = self.host.for_operation(operation)
        if operation != "decompose":  # the set held ready, unfused or fused (src/models/lora/switch.py)
            with timer.stage("lora") if self.host.needs_lora_change(adapters) else contextlib.nullcontext():
                self.host.apply_loras(pipeline, adapters)
        return pipeline

    def _run_composite(self, job_id: str, request: JobRequest, timer: StageTimer) -> dict:
        """`composite`: layers stacked on the CPU. No pipeline, no GPU: it runs whatever
        state the models are in."""
        with timer.stage("decode"):
            layers = [decode_image(data, f"layers_base64[{i}]", self.settings.max_image_bytes,
                                   self.settings.max_image_pixels).convert("RGBA")
                      for i, data in enumerate(request.layers_base64)]
        check_same_size(layers)
        bucket = response.bucket_for(request, self.settings)
        stack = LayerStack(layers)
        with timer.stage("composite"):
            composite = stack.final_composite
        entries, warnings = response.encode_and_store([("composite", composite)], request, bucket, job_id, timer,
                                                      self.settings)
        archive = None
        if request.archive:
            archive, archive_warnings = response.archive_and_store(stack, request, bucket, entries, timer,
                                                                   self.settings)
            warnings += archive_warnings
        return response.finish(response.composite_output(entries, composite.size, archive), timer, self.price,
                               warnings)

    def _take_start_load_s(self) -> float | None:
        """The start-up load's seconds the first time (they go in its timings), then None."""
        load_s, self.unreported_load_s = self.unreported_load_s, None
        return load_s


def _result_name(index: int, count: int) -> str:
    """The name (and object key) of edit result `index`: `output` alone, else `output_<index>`."""
    return "output" if count == 1 else f"output_{index}"


def _matte_used(request: JobRequest, images: list[Image.Image]) -> str | None:
    """The matte RGBA images went to the edit model on, if any did: RGBA edit inputs, or
    a decomposition's layers when it has edits."""
    if request.operation == "decompose":
        return request.matte_for(1) if request.edits else None
    return request.matte_for(len(images)) if any(image.mode == "RGBA" for image in images) else None


def _check_alpha_format(request: JobRequest, images: list[Image.Image]) -> None:
    """A single RGBA edit keeps its alpha, which JPEG cannot hold."""
    if (request.operation == "edit" and len(images) == 1 and images[0].mode == "RGBA"
            and request.output_format == "jpeg"):
        raise InputError("output_format: 'jpeg' cannot keep the input image's alpha channel; use png or webp")
