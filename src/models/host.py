"""The model host: the one face `src/serving/` meets for the models.

It loads the diffusers pipelines from the HF cache, offline (a model missing from HF_HOME
stops the start with an error naming the repo id and the cache path), and keeps them ready:
which transformer is on the device, the memory mode, plan and levers, the LoRA branches and
the set held ready, the FP8 published-weights check, and context parallelism across the
ranks it is given. The Layered pipeline borrows the edit pipeline's text encoder, tokenizer
and processor where its repository holds the same files (src/models/files/shared_components.py),
so the 7B text encoder is resident once. With QUANTIZE=fp8 and a matching FP8 cache
(src/models/fp8/cache.py), a transformer's bf16 block linears are not read at all.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from diffusers import QwenImageEditPlusPipeline, QwenImageLayeredPipeline

from src.job.schema import JobRequest
from src.models import captioning, upstream_fixes
from src.models.fp8 import linear as fp8
from src.models.fp8 import cache as fp8_cache
from src.models.lora import fp8_fusing as fp8_loras
from src.models.fp8 import packed as fp8_packed
from src.models.memory import image_vae
from src.models.lora import branches as lora_branches
from src.models.memory import modes as memory
from src.models.memory import plan as memory_plan
from src.models.files import tensors as weights
from src.models.acceleration import ParallelRanks, accelerate, check_supported, enable_context_parallel
from src.models.files.early_read import EarlyRead, edit_folders, layered_folders
from src.models.lora.switch import LoraSwitch
from src.models.lora.adapters import FusedLoras, LoraLibrary
from src.models.memory.modes import HostMemoryError
from src.models.files.shared_components import SHARED_COMPONENTS, own_components
from src.models.memory.transformer_swap import TransformerSwap, host_room_for_twins
from src.models.vl_processor import load_processor
from src.models.files.tensors import ModelRef, locate
from src.plumbing.config import FP8_CACHE_FOLDER, ConfigError, Settings

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is visible")
    return torch.device(setting)


def dtype_for(device: torch.device) -> torch.dtype:
    # bf16 is what the weights are published in; CPU runs (tests, demo) use float32
    # so outputs are exact and comparable.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class ModelHost:
    """The edit pipeline, loaded at start, and the Layered pipeline, at start or on first use."""

    def __init__(self, settings: Settings, early_read: EarlyRead | None = None, ranks: ParallelRanks | None = None):
        self.settings = settings
        # The start's read-ahead begun before the imports (src/models/files/early_read.py), taken over by reading_ahead.
        self.early_read = early_read
        self.device = resolve_device(settings.device)
        check_supported(settings.quantize, self.device)  # before minutes of loading
        self.dtype = dtype_for(self.device)
        self.edit_ref = locate(settings.edit_model, settings.hf_home)
        # Locate Layered now too when it will be loaded at start, so a missing model fails the start.
        self.layered_ref: ModelRef | None = (
            locate(settings.layered_model, settings.hf_home) if "layered" in settings.preload else None
        )
        self.edit: QwenImageEditPlusPipeline | None = None
        self._layered: QwenImageLayeredPipeline | None = None
        self.captioner: captioning.Captioner | None = None  # Layered's, when CAPTION_DECODER is not stock
        # Both transformers (2 x 41 GB in bf16) do not fit next to the text encoder on an
        # 80 GB card; then the idle one waits in CPU memory and they trade places per job
        # (src/models/memory/transformer_swap.py), and `transformer_on_device` names the one on the GPU.
        self.swap_transformers = settings.transformer_swap == "always"
        self.swap = TransformerSwap(self.device, use_twins=True)  # arrange_memory checks the CPU memory
        self.transformer_on_device = "edit"
        self.memory_mode = "resident"  # load() chooses (MEMORY_MODE)
        # Which jobs fit beside the weights (src/models/memory/plan.py); None on the CPU unless
        # GPU_MEMORY_GIB sets a capacity to plan for.
        self.plan: memory_plan.MemoryPlan | None = None
        self.prefetched: list[dict] = []  # what WEIGHTS_PREFETCH read, per pipeline loaded
        # Under QUANTIZE=fp8, the published weights the held Lightning set's fuse reads, read ahead.
        self._published_reading: Future | None = None
        # QUANTIZE=fp8: the FP8 caches found, by repo id (fp8_cache_for), and per transformer
        # loaded whether the cache served it and what it read.
        self.fp8_caches: dict[str, fp8_cache.Cache] = {}
        self.fp8_loads: list[dict] = []
        # Under FP8, LoRAs fuse into the published bf16 weights, read from the snapshot.
        self.fused_loras = FusedLoras(self.edit_published_weights if settings.quantize == "fp8" else None, self.dtype)
        # How each job's LoRA set runs: held ready, unfused beside the weights, or fused
        # (src/models/lora/switch.py); the worker installs the branches and the resident set at start.
        self.loras = LoraSwitch(self.fused_loras, settings.lora_fuse_after)
        # The ranks of a multi-GPU worker (src/serving/parallel.py). Turning context parallelism on
        # is collective, so it waits until every rank has loaded (start_parallel); a transformer
        # loaded after that runs under it as it loads.
        self.ranks = ranks
        self.parallel = False

    def load(self) -> float:
        """Load what PRELOAD names (the edit pipeline always). Returns seconds taken."""
        start = time.perf_counter()
        log.info("loading %s@%s onto %s (%s)", self.edit_ref.repo_id, self.edit_ref.revision[:12],
                 self.device, self.dtype)
        cache = self.fp8_cache_for(self.edit_ref)
        with self.reading_ahead("edit", *edit_folders(self.edit_ref.path, cache is not None)):
            self.edit = self.load_edit()
            self.arrange_memory()
            self.prepare(self.edit)  # the copies to the GPU, while later files are still being read
        if "layered" in self.settings.preload:
            self.layered()
        return time.perf_counter() - start

    @contextmanager
    def reading_ahead(self, pipeline: str, *folders: Path) -> Iterator[None]:
        """WEIGHTS_PREFETCH: the weight files in `folders` read on a background thread while
        the body loads them, and waited for at its end (not after a failure). Where the start's
        early read has `pipeline`'s files under way, its read is taken over and only the files
        it lacks are read here: no file is read twice, and `prefetched` holds each read's report."""
        if not weights.should_prefetch(self.settings.weights_prefetch, self.settings.hf_home):
            yield
            return
        early = self.early_read.take(pipeline) if self.early_read is not None else None
        readings = [early[1]] if early is not None else []
        already = set(early[0]) if early is not None else set()
        rest = [path for path in weights.weight_files(*folders) if path not in already]
        if rest or early is None:
            readings.append(weights.read_ahead(rest))
        yield
        self.prefetched.extend(reading.result() for reading in readings)

    def fp8_cache_for(self, ref: ModelRef) -> fp8_cache.Cache | None:
        """The FP8 cache of `ref`'s transformer when QUANTIZE=fp8, FP8_CACHE=on and one matches
        (else None, with a log line saying why: the transformer is then quantized at start)."""
        if self.settings.quantize != "fp8" or not self.settings.fp8_cache:
            return None
        root = self.settings.fp8_cache_dir or self.settings.hf_home / FP8_CACHE_FOLDER
        keep = self.settings.fp8_keep_bf16
        try:
            skeleton = fp8_cache.empty_transformer(ref.path / fp8_cache.TRANSFORMER, self.dtype, keep)
            cache = fp8_cache.find(root, ref.repo_id, ref.revision, fp8_cache.recipe(keep, self.dtype),
                                   fp8_cache.cached_tensor_specs(skeleton))
        except (fp8_cache.CacheUnusable, OSError) as exc:
            log.info("FP8 cache not used for %s@%s: %s; quantizing at start instead (write one with: "
                     "python tools/download_models.py --fp8 --hf-home %s)", ref.repo_id, ref.revision[:12], exc,
                     self.settings.hf_home)
            self.fp8_loads.append({"model": ref.repo_id, "cache": False, "why": str(exc)})
            return None
        log.info("FP8 cache: %s@%s's FP8 block linears from %s (%.1f GB)", ref.repo_id, ref.revision[:12],
                 cache.folder, cache.nbytes / 1e9)
        self.fp8_caches[ref.repo_id] = cache
        return cache

    def cached_transformer(self, ref: ModelRef) -> dict:
        """`{"transformer": …}` loaded through the FP8 cache fp8_cache_for found, for
        from_pretrained, or {} to let it load the bf16 one (no cache, or one that fails to
        read: logged, and quantized at start)."""
        cache = self.fp8_caches.pop(ref.repo_id, None)
        if cache is None:
            return {}
        try:
            transformer, report = fp8_cache.load_transformer(cache, ref.path / fp8_cache.TRANSFORMER, self.dtype,
                                                             self.device, self.settings.fp8_keep_bf16)
        except (fp8_cache.CacheUnusable, weights.BadWeightFile, OSError, RuntimeError) as exc:
            log.warning("FP8 cache at %s failed to load (%s); quantizing at start instead", cache.folder, exc)
            self.fp8_loads.append({"model": ref.repo_id, "cache": False, "why": str(exc)})
            return {}
        log.info("FP8 cache: transformer loaded in %.1f s, %.1f GB read (%.1f GB of it from the snapshot)",
                 report.seconds, report.bytes_read / 1e9, report.snapshot_bytes / 1e9)
        self.fp8_loads.append({"model": ref.repo_id, "cache": True, "seconds": round(report.seconds, 2),
                               "bytes_read": report.bytes_read})
        return {"transformer": transformer}

    def load_edit(self) -> QwenImageEditPlusPipeline:
        """The edit pipeline from the cache, in CPU memory (but FP8 block linears from an FP8 cache: on the device)."""
        processor = load_processor(str(self.edit_ref.path))
        pipeline = QwenImageEditPlusPipeline.from_pretrained(self.edit_ref.path, processor=processor, dtype=self.dtype,
                                                             **self.cached_transformer(self.edit_ref))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def edit_published_weights(self) -> fp8_loras.PublishedWeights:
        """The edit transformer's weights as published, read by name from its snapshot:
        what LoRAs under QUANTIZE=fp8 fuse into, whatever loaded the FP8 blocks."""
        return fp8_loras.PublishedWeights(self.edit_ref.path / "transformer", self.dtype)

    def load_layered(self) -> QwenImageLayeredPipeline:
        """The Layered pipeline from the cache, in CPU memory, with the edit pipeline's text
        encoder, tokenizer and processor where Layered's own are the same files."""
        own = self.layered_own_components
        log.info("loading %s@%s (%s)", self.layered_ref.repo_id, self.layered_ref.revision[:12],
                 f"its own {', '.join(own)}: they differ from the edit model's" if own
                 else "text encoder, tokenizer and processor shared with the edit model")
        components = {name: getattr(self.edit, name) for name in SHARED_COMPONENTS if name not in own}
        if "processor" in own:
            components["processor"] = load_processor(str(self.layered_ref.path))
        components.update(self.cached_transformer(self.layered_ref))
        pipeline = QwenImageLayeredPipeline.from_pretrained(self.layered_ref.path, dtype=self.dtype, **components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @cached_property
    def layered_own_components(self) -> tuple[str, ...]:
        """Which of text_encoder, tokenizer and processor Layered loads from its own snapshot."""
        return own_components(self.edit_ref.path, self.layered_ref.path)

    def prepare(self, pipeline, text_encoder_placed: bool = False) -> None:
        """Correct (the authors' way), quantize, place (the memory mode) and accelerate a
        pipeline loaded on the CPU. FP8 quantizes each linear on the GPU as it moves there,
        so the bf16 transformer never has to fit whole (a transformer from the FP8 cache has
        no block linears left to quantize: quantize_blocks replaces none)."""
        upstream_fixes.apply(pipeline)
        if self.settings.quantize == "fp8":
            fp8.quantize_blocks(pipeline.transformer, self.device, keep=self.settings.fp8_keep_bf16)
            if self.settings.fp8_pack_qkv:
                fp8_packed.pack_projections(pipeline.transformer)
        image_vae.for_images(pipeline.vae)  # same pixels, without the video VAE's dead feature cache
        memory.place(pipeline, self.memory_mode, self.device, text_encoder_placed=text_encoder_placed)
        self.accelerate(pipeline.transformer)

    @property
    def layered_loaded(self) -> bool:
        return self._layered is not None

    def layered(self) -> QwenImageLayeredPipeline:
        if self._layered is None:
            assert self.edit is not None, "load() first"
            self.layered_ref = self.layered_ref or locate(self.settings.layered_model, self.settings.hf_home)
            own_text_encoder = "text_encoder" in self.layered_own_components
            if self.swap_transformers:  # decided with the memory mode (arrange_memory)
                log.info("GPU too small for both transformers: the idle one waits in CPU memory")
                self.loras.to_base(self.edit)  # the edit transformer's copy holds its base weights
                self.swap.leave(self.edit.transformer)
            # Its own text encoder, unless it differs from the edit model's, is not read either.
            cache = self.fp8_cache_for(self.layered_ref)
            with self.reading_ahead("layered", *layered_folders(self.layered_ref.path, own_text_encoder,
                                                                cache is not None)):
                layered = self.load_layered()
                self.prepare(layered, text_encoder_placed=not own_text_encoder)
            # Empty prompts are captioned by CAPTION_DECODER whenever Layered is loaded (at start
            # or by a job); a static decoder's graph is recorded by the worker's warm-up.
            decoder = captioning.decoder_for(self.settings.caption_decoder, self.settings.compile, self.device)
            self.captioner = captioning.install(layered, decoder)
            self._layered = layered
            self.transformer_on_device = "layered" if self.swap_transformers else self.transformer_on_device
        return self._layered

    def arrange_memory(self) -> None:
        """The memory mode, whether the transformers swap, and the plan of which jobs fit
        (src/models/memory/plan.py), from the GPU's memory (GPU_MEMORY_GIB, else what it has free
        plus what this process holds) and the weights' bytes. On the CPU, auto means
        resident, and jobs are planned only against a GPU_MEMORY_GIB. FP8 needs its
        transformer resident."""
        settings = self.settings
        if settings.gpu_memory_gib:
            capacity = int(settings.gpu_memory_gib * memory.GIB)
        elif self.device.type == "cuda":
            capacity = memory.free_gpu_bytes(self.device) + torch.cuda.memory_allocated(self.device)
        else:
            self.memory_mode = "resident" if settings.memory_mode == "auto" else settings.memory_mode
            if self.memory_mode == "offload":  # both transformers stream from CPU memory: nothing to swap
                self.swap_transformers = False
            self.check_host_room_for_swap()
            return
        own_text_encoder = (self.layered_ref is not None and "text_encoder" in self.layered_own_components)
        weight_bytes = memory_plan.WeightBytes(
            text_encoder=memory.bytes_of(self.edit.text_encoder),
            transformer=self.prepared_bytes(self.edit.transformer), vae=memory.bytes_of(self.edit.vae),
            layered_text_encoder=memory.bytes_of(self.edit.text_encoder) if own_text_encoder else 0,
            lora_branches=(lora_branches.padded_bytes(self.edit.transformer, settings.lora_branch_rank, self.dtype)
                           if settings.compile else 0))
        arrangement = memory_plan.configure(
            capacity, weight_bytes, settings.quantize, mode_setting=settings.memory_mode,
            swap_setting=settings.transformer_swap, gpu=device_name(self.device))
        self.memory_mode, self.swap_transformers, self.plan = arrangement.mode, arrangement.swap, arrangement.plan
        if self.memory_mode == "offload" and settings.quantize != "none":
            raise ConfigError(
                f"QUANTIZE={settings.quantize} needs the transformer resident on the GPU: "
                f"{capacity / memory.GIB:.1f} GiB is too little (memory mode offload); use QUANTIZE=none on this GPU")
        log.info("memory mode %s; %s", self.memory_mode, self.plan.limits())
        self.check_host_room_for_swap()

    def check_host_room_for_swap(self) -> None:
        """With the transformers swapping: whether CPU memory holds both page-locked copies
        (src/models/memory/transformer_swap.py) beside a Lightning set held there (PRELOAD=lightning:
        fused and base, counted at every block linear but the modulation ones, as the
        published Lightning files touch), counting the weights the placement will free; else
        the swap copies pageable memory both ways, as one log line says."""
        if not self.swap_transformers:
            return
        settings, transformer = self.settings, self.edit.transformer
        twins = 2 * self.prepared_bytes(transformer)
        lightning = 0
        if "lightning" in settings.preload and settings.lightning_resident_steps:
            keep = settings.fp8_keep_bf16 if settings.quantize == "fp8" else fp8.BLOCK_LINEARS
            touched = tuple(name for name in fp8.BLOCK_LINEARS if name not in fp8.MODULATION_LINEARS)
            lightning = 2 * fp8.prepared_bytes(transformer, keep, only=touched)
        available = weights.available_memory_bytes()
        if available is not None:  # what the placement moves to the device leaves CPU memory
            moving = [transformer] + ([self.edit.text_encoder] if self.memory_mode == "resident" else [])
            available += sum(p.nbytes for module in moving for p in module.parameters() if p.device.type == "cpu")
        if not host_room_for_twins(twins, available, lightning):
            self.swap.use_twins = False
            log.warning("transformer swap: %.1f GB of CPU memory available, too little for both transformers' "
                        "page-locked copies (%.1f GB%s); each switch copies them through pageable memory instead",
                        available / 1e9, twins / 1e9,
                        f" beside {lightning / 1e9:.1f} GB for the Lightning set held ready" if lightning else "")

    def reserve_for_weights(self, nbytes: int) -> bool:
        """Whether `nbytes` of held weights may stay on the device between jobs: only where a
        plan was made (a GPU, or GPU_MEMORY_GIB), both transformers stay put, and every edit
        still runs without memory levers beside them. Jobs that need the room back (the
        largest decompositions) have it released first (`levers_for`)."""
        if self.plan is None or self.swap_transformers or self.memory_mode == "offload":
            return False
        if not replace(self.plan, budget_bytes=self.plan.budget_bytes - nbytes).runs_every_edit_without_levers():
            log.info("memory plan: no room to keep %.1f GiB more on the device (%s)", nbytes / memory.GIB,
                     self.plan.limits())
            return False
        log.info("memory plan: %.1f GiB kept on the device for held weights, released for a job that needs it",
                 nbytes / memory.GIB)
        return True

    def levers_for(self, shape: memory_plan.JobShape, key: str) -> tuple[str, ...]:
        """The memory levers `shape` runs with (or InputError: src/models/memory/plan.py), out
        of the whole budget: the held LoRA set's device copy is released first when the job
        would need another lever beside it."""
        levers = self.plan.levers_for(shape, key)
        held = self.loras.device_copy_bytes()
        if held and self.plan.job_bytes(shape, levers) > self.plan.budget_bytes - held:
            self.loras.release_device_copy(self.edit)
        return levers

    def memory_levers(self, request: JobRequest, sizes: list[tuple[int, int]]) -> tuple[str, ...]:
        """The memory levers `request` (its images of `sizes`) needs on this GPU
        (src/models/memory/plan.py), or InputError with the limit in force when none makes it fit."""
        if self.plan is None:
            return ()
        shape = memory_plan.shape_for(request, sizes)
        if request.operation == "decompose":
            # A split of more sub-layers than the job's layers can be what does not fit.
            key = "split" if shape.sub_layers and self.plan.fits(replace(shape, sub_layers=0)) else "layers"
        elif request.width or request.height:
            key = "width" if request.width else "height"
        else:
            key = request.image_sources[-1][0]
        return self.levers_for(shape, key)

    @staticmethod
    def strongest_levers(operation: str) -> tuple[str, ...]:
        """Every memory lever `operation` has: what a job that ran out of memory retries with."""
        return memory_plan.lever_choices(operation)[-1]

    def batches_cfg(self, request: JobRequest, sizes: list[tuple[int, int]], levers: tuple[str, ...]) -> bool:
        """CFG_BATCH for this job: its CFG steps run two samples at once, so only where the
        memory plan has room for them (src/models/memory/plan.py `cfg_pair`); else as usual."""
        if not self.settings.cfg_batch or self.plan is None:
            return self.settings.cfg_batch
        shape = memory_plan.shape_for(request, sizes)
        return self.plan.fits_cfg_batch(shape, levers, self.loras.device_copy_bytes())

    @staticmethod
    def saving_memory(pipeline, levers: tuple[str, ...]):
        """The VAE's memory levers among `levers`, on for the body (src/models/memory/image_vae.py)."""
        return image_vae.saving_memory(pipeline.vae, levers)

    def prompt_tokens(self, text: str) -> int:
        """`text`'s length in the edit model's text-encoder tokens."""
        return len(self.edit.tokenizer(text).input_ids)

    def loaded_pipelines(self) -> list:
        """The pipelines loaded so far: edit, and Layered once loaded."""
        return [self.edit] + ([self._layered] if self._layered is not None else [])

    # ------------------------------------------------------------------
    # LoRAs: the branches, the set held ready, and each job's set.

    def lora_library(self) -> LoraLibrary:
        """Where jobs' LoRA files are found and checked against the edit transformer (src/models/lora/adapters.py)."""
        return LoraLibrary(type(self.edit), self.edit.transformer, self.settings.edit_model)

    def install_lora_branches(self) -> None:
        """The unfused LoRA branches on the edit transformer's block linears (src/models/lora/branches.py):
        padded to LORA_BRANCH_RANK under compile, so every set runs one compiled structure.
        Not where LoRA jobs are refused (MEMORY_MODE offload)."""
        if self.memory_mode != "offload":
            padded = self.settings.lora_branch_rank if self.settings.compile else None
            self.loras.install_branches(self.edit.transformer, self.dtype, padded)

    def check_lightning_fusable(self, adapters: list) -> None:
        """Under QUANTIZE=fp8, the published weights the PRELOAD Lightning set `adapters` fuses
        into are in the snapshot, or the start fails (ConfigError); nothing to check in bf16."""
        if self.settings.quantize != "fp8":
            return
        try:
            self.edit_published_weights().check(fp8_loras.touched_linears(self.edit.transformer, adapters))
        except fp8_loras.PublishedWeightsError as exc:
            raise ConfigError(f"PRELOAD: lightning: {exc}") from None

    def read_ahead_published(self, adapters: list) -> None:
        """Under QUANTIZE=fp8 with WEIGHTS_PREFETCH: the published bf16 weights the held set's
        fuse will read (`fp8_loras.published_reads`, by key from the snapshot, which the FP8
        cache's load left unread) read into the page cache on a background thread, so the
        warm-up runs while the disk reads and the fuse after it finds them in memory."""
        if self.settings.quantize != "fp8" or not weights.should_prefetch(self.settings.weights_prefetch,
                                                                          self.settings.hf_home):
            return
        spans = self.edit_published_weights().spans(fp8_loras.published_reads(self.edit.transformer, adapters))
        if spans:
            self._published_reading = weights.read_spans_ahead(spans, "published weights read ahead")

    def hold_lightning_ready(self, adapters: list) -> None:
        """The LIGHTNING_RESIDENT_STEPS set fused once and held ready (src/models/lora/resident.py:
        on the GPU where the memory plan has room, else in CPU memory), or ConfigError. A read
        ahead of its published weights (`read_ahead_published`) is waited for first: the fuse
        then reads none of them from the disk a second time."""
        if self._published_reading is not None:
            try:
                self.prefetched.append(self._published_reading.result())
            except OSError as exc:  # the fuse reads them itself, and says what is wrong
                log.warning("published weights read ahead failed (%s)", exc)
            self._published_reading = None
        pipeline = self.for_operation("edit")
        try:
            self.loras.hold_ready(pipeline, adapters, pin=self.device.type == "cuda",
                                  reserve_device=self.reserve_for_weights)
        except (fp8_loras.PublishedWeightsError, HostMemoryError) as exc:
            raise ConfigError(f"PRELOAD: lightning (LIGHTNING_RESIDENT_STEPS={self.settings.lightning_resident_steps}):"
                              f" {exc}; set LIGHTNING_RESIDENT_STEPS=0 to run it unfused instead") from None

    @property
    def lora_branches_padded(self) -> bool:
        """Whether the LoRA branches are padded (COMPILE=true): their blocks compile once, warmed empty."""
        branches = self.loras.branches
        return branches is not None and branches.padded_rank is not None

    @contextmanager
    def empty_lora_branches(self) -> Iterator[None]:
        """The edit pipeline on its base weights with its LoRA branches on at zero: the same
        output, through the branched blocks (what the warm-up compiles)."""
        self.use_base_weights()
        self.loras.branches.activate_empty()
        try:
            yield
        finally:
            self.loras.branches.deactivate()

    def use_base_weights(self) -> None:
        """The edit pipeline with no LoRA set applied (a held set stays held)."""
        self.loras.apply(self.for_operation("edit"), [])

    def needs_lora_change(self, adapters: list) -> bool:
        """Whether applying `adapters` changes the LoRA set (timed as `lora`)."""
        return self.loras.needs_change(adapters)

    def apply_loras(self, pipeline, adapters: list) -> None:
        """Exactly `adapters` on the edit pipeline: held ready, unfused or fused (src/models/lora/switch.py)."""
        self.loras.apply(pipeline, adapters)

    def prepared_bytes(self, transformer: torch.nn.Module) -> int:
        """GPU bytes of a transformer of this shape once prepared (FP8 or not)."""
        if self.settings.quantize == "fp8":
            return fp8.prepared_bytes(transformer, keep=self.settings.fp8_keep_bf16)
        return sum(p.numel() for p in transformer.parameters()) * self.dtype.itemsize

    def accelerate(self, transformer: torch.nn.Module) -> None:
        accelerate(transformer, self.device, attention=self.settings.attention_backend,
                   compile_blocks=self.settings.compile)
        if self.parallel:
            enable_context_parallel(transformer, self.ranks)

    def start_parallel(self) -> None:
        """Context parallelism on every loaded transformer (edit, and Layered when loaded), and
        on any loaded later. Collective: every rank calls it, once every rank has loaded."""
        self.parallel = True
        enable_context_parallel(self.edit.transformer, self.ranks)
        if self.layered_loaded:
            enable_context_parallel(self._layered.transformer, self.ranks)

    def needs_loading(self, operation: str) -> bool:
        """Whether running `operation` first loads or moves weights (timed as `load`)."""
        name = "layered" if operation == "decompose" else "edit"
        if name == "layered" and self._layered is None:
            return True
        return self.swap_transformers and self.transformer_on_device != name

    def for_operation(self, operation: str):
        """The pipeline that runs `operation`, with its transformer on the device."""
        name = "layered" if operation == "decompose" else "edit"
        pipeline = self.layered() if name == "layered" else self.edit
        if self.swap_transformers and self.transformer_on_device != name:
            if name == "layered":
                self.loras.to_base(self.edit)  # its CPU copy holds the base weights
            idle = self.edit if name == "layered" else self._layered
            self.swap.leave(idle.transformer)
            self.swap.enter(pipeline.transformer)
            self.transformer_on_device = name
        return pipeline

