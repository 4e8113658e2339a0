"""Start, then serve: the models loaded and made ready before the first job.

`start_worker` loads the models (src/models/host.py) and gets them ready: the Lightning
files checked, the LoRA branches installed, the compile cache loaded, the warm-up (the
branched blocks' pass last), the LoRA set held ready, the compile cache saved. The first
job pays for none of it. A start that cannot serve raises (ConfigError, ModelNotFound...)
and handler.py exits with one line. Each stage's seconds go to the worker's `startup_s`,
each warm pass's compile figures to its `compile_meter` (src/models/compile_meter.py).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from PIL import Image

from src.job.schema import JobRequest
from src.models import compile_cache
from src.models.compile_meter import CompileMeter
from src.models.files.early_read import EarlyRead
from src.models.host import ModelHost, device_name
from src.models.lora.adapters import adapters_for
from src.plumbing.config import Settings
from src.plumbing.metering import price_for
from src.serving import operations
from src.serving.stops import StopChannel
from src.serving.worker import Worker, no_progress

log = logging.getLogger(__name__)

WARMUP_IMAGE_SIZE = 64  # the orchestrators' health-check shape: 64x64 grey, "test", 1 step
WARMUP_OUTPUT_SIDE = 256
# Two steps, not the health checks' one: with one step the models' scheduler divides 0 by 0
# (ONE_STEP_WARNING) and numpy warns at every start, which reads as a fault; a second step of
# 256x256 costs little beside compiling, and the warm-up then makes a real image.
WARMUP_STEPS = 2
WARMUP_LAYERS = 2


def start_worker(settings: Settings, early_read: EarlyRead | None = None, ranks=None) -> Worker:
    """Load the models and warm them up: the first job pays neither. `early_read`: the
    weights' read-ahead handler.py began before the imports (src/models/files/early_read.py);
    `ranks`: a multi-GPU worker's (src/serving/parallel.py)."""
    host = ModelHost(settings, early_read, ranks)
    load_s = host.load()
    worker = Worker(settings, host, price_for(device_name(host.device), settings.gpu_price_per_hour),
                    loras=host.lora_library(), stops=StopChannel.from_sdk())
    get_ready(worker, load_s)
    return worker


def get_ready(worker: Worker, load_s: float = 0.0, lora_branches: bool = True) -> None:
    """Everything between loading the models and the first job, in this order: the Lightning
    files checked, the LoRA branches installed, the compile cache loaded, the warm-up, the
    branched blocks' pass and the LoRA set held ready, the compile cache saved. tools/bench.py
    runs this on its own models; `lora_branches=False` leaves the base blocks alone (its lever
    measurements)."""
    settings, host, startup_s = worker.settings, worker.host, worker.startup_s
    if "lightning" in settings.preload:
        start = time.perf_counter()
        for steps in (4, 8):
            host.check_lightning_fusable(_lightning(worker, steps))  # the weights its fuse reads (FP8)
        if _holds_lightning(worker):  # read while the warm-up runs, fused after it
            host.read_ahead_published(_lightning(worker, settings.lightning_resident_steps))
        load_s += time.perf_counter() - start
    startup_s["load"] = worker.unreported_load_s = load_s
    if lora_branches:
        start = time.perf_counter()
        host.install_lora_branches()  # before the warm-up compiles the blocks with them
        startup_s["lora_branches"] = time.perf_counter() - start
    key = compile_cache_key(worker)
    if key is not None:  # before anything compiles
        start = time.perf_counter()
        worker.compile_cache_state = compile_cache.load(settings.compile_cache_dir, key)
        startup_s["compile_cache_load"] = time.perf_counter() - start
    if settings.warmup:
        warm_up(worker)
    startup_s["loras"] = prepare_loras(worker)
    if key is not None and worker.compile_cache_state == "cold" and settings.warmup:
        start = time.perf_counter()
        compile_cache.save(settings.compile_cache_dir, key)
        startup_s["compile_cache_save"] = time.perf_counter() - start
    log.info("ready on %s: %s", worker.price.gpu,
             ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in startup_s.items()))


def compile_cache_key(worker: Worker) -> compile_cache.CacheKey | None:
    """What the compiled blocks depend on (src/models/compile_cache.py), where COMPILE=true
    compiles them (CUDA) and COMPILE_CACHE_DIR is not off."""
    settings, host = worker.settings, worker.host
    if not (settings.compile and settings.compile_cache_dir and host.device.type == "cuda"):
        return None
    models = [f"{ref.repo_id}@{ref.revision}" for ref in (host.edit_ref, host.layered_ref) if ref is not None]
    return compile_cache.CacheKey.for_setup(
        device_name(host.device), torch.cuda.get_device_capability(host.device), models,
        {"quantize": settings.quantize, "fp8_keep_bf16": sorted(settings.fp8_keep_bf16),
         "attention_backend": settings.attention_backend, "lora_branch_rank": settings.lora_branch_rank,
         "caption_decoder": settings.caption_decoder, "preload": sorted(settings.preload),
         "memory_mode": host.memory_mode, "swap": host.swap_transformers})


