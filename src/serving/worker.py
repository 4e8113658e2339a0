"""One job, start to finish: parse, decode, run, encode, store, respond.

Everything that can be wrong with a job's input is found before the GPU is used.
Every failure becomes `{"error": "<key>: <reason>"}` and the worker stays ready for
the next job; CUDA out-of-memory also asks RunPod for a fresh worker.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from src.job.codec import decode_image, open_image
from src.job.schema import InputError, JobRequest, SEED_LIMIT, error_text, parse_request
from src.models import compile_cache
from src.models.compile_meter import CompileMeter
from src.models.early_read import EarlyRead
from src.models.loras import LoraLibrary, adapters_for, lightning_scheduler
from src.models.host import ModelHost, device_name
from src.plumbing.config import BucketConfig, ConfigError, Settings
from src.plumbing.metering import Price, StageTimer, price_for
from src.plumbing.storage import Bucket, StorageError, UploadPolicy
from src.plumbing.url_fetch import FetchLimits, fetch_bytes
from src.serving import archives, operations
from src.serving.layers import LayerStack, check_edit_count, check_same_size, describe_layers, edit_seed
from src.serving.operations import ProgressFn
from src.serving.results import OutputTooLarge, describe, encode_all
from src.serving.stops import JobStopped, StopChannel

log = logging.getLogger(__name__)

WARMUP_IMAGE_SIZE = 64  # the orchestrators' health-check shape: 64x64 grey, "test", 1 step
WARMUP_OUTPUT_SIDE = 256
# Two steps, not the health checks' one: with one step the models' scheduler divides 0 by 0
# (ONE_STEP_WARNING) and numpy warns at every start, which reads as a fault; a second step of
# 256x256 costs little beside compiling, and the warm-up then makes a real image.
WARMUP_STEPS = 2
# diffusers' Qwen transformer has 4096 text rope positions, starting after the output's
# largest half-side in patches (64 at 2048 px), and the edit pipeline never truncates its
# prompt: a longer text sequence fails inside the transformer (docs/upstream-register.md,
# row 16). The condition images' vision tokens (about 190 each, three at most) and the
# template take about 600 of them, so an edit prompt of this many tokens always fits.
MAX_EDIT_PROMPT_TOKENS = 3000
# diffusers' FlowMatchEulerDiscreteScheduler with the models' shift_terminal=0.02 divides
# 0 by 0 for a single step, so a 1-step image is black. Served as the pipeline gives it
# (health checks use 1 step), with this note.
ONE_STEP_WARNING = ("num_inference_steps: with 1 step the models' scheduler (shift_terminal) yields NaN "
                    "and a black image; use 2 or more for a real image")


def _no_progress(update: dict) -> None:
    pass


@dataclass
class Worker:
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

    @classmethod
    def start(cls, settings: Settings, early_read: EarlyRead | None = None, ranks=None) -> "Worker":
        """Load the models and warm them up: the first job pays neither. `early_read`: the
        weights' read-ahead handler.py began before the imports (src/models/early_read.py);
        `ranks`: a multi-GPU worker's (src/serving/parallel.py)."""
        host = ModelHost(settings, early_read, ranks)
        load_s = host.load()
        worker = cls(settings, host, price_for(device_name(host.device), settings.gpu_price_per_hour),
                     loras=LoraLibrary(type(host.edit), host.edit.transformer, settings.edit_model),
                     stops=StopChannel.from_sdk())
        worker.get_ready(load_s)
        return worker

    def get_ready(self, load_s: float = 0.0, lora_branches: bool = True) -> None:
        """Everything between loading the models and the first job: the Lightning files
        checked, the LoRA branches installed, the compile cache loaded, the warm-up, the LoRA
        set held ready, the compile cache saved. Each stage's seconds go to `startup_s`, each
        warm pass's compile figures to `compile_meter` (src/models/compile_meter.py).
        tools/bench.py runs this on its own models; `lora_branches=False` leaves the base
        blocks alone (its lever measurements)."""
        settings, host = self.settings, self.host
        if "lightning" in settings.preload:
            start = time.perf_counter()
            for steps in (4, 8):
                host.check_lightning_fusable(self._lightning(steps))  # the weights its fuse reads (FP8)
            load_s += time.perf_counter() - start
        self.startup_s["load"] = self.unreported_load_s = load_s
        if lora_branches:
            start = time.perf_counter()
            host.install_lora_branches()  # before the warm-up compiles the blocks with them
            self.startup_s["lora_branches"] = time.perf_counter() - start
        key = self.compile_cache_key()
        if key is not None:  # before anything compiles
            start = time.perf_counter()
            self.compile_cache_state = compile_cache.load(settings.compile_cache_dir, key)
            self.startup_s["compile_cache_load"] = time.perf_counter() - start
        if settings.warmup:
            self.startup_s["warmup"] = self.warm_up()
        self.startup_s["loras"] = self.prepare_loras()
        if key is not None and self.compile_cache_state == "cold" and settings.warmup:
            start = time.perf_counter()
            compile_cache.save(settings.compile_cache_dir, key)
            self.startup_s["compile_cache_save"] = time.perf_counter() - start
        log.info("ready on %s: %s", self.price.gpu,
                 ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.startup_s.items()))

    def compile_cache_key(self) -> compile_cache.CacheKey | None:
        """What the compiled blocks depend on (src/models/compile_cache.py), where COMPILE=true
        compiles them (CUDA) and COMPILE_CACHE_DIR is not off."""
        settings, host = self.settings, self.host
        if not (settings.compile and settings.compile_cache_dir and host.device.type == "cuda"):
            return None
        models = [f"{ref.repo_id}@{ref.revision}" for ref in (host.edit_ref, host.layered_ref) if ref is not None]
        return compile_cache.CacheKey.for_setup(
            device_name(host.device), torch.cuda.get_device_capability(host.device), models,
            {"quantize": settings.quantize, "fp8_keep_bf16": sorted(settings.fp8_keep_bf16),
             "attention_backend": settings.attention_backend, "lora_branch_rank": settings.lora_branch_rank,
             "caption_decoder": settings.caption_decoder, "preload": sorted(settings.preload),
             "memory_mode": host.memory_mode, "swap": host.swap_transformers})

    def _lightning(self, steps: int) -> list:
        """The adapters of the PRELOAD Lightning preset of `steps` steps."""
        return adapters_for(JobRequest(image_base64="", prompt="-", lightning=steps), self.settings, self.loras)

    def prepare_loras(self) -> float:
        """Before serving: with PRELOAD naming lightning, the LIGHTNING_RESIDENT_STEPS preset
        fused once and held ready (src/models/lora_resident.py: on the GPU where the memory plan has
        room, else in CPU memory); with the warm-up, one edit pass with the branches on (the
        only structure the base pass has not compiled), so no LoRA job compiles. Returns
        seconds taken."""
        start = time.perf_counter()
        settings, host = self.settings, self.host
        steps = settings.lightning_resident_steps
        if "lightning" in settings.preload and steps and host.memory_mode != "offload":
            host.hold_lightning_ready(self._lightning(steps))
            self.startup_s["lora_hold"] = time.perf_counter() - start
            # No warm pass with the set held ready: it changes the layers' values only (same
            # shapes, dtypes and modules), and such a pass compiled nothing on the H200
            # (0 graphs, cold and warm compile cache; docs/performance.md), so the base pass
            # covers its jobs.
        if settings.warmup and host.lora_branches_padded:
            with host.empty_lora_branches():  # zeros: the same output, the branched blocks compiled
                self._warm_edit("edit, the LoRA branches on")
        host.use_base_weights()
        return time.perf_counter() - start

    def _warm_edit(self, name: str = "edit") -> None:
        grey = Image.new("RGB", (WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE), (128, 128, 128))
        request = JobRequest(image_base64="", prompt="test", num_inference_steps=WARMUP_STEPS,
                             width=WARMUP_OUTPUT_SIDE, height=WARMUP_OUTPUT_SIDE)
        pipeline = self.host.for_operation("edit")
        with self._metered(name):
            operations.edit(pipeline, request, [grey], seed=0, progress=_no_progress)

    @contextlib.contextmanager
    def _metered(self, name: str):
        """One warm pass as a span of `compile_meter`, logged with what it compiled."""
        with self.compile_meter.span(name) as span:
            yield
        main = ", ".join(f"{phase} {span.phases_s[phase]:.1f} s" for phase in CompileMeter.MAIN_PHASES
                         if phase in span.phases_s)
        log.info("warm pass (%s): %.1f s, %d graphs compiled%s", name, span.seconds, span.graphs,
                 f" ({main})" if main else "")

    def warm_up(self) -> float:
        """A short run of each loaded pipeline, Layered first where its transformer is the one on
        the device: with the transformers swapping, the warm-up moves one of them at most, and
        ends with the edit transformer in place for the LoRA preparation and the first edit."""
        start = time.perf_counter()
        layered_first = self.host.layered_loaded and self.host.needs_loading("edit")
        if layered_first:
            self._warm_decompose()
        self._warm_edit()
        if self.host.layered_loaded and not layered_first:
            self._warm_decompose()
        return time.perf_counter() - start

    def _warm_decompose(self) -> None:
        layered = self.host.for_operation("decompose")
        # A graphed captioning decoder (CAPTION_DECODER) records, and compiles, its step now.
        if self.host.captioner is not None:
            with self._metered("caption decoder"):
                self.host.captioner.warm_up(self.host.device)
        grey = Image.new("RGB", (WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE), (128, 128, 128))
        request = JobRequest(operation="decompose", image_base64="", prompt="test", num_inference_steps=WARMUP_STEPS,
                             layers=2)
        with self._metered("decompose"):
            operations.decompose(layered, request, grey, seed=0, progress=_no_progress)

    # ------------------------------------------------------------------
    def handle(self, job: dict, progress: ProgressFn = _no_progress) -> dict:
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
        bucket = self._bucket_for(request)
        images = self._input_images(request, timer)
        _check_alpha_format(request, images)
        levers = self._memory_levers(request, images)  # refuses a job this GPU cannot hold
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
        entries, warnings = self._store(named, request, bucket, job_id, timer)
        warnings += _lever_warnings(levers, retried)
        if request.operation != "decompose":
            for entry, result in zip(entries, results):
                entry.update(prompt_index=result.prompt_index, seed=result.seed)
        archive = None
        if request.archive:
            archive, archive_warnings = self._store_archive(stack, request, bucket, entries, timer)
            warnings += archive_warnings
        if request.use_fp8 is not None and request.use_fp8 != (self.settings.quantize == "fp8"):
            warnings.append(f"use_fp8: accepted for compatibility; this worker's precision is set by its "
                            f"QUANTIZE setting ({self.settings.quantize}: "
                            f"{'FP8' if self.settings.quantize == 'fp8' else 'the published bf16 weights'})")
        if request.steps == 1:
            warnings.append(ONE_STEP_WARNING)
        warnings += [f"edits[{i}].{ONE_STEP_WARNING}" for i, edit in enumerate(request.edits) if edit.steps == 1]
        output = self._respond(request, seed, entries, warnings, timer, adapters, archive,
                               _matte_used(request, images))
        if levers:
            output["memory_levers"] = list(levers)
        return output

    def _memory_levers(self, request: JobRequest, images: list[Image.Image]) -> tuple[str, ...]:
        """The memory levers this job needs on this GPU (src/models/memory_plan.py), or InputError
        with the limit in force when none makes it fit."""
        return self.host.memory_levers(request, [image.size for image in images])

    def _batches_cfg(self, request: JobRequest, images: list[Image.Image], levers: tuple[str, ...]) -> bool:
        """CFG_BATCH for this job: its CFG steps run two samples at once, so only where the
        memory plan has room for them (src/models/memory_plan.py `cfg_pair`); else as usual."""
        return self.host.batches_cfg(request, [image.size for image in images], levers)

    def _infer(self, request: JobRequest, images: list[Image.Image], seed: int, adapters: list,
               levers: tuple[str, ...], timer: StageTimer, progress: ProgressFn):
        """The job's pipeline calls: (named images, edit results or None, layer stack or None)."""
        cfg_batch = self._batches_cfg(request, images, levers)
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
        if operation != "decompose":  # the set held ready, unfused or fused (src/models/lora_switch.py)
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
        bucket = self._bucket_for(request)
        stack = LayerStack(layers)
        with timer.stage("composite"):
            composite = stack.final_composite
        entries, warnings = self._store([("composite", composite)], request, bucket, job_id, timer)
        output: dict = {"success": True, "operation": "composite", "images": entries, "composite": entries[0],
                        "image_size": [composite.width, composite.height]}
        if request.archive:
            output["archive"], archive_warnings = self._store_archive(stack, request, bucket, entries, timer)
            warnings += archive_warnings
        timings = timer.report()
        output.update(timings_ms=timings, inference_time_ms=0, cost=self.price.cost(timer.elapsed_s()))
        output["cost_usd"] = output["cost"]["usd"]
        if warnings:
            output["warnings"] = warnings
        return output

    def _store(self, named: list[tuple[str, Image.Image]], request: JobRequest, bucket: Bucket | None,
               job_id: str, timer: StageTimer) -> tuple[list[dict], list[str]]:
        with timer.stage("encode"):
            encoded = encode_all(named, request.output_format, request.output_quality,
                                 self.settings.png_compress_level)
        with timer.stage("upload"):
            return describe(
                encoded, request.output_format, bucket=bucket, prefix=self.settings.bucket_prefix,
                job_id=job_id, inline=request.wants_base64 or bucket is None,
                max_inline_bytes=self.settings.max_inline_bytes,
            )

    def _store_archive(self, stack: LayerStack, request: JobRequest, bucket: Bucket | None,
                       entries: list[dict], timer: StageTimer) -> tuple[dict, list[str]]:
        """The final stack (split layers as groups of their sub-layers) and its composite in
        one file, next to the images. Returns the output's `archive` entry and warnings."""
        composite = stack.archived_composite
        with timer.stage("archive"):
            data = archives.build(request.archive, stack.archived(), composite, self.settings.png_compress_level)
        with timer.stage("upload"):
            return archives.describe(
                data, request.archive, layer_count=stack.archived_layer_count, size=composite.size, bucket=bucket,
                image_entries=entries, inline=request.wants_base64 or bucket is None,
                max_inline_bytes=self.settings.max_inline_bytes)

    def _bucket_for(self, request: JobRequest) -> Bucket | None:
        policy = UploadPolicy.from_settings(self.settings)
        if request.r2 is not None:
            r2 = request.r2
            config = BucketConfig(bucket_name=r2.bucket_name, access_key_id=r2.access_key_id,
                                  secret_access_key=r2.secret_access_key.get_secret_value(),
                                  endpoint_url=r2.endpoint_url, region=r2.region)
            # A job's endpoint is untrusted: checked by the SSRF guard, its connections pinned.
            return Bucket.for_job(config, self.settings.presign_expiry_s, policy, self.settings.address_policy)
        if self.settings.bucket is not None:
            return Bucket(self.settings.bucket, self.settings.presign_expiry_s, policy)
        return None

    def _respond(self, request: JobRequest, seed: int, entries: list[dict], warnings: list[str],
                 timer: StageTimer, adapters: list, archive: dict | None = None,
                 matte: str | None = None) -> dict:
        model = self.host.layered_ref if request.operation == "decompose" else self.host.edit_ref
        output: dict = {
            "success": True,
            "operation": request.operation,
            "seed": seed,
            "num_inference_steps": request.steps,
            "true_cfg_scale": request.cfg_scale,
            "model": model.describe(),
            "images": entries,
        }
        if request.lightning:
            output["lightning"] = {"steps": request.lightning, "repo": self.settings.lightning_repo,
                                   **adapters[0].describe(), "true_cfg_scale": 1.0,
                                   "scheduler": "FlowMatchEulerDiscreteScheduler, shift 3 (ModelTC/Qwen-Image-Lightning)"}
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
        timings = timer.report()
        if self.unreported_load_s is not None:
            timings["load"] = round(self.unreported_load_s * 1000 + timings.get("load", 0.0), 1)
            self.unreported_load_s = None
        output["timings_ms"] = timings
        output["inference_time_ms"] = int(timings["inference"])
        output["cost"] = self.price.cost(timer.elapsed_s())
        output["cost_usd"] = output["cost"]["usd"]
        if warnings:
            output["warnings"] = warnings
        return output


# What each memory lever changes, said in the job's warnings when it ran.
LEVER_NOTES = {
    "layers_one_at_a_time": "the layers were VAE-decoded one at a time instead of in one batch (pixels may differ "
                            "by a few levels of 255)",
    "vae_tiling": "the VAE decoded in overlapping tiles (pixels differ slightly from an untiled decode)",
}


def _lever_warnings(levers: tuple[str, ...], retried: bool) -> list[str]:
    cause = ("the first attempt ran out of GPU memory and the job was run again" if retried
             else "the job would not fit this worker's GPU memory otherwise")
    return [f"memory: {LEVER_NOTES[lever]}: {cause}" for lever in levers]


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
