"""LoRA adapters on the edit transformer: checked against the model, fused, and taken
off again exactly.

Fusing (merging the LoRA deltas into the weights) makes LoRA jobs run at base speed.
The weights each fusion changes are copied to CPU memory first, and restored by copy,
so a job without LoRAs after any LoRA job gets bit-identical base weights. A set of
adapters (same files, same scales) stays fused while jobs keep asking for it. In bf16
diffusers fuses (`fuse_lora`); under QUANTIZE=fp8, `src/models/lora/fp8_fusing.py` fuses each touched
linear in bf16 from the published weights and quantizes the result.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from src.job.schema import MAX_ECHO_CHARS, JobRequest, echo
from src.models.lora import fp8_fusing as fp8_loras
from src.models.fp8.linear import Fp8Linear
from src.models.lora.sources import LoraCache, LoraError, LoraFile, describe_source, http_limits, resolve
from src.plumbing.config import Settings

log = logging.getLogger(__name__)

# Keys of the two LoRA layouts found for Qwen-Image: diffusers/PEFT (lora_A/lora_B) and
# kohya/ai-toolkit style (lora_down/lora_up, optional alpha), with or without a prefix.
_LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)(\.default)?\.weight$")
_DIFFUSERS_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
MAX_STATE_DICTS_IN_MEMORY = 6
# The tensor types a LoRA's factors may have: the floating-point ones PEFT and the fuses cast from.
LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
# The scheduler the Lightning authors (ModelTC/Qwen-Image-Lightning) publish for their
# distilled LoRAs: shift 3 as in distillation, no terminal stretch.
LIGHTNING_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class Adapter:
    name: str  # the PEFT adapter name: a prefix of the file's sha256
    file: LoraFile
    scale: float
    state_dict: dict  # diffusers key layout, checked against the transformer

    def describe(self) -> dict:
        return {"source": describe_source(self.file.source), "scale": self.scale, "sha256": self.file.sha256,
                "file": self.file.path.name}

    def modules(self) -> set[str]:
        """The transformer's modules this adapter changes ("transformer_blocks.0.attn.to_q", …)."""
        return {key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                for key in self.state_dict if key.endswith(".lora_A.weight")}

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of this adapter on the transformer's `module` ("transformer_blocks.0.attn.to_q"),
        or None when it leaves the module alone."""
        down = self.state_dict.get(f"transformer.{module}.lora_A.weight")
        return None if down is None else (down, self.state_dict[f"transformer.{module}.lora_B.weight"])


class LoraLibrary:
    """Reads LoRA files into checked diffusers-layout state dicts, keeping the last few in memory."""

    def __init__(self, pipeline_cls, transformer: torch.nn.Module, model_id: str):
        self.pipeline_cls = pipeline_cls
        self.transformer = transformer
        self.model_id = model_id
        self._cache: OrderedDict[str, dict] = OrderedDict()

    def adapter(self, file: LoraFile, scale: float, key: str) -> Adapter:
        state_dict = self._cache.get(file.sha256)
        if state_dict is None:
            state_dict = self._read_checked(file, key)
            self._cache[file.sha256] = state_dict
            while len(self._cache) > MAX_STATE_DICTS_IN_MEMORY:
                self._cache.popitem(last=False)
        self._cache.move_to_end(file.sha256)
        return Adapter(name=f"lora_{file.sha256[:16]}", file=file, scale=scale, state_dict=state_dict)

    def _read_checked(self, file: LoraFile, key: str) -> dict:
        shown = echo(describe_source(file.source))
        try:
            raw = load_file(str(file.path))
        except (SafetensorError, OSError, ValueError):
            raise LoraError(f"{key}: {shown} is not a readable safetensors file") from None
        if not any(_LORA_KEY.search(name) for name in raw):
            raise LoraError(f"{key}: {shown} is not a LoRA: none of its {len(raw)} tensors is a "
                            "lora_A/lora_B or lora_down/lora_up weight")
        try:
            converted = self.pipeline_cls.lora_state_dict(raw)
        except Exception as exc:  # diffusers' converters raise several types on foreign layouts
            raise LoraError(f"{key}: {shown} is in no LoRA key format this model loads "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None
        # diffusers passes bare PEFT keys ("transformer_blocks.0...lora_A") through unprefixed
        # and then loads nothing, silently: name them for the transformer.
        top_level = {name for name, _ in self.transformer.named_children()}
        converted = {f"transformer.{name}" if name.split(".")[0] in top_level else name: value
                     for name, value in converted.items()}
        self._check_against_model(converted, key, shown)
        return converted

    def _check_against_model(self, state_dict: dict, key: str, shown: str) -> None:
        """Every LoRA layer must be a lora_A/lora_B pair of floating-point matrices, finite,
        of one rank, on a Linear of this transformer with matching features; otherwise the
        file is malformed or was made for another model. Checked here, before any fuse or
        branch sees the tensors."""
        modules = dict(self.transformer.named_modules())
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        problems = []
        for name, tensor in state_dict.items():
            match = _DIFFUSERS_KEY.match(name)
            if match:
                pairs.setdefault(match["module"], {})[match["part"]] = tensor
            else:
                problems.append(f"unexpected key {_cut(name)}")
        layers = len(pairs) + len(problems)  # an unexpected key counts as a layer of its own
        problems += filter(None, (_layer_problem(name, factors, modules.get(name)) for name, factors in pairs.items()))
        if problems:
            raise LoraError(f"{key}: {shown} does not fit {self.model_id}: {len(problems)} of {layers} layers "
                            f"do not match (first: {problems[0]})")


def _layer_problem(name: str, factors: dict[str, torch.Tensor], module: torch.nn.Module | None) -> str | None:
    """What is wrong with one layer's LoRA factors {"A": down, "B": up}, or None."""
    name = _cut(name)
    if not isinstance(module, (torch.nn.Linear, Fp8Linear)):
        return f"no linear layer {name} in the model"
    if len(factors) != 2:
        present = next(iter(factors))
        return f"{name} has lora_{present} but no lora_{'B' if present == 'A' else 'A'}"
    for part, tensor in factors.items():
        if tensor.ndim != 2:
            return f"{name}.lora_{part} has {tensor.ndim} dimensions; LoRA factors are matrices (2)"
        if tensor.dtype not in LORA_DTYPES:
            return f"{name}.lora_{part} is {str(tensor.dtype).removeprefix('torch.')}; LoRA factors are " + \
                ", ".join(str(dtype).removeprefix("torch.") for dtype in LORA_DTYPES)
    down, up = factors["A"], factors["B"]
    if down.shape[1] != module.in_features:
        return f"{name} takes {module.in_features} features, the LoRA {down.shape[1]}"
    if up.shape[0] != module.out_features:
        return f"{name} gives {module.out_features} features, the LoRA {up.shape[0]}"
    if down.shape[0] != up.shape[1]:
        return f"{name}: lora_A has rank {down.shape[0]} and lora_B rank {up.shape[1]}; they must agree"
    if down.shape[0] == 0:
        return f"{name} has rank 0"
    for part, tensor in factors.items():
        # NaN and infinities propagate through min and max: one cheap pass finds them (in
        # float32 for the 8-bit types, which have no aminmax of their own).
        values = tensor.float() if tensor.dtype.itemsize == 1 else tensor
        if not all(torch.isfinite(extreme) for extreme in torch.aminmax(values)):
            return f"{name}.lora_{part} holds NaN or infinite values"
    return None