def _holds_lightning(worker: Worker) -> bool:
    """Whether the start holds the PRELOAD Lightning preset ready (LIGHTNING_RESIDENT_STEPS)."""
    settings = worker.settings
    return ("lightning" in settings.preload and bool(settings.lightning_resident_steps)
            and worker.host.memory_mode != "offload")


def _lightning(worker: Worker, steps: int) -> list:
    """The adapters of the PRELOAD Lightning preset of `steps` steps."""
    return adapters_for(JobRequest(image_base64="", prompt="-", lightning=steps), worker.settings, worker.loras)


def prepare_loras(worker: Worker) -> float:
    """Before serving: with the warm-up, one edit pass with the branches on (the only
    structure the base pass has not compiled), so no LoRA job compiles; then, with PRELOAD
    naming lightning, the LIGHTNING_RESIDENT_STEPS preset fused once and held ready
    (src/models/lora/resident.py: on the GPU where the memory plan has room, else in CPU
    memory). The pass comes first so that the read ahead of the set's published weights,
    which the fuse waits for, runs under it too. Returns seconds taken."""
    start = time.perf_counter()
    settings, host = worker.settings, worker.host
    if settings.warmup and host.lora_branches_padded:
        with host.empty_lora_branches():  # zeros: the same output, the branched blocks compiled
            _warm_pass(worker, "edit", "edit, the LoRA branches on")
    if _holds_lightning(worker):
        hold_start = time.perf_counter()
        host.hold_lightning_ready(_lightning(worker, settings.lightning_resident_steps))
        worker.startup_s["lora_hold"] = time.perf_counter() - hold_start
        # No warm pass with the set held ready: it changes the layers' values only (same
        # shapes, dtypes and modules), and such a pass compiled nothing on the H200
        # (0 graphs, cold and warm compile cache; docs/performance.md), so the base pass
        # covers its jobs.
    host.use_base_weights()
    return time.perf_counter() - start


def warm_up(worker: Worker) -> float:
    """A short run of each loaded pipeline, Layered first where its transformer is the one on
    the device: with the transformers swapping, the warm-up moves one of them at most, and
    ends with the edit transformer in place for the LoRA preparation and the first edit.
    Its seconds go to `startup_s["warmup"]`, and are returned."""
    start = time.perf_counter()
    host = worker.host
    layered_first = host.layered_loaded and host.needs_loading("edit")
    if layered_first:
        _warm_pass(worker, "decompose")
    _warm_pass(worker, "edit")
    if host.layered_loaded and not layered_first:
        _warm_pass(worker, "decompose")
    worker.startup_s["warmup"] = time.perf_counter() - start
    return worker.startup_s["warmup"]


def _warm_pass(worker: Worker, operation: str, name: str | None = None) -> None:
    """One short job of `operation` ("edit" or "decompose") on a grey image, metered as `name`."""
    host = worker.host
    pipeline = host.for_operation(operation)
    grey = Image.new("RGB", (WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE), (128, 128, 128))
    if operation == "decompose":
        # A graphed captioning decoder (CAPTION_DECODER) records, and compiles, its step now.
        if host.captioner is not None:
            with _metered(worker, "caption decoder"):
                host.captioner.warm_up(host.device)
        request = JobRequest(operation="decompose", image_base64="", prompt="test",
                             num_inference_steps=WARMUP_STEPS, layers=WARMUP_LAYERS)
        with _metered(worker, name or operation):
            operations.decompose(pipeline, request, grey, seed=0, progress=no_progress)
        return
    request = JobRequest(image_base64="", prompt="test", num_inference_steps=WARMUP_STEPS,
                         width=WARMUP_OUTPUT_SIDE, height=WARMUP_OUTPUT_SIDE)
    with _metered(worker, name or operation):
        operations.edit(pipeline, request, [grey], seed=0, progress=no_progress)


@contextlib.contextmanager
def _metered(worker: Worker, name: str):
    """One warm pass as a span of `compile_meter`, logged with what it compiled."""
    with worker.compile_meter.span(name) as span:
        yield
    main = ", ".join(f"{phase} {span.phases_s[phase]:.1f} s" for phase in CompileMeter.MAIN_PHASES
                     if phase in span.phases_s)
    log.info("warm pass (%s): %.1f s, %d graphs compiled%s", name, span.seconds, span.graphs,
             f" ({main})" if main else "")