def _cut(name: str) -> str:
    """A tensor or layer name from a file, as an error may show it."""
    return name if len(name) <= MAX_ECHO_CHARS else f"{name[:MAX_ECHO_CHARS]}..."


class FusedLoras:
    """Which adapters are fused into the edit transformer, and the original weights of
    the layers they changed."""

    def __init__(self, fp8_published: Callable[[], Mapping] | None = None, dtype: torch.dtype = torch.bfloat16):
        """`fp8_published`: under QUANTIZE=fp8, gives the edit transformer's published
        weights by linear name (`fp8_loras.PublishedWeights`, or the bench's), asked for
        on the first fuse; `dtype`: the pipeline's. None: the transformer is bf16 and
        diffusers fuses."""
        self.active: tuple[tuple[str, float], ...] = ()
        self._originals: dict[str, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        self._fp8_published = fp8_published
        self._published: Mapping | None = None
        self._dtype = dtype

    def needs_change(self, adapters: list[Adapter]) -> bool:
        return identity_of(adapters) != self.active

    def apply(self, pipeline, adapters: list[Adapter]) -> None:
        """Fuse exactly `adapters` (none: the base model)."""
        if not self.needs_change(adapters):
            return
        self.restore(pipeline)
        if not adapters:
            return
        if self._fp8_published is not None:
            self._apply_fp8(pipeline, adapters)
        else:
            self._apply_diffusers(pipeline, adapters)
        self.active = identity_of(adapters)

    def _apply_diffusers(self, pipeline, adapters: list[Adapter]) -> None:
        names = [adapter.name for adapter in adapters]
        try:
            for adapter in adapters:
                # load_lora_weights consumes the dict it is given: hand it a shallow copy.
                pipeline.load_lora_weights(dict(adapter.state_dict), adapter_name=adapter.name)
            pipeline.set_adapters(names, adapter_weights=[adapter.scale for adapter in adapters])
            self._save_originals(pipeline.transformer)
            pipeline.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
            pipeline.unload_lora_weights()  # keeps the fused weights; drops the PEFT layers
        except BaseException:
            pipeline.unload_lora_weights()
            self.restore(pipeline)
            raise

    @property
    def fuses_fp8(self) -> bool:
        """Whether fusing goes through the published weights (QUANTIZE=fp8), not diffusers."""
        return self._fp8_published is not None

    def fused_linears(self, pipeline, adapters: list[Adapter]):
        """Under QUANTIZE=fp8: the values `apply` would write, linear by linear, leaving the
        model as it is (`fp8_loras.fused_linears`)."""
        if self._published is None:
            self._published = self._fp8_published()
        return fp8_loras.fused_linears(pipeline.transformer, adapters, self._published, self._dtype)

    def _apply_fp8(self, pipeline, adapters: list[Adapter]) -> None:
        if self._published is None:
            self._published = self._fp8_published()
        saved: dict[str, tuple[torch.Tensor, ...]] = {}
        try:
            changed = fp8_loras.fuse(pipeline.transformer, adapters, self._published, self._dtype, saved)
        except BaseException:
            fp8_loras.restore(pipeline.transformer, saved)
            raise
        self._originals = saved
        log.info("LoRAs fused under FP8: %d linears, from the published bf16 weights", changed)

    def restore(self, pipeline) -> None:
        """Put the saved original weights back: bit-identical base model."""
        if self._originals:
            if self._fp8_published is not None:
                fp8_loras.restore(pipeline.transformer, self._originals)
            else:
                modules = dict(pipeline.transformer.named_modules())
                with torch.no_grad():
                    for name, weight in self._originals.items():
                        modules[name].weight.copy_(weight)
            log.info("LoRAs taken off: %d layers restored", len(self._originals))
        self._originals = {}
        self.active = ()

    def take_originals(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The saved originals of the set fused now ({linear: its tensors, as
        `lora_resident._parameters` orders them}), handed over: the weights stay fused and
        this no longer restores them (`lora_resident.ResidentSet` holds them from then on)."""
        originals = {name: saved if isinstance(saved, tuple) else (saved,) for name, saved in self._originals.items()}
        self._originals = {}
        self.active = ()
        return originals

    def _save_originals(self, transformer: torch.nn.Module) -> None:
        for name, module in transformer.named_modules():
            base_layer = getattr(module, "base_layer", None)
            if base_layer is not None and hasattr(module, "lora_A"):
                # Pageable memory: pinned copies made the fuse slower (docs/performance.md,
                # LoRA switches).
                self._originals[name] = base_layer.weight.detach().to("cpu", copy=True)


def identity_of(adapters: list[Adapter]) -> tuple[tuple[str, float], ...]:
    """A set of adapters as jobs name it: the files (by content) and scales, in order."""
    return tuple((adapter.file.sha256, adapter.scale) for adapter in adapters)


def lightning_scheduler(base_scheduler):
    return type(base_scheduler).from_config(LIGHTNING_SCHEDULER_CONFIG)


def adapters_for(request: JobRequest, settings: Settings, library: LoraLibrary, s3_client_for=None) -> list[Adapter]:
    """The job's adapters, Lightning first, each resolved and checked (CPU only)."""
    wanted = len(request.loras) + (1 if request.lightning else 0)
    if wanted > settings.max_loras:
        raise LoraError(f"loras: {wanted} adapters in this job{' with lightning' if request.lightning else ''}; "
                        f"at most {settings.max_loras} allowed (MAX_LORAS)")
    cache = LoraCache(folder=settings.lora_cache_dir or settings.hf_home / "lora-cache",
                      max_bytes=settings.lora_cache_max_bytes, max_files=settings.lora_cache_max_files,
                      max_download_bytes=settings.lora_max_download_bytes)
    common = dict(roots=settings.lora_roots, hf_home=settings.hf_home, cache=cache, s3_client_for=s3_client_for,
                  policy=settings.address_policy,
                  limits=http_limits(settings.lora_max_download_bytes, settings.fetch_connect_timeout_s,
                                     settings.lora_download_timeout_s))
    adapters = []
    if request.lightning:
        file = resolve(settings.lightning_repo, settings.lightning_files[request.lightning], "lightning", **common)
        adapters.append(library.adapter(file, 1.0, "lightning"))
    for index, lora in enumerate(request.loras):
        key = f"loras[{index}].source"
        adapters.append(library.adapter(resolve(lora.source, lora.weight_name, key, **common), lora.scale, key))
    return adapters
