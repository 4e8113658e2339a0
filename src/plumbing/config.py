"""Worker settings: a pure function of an environment mapping, checked at start.

`Settings.from_env(os.environ)` either returns settings or raises `ConfigError` with
one line naming the variable, its value and what is allowed, so a bad deployment
stops at start instead of failing every job.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from src.job.codec import PNG_COMPRESS_LEVEL
from src.job.schema import MAX_LAYERS, MAX_PROMPTS_LIMIT
from src.plumbing.url_guard import AddressPolicy

DEFAULT_EDIT_MODEL = "Qwen/Qwen-Image-Edit-2511"
DEFAULT_LAYERED_MODEL = "Qwen/Qwen-Image-Layered"
DEFAULT_LIGHTNING_REPO = "lightx2v/Qwen-Image-Edit-2511-Lightning"
DEFAULT_LIGHTNING_FILES = {
    4: "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
    8: "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors",
}
PRELOADABLE = ("edit", "layered", "lightning")
FP8_CACHE_FOLDER = "qwen-fp8"  # under HF_HOME: FP8_CACHE_DIR's default
COMPILE_CACHE_FOLDER = "torch-compile-cache"  # under HF_HOME: COMPILE_CACHE_DIR's default
GIB = 1024**3
RUNPOD_VOLUME = Path("/runpod-volume")
MIB = 1024 * 1024
# JOB_TIMEOUT_S is off unless set: a legitimate job at the schema's limits (100 steps,
# 2048x2048, three images) on a slow GPU takes long, and only the operator knows how
# long is too long.
MAX_JOB_TIMEOUT_S = 24 * 3600
# A job's layer edits run one after another on the GPU, each costing about as much
# as an `edit` job: the count per decompose job is capped (MAX_LAYER_EDITS).
DEFAULT_MAX_LAYER_EDITS = 4
# A prompt list runs one edit per prompt (times num_images), one after another.
DEFAULT_MAX_PROMPTS = 8
# How an empty decompose prompt's caption is decoded (src/models/captioning.py).
CAPTION_DECODERS = ("auto", "stock", "eager", "graphed", "compiled")
# Names how `rowwise_fp8` and `Fp8Linear` (src/models/fp8/linear.py) store a weight (e4m3 values, one
# float32 scale per output row from the row's absolute max, MIN_SCALE floor, scales as a (1, out)
# row). The FP8 cache (src/models/fp8/cache.py) keys its files by it: change it whenever either
# changes, and caches written the old way are ignored instead of loaded wrong
# (tests/models/test_fp8_cache.py pins it to the quantization's output). FAST_ACCUMULATION is not
# part of it: it changes the matmul, not what is stored. Here, not in fp8, so that the start's
# early read (src/models/files/early_read.py) judges caches without importing torch.
RECIPE_VERSION = "e4m3-rowwise-amax-v2"
# The 14 linears of a Qwen-Image transformer block, by their names inside the block: the
# names FP8_KEEP_BF16 takes (src/models/fp8/linear.py quantizes the others). Kept here, not in fp8,
# so that the settings import nothing from the models (docs/architecture.md).
BLOCK_LINEARS = ("img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out",
                 "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# The modulation linears turn the timestep embedding, one token per pass, into every shift,
# scale and gate of the block: FP8 makes them no faster and rounds every one of them. Every
# published FP8 recipe for Qwen-Image keeps them (docs/upstream-register.md, rows 4 and 18).
MODULATION_LINEARS = ("img_mod.1", "txt_mod.1")
# FP8_KEEP_BF16 recipes by name (the bench measures each; docs/performance.md): SGLang's
# validated Qwen-Image(-Edit) profile also keeps the image stream's MLP down-projection in
# bf16 "after image-quality ablation"; vLLM-Omni's recommendation keeps the whole image MLP.
FP8_RECIPES = {
    "all": (),
    "modulation": MODULATION_LINEARS,
    "sglang": MODULATION_LINEARS + ("img_mlp.net.2",),
    "vllm-omni": MODULATION_LINEARS + ("img_mlp.net.0.proj", "img_mlp.net.2"),
}
# The default keeps at least what SGLang's validated recipe keeps.
DEFAULT_FP8_KEEP_BF16 = FP8_RECIPES["sglang"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_PARALLEL_RANKS = 16  # PARALLEL's largest number of GPUs (src/serving/parallel.py)


class ConfigError(ValueError):
    """A bad environment value; the message is one line naming the variable."""


@dataclass(frozen=True)
class BucketConfig:
    """Where result images go. The secret is kept out of repr so it never reaches a log."""

    bucket_name: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    endpoint_url: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Settings:
    hf_home: Path
    log_level: str = "INFO"
    # "off", "auto" (every visible GPU, when there are two or more) or a number of GPUs, 1 to
    # MAX_PARALLEL_RANKS; src/serving/parallel.py checks it against the GPUs it sees.
    parallel: str = "off"
    edit_model: str = DEFAULT_EDIT_MODEL
    layered_model: str = DEFAULT_LAYERED_MODEL
    preload: frozenset[str] = frozenset({"edit"})
    bucket: BucketConfig | None = None
    bucket_prefix: str = "qwen-edit"
    presign_expiry_s: int = 7200
    gpu_price_per_hour: float | None = None
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 4096 * 4096
    # RunPod refuses /run results over 10 MB (/runsync: 20 MB); inline output is
    # checked against the stricter limit since the worker cannot tell which was used.
    max_inline_bytes: int = 10_000_000
    png_compress_level: int = PNG_COMPRESS_LEVEL
    lightning_repo: str = DEFAULT_LIGHTNING_REPO
    lightning_files: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_LIGHTNING_FILES))
    max_loras: int = 3
    # LoRA sets not held ready run unfused (src/models/lora/branches.py) until this many consecutive
    # jobs have asked for the same set; that job fuses it (1: fuse at once; 0: never fuse a
    # set that can run unfused). docs/loras.md says why 16.
    lora_fuse_after: int = 16
    # With COMPILE=true, the rank every unfused branch is padded to (one compiled shape for
    # all sets); a set of higher rank on some linear is fused instead.
    lora_branch_rank: int = 64
    # With PRELOAD naming lightning: which preset's fused weights are made at start and held
    # ready beside the base weights, on the GPU or in CPU memory (src/models/lora/resident.py);
    # 0: none.
    lightning_resident_steps: int = 4
    max_layer_edits: int = DEFAULT_MAX_LAYER_EDITS
    max_prompts: int = DEFAULT_MAX_PROMPTS
    # Job URLs (images, LoRAs, a job's bucket): whether they may reach loopback, private
    # and link-local addresses (src/plumbing/url_guard.py), and how long one download may take.
    allow_private_urls: bool = False
    allowed_private_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    fetch_connect_timeout_s: float = 5.0
    fetch_timeout_s: float = 30.0
    # "missing": a start that finds a model absent from HF_HOME downloads it first.
    download_models: str = "never"
    lora_roots: tuple[Path, ...] = (RUNPOD_VOLUME,)
    lora_cache_dir: Path | None = None  # None: HF_HOME/lora-cache
    lora_cache_max_bytes: int = 20 * GIB
    lora_cache_max_files: int = 50
    lora_max_download_bytes: int = 2 * GIB
    # A LoRA URL's whole download: 2 GB at 3.5 MB/s.
    lora_download_timeout_s: float = 600.0
    device: str = "auto"
    transformer_swap: str = "auto"
    attention_backend: str = "sdpa"
    compile: bool = False
    # With COMPILE=true: where the compiled artifacts are saved by the first start and loaded
    # by later ones (src/models/compile_cache.py); None: off.
    compile_cache_dir: Path | None = None
    caption_decoder: str = "auto"
    quantize: str = "none"
    # True CFG's two passes of a step as one batch of two (src/models/cfg_batch.py).
    cfg_batch: bool = False
    fp8_keep_bf16: frozenset[str] = frozenset(DEFAULT_FP8_KEEP_BF16)
    # With QUANTIZE=fp8: each attention's Q/K/V triples (image and text stream) as one FP8
    # matmul with one activation quantization (src/models/fp8/packed.py).
    fp8_pack_qkv: bool = False
    # With QUANTIZE=fp8: load the block linears pre-quantized from FP8_CACHE_DIR when a cache
    # of this snapshot and recipe is there (src/models/fp8/cache.py), instead of reading bf16 and quantizing.
    fp8_cache: bool = True
    fp8_cache_dir: Path | None = None  # None: HF_HOME/qwen-fp8
    memory_mode: str = "auto"
    gpu_memory_gib: float | None = None  # None: what the GPU has
    weights_prefetch: str = "on"
    warmup: bool = True
    job_timeout_s: int = 0  # 0: off
    # Each result upload: attempts (PUT and read-back), each request's time besides its
    # connect (however slowly the store answers), and the first backoff (doubling, capped
    # at 8x). UploadPolicy.worst_case_s() bounds an upload: with these defaults about
    # 200 s, for a store that hangs or trickles on every request.
    upload_attempts: int = 4
    upload_timeout_s: float = 20.0
    upload_backoff_s: float = 0.5

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        reader = _EnvReader(env)
        hf_home = default_hf_home(env)
        settings = cls(
            hf_home=hf_home,
            log_level=_log_level(reader),
            parallel=_parallel(reader),
            edit_model=reader.text("EDIT_MODEL", DEFAULT_EDIT_MODEL),
            layered_model=reader.text("LAYERED_MODEL", DEFAULT_LAYERED_MODEL),
            preload=reader.names("PRELOAD", "edit", PRELOADABLE),
            bucket=_bucket_from_env(reader),
            bucket_prefix=reader.text("BUCKET_PREFIX", "qwen-edit").strip("/"),
            presign_expiry_s=reader.integer("PRESIGN_EXPIRY_S", 7200, low=1, high=7 * 24 * 3600),
            gpu_price_per_hour=reader.number("GPU_PRICE_PER_HOUR", None, low=0.0),
            max_image_bytes=reader.integer("MAX_IMAGE_BYTES", 20 * MIB, low=1024),
            max_image_pixels=reader.integer("MAX_IMAGE_PIXELS", 4096 * 4096, low=64 * 64),
            max_inline_bytes=reader.integer("MAX_INLINE_BYTES", 10_000_000, low=1),
            png_compress_level=reader.integer("PNG_COMPRESS_LEVEL", PNG_COMPRESS_LEVEL, low=0, high=9),
            lightning_repo=reader.text("LIGHTNING_REPO", DEFAULT_LIGHTNING_REPO),
            lightning_files={4: reader.text("LIGHTNING_4STEP_FILE", DEFAULT_LIGHTNING_FILES[4]),
                             8: reader.text("LIGHTNING_8STEP_FILE", DEFAULT_LIGHTNING_FILES[8])},
            max_loras=reader.integer("MAX_LORAS", 3, low=0, high=16),
            lora_fuse_after=reader.integer("LORA_FUSE_AFTER", 16, low=0, high=1_000_000),
            lora_branch_rank=reader.integer("LORA_BRANCH_RANK", 64, low=1, high=1024),
            lightning_resident_steps=int(reader.choice("LIGHTNING_RESIDENT_STEPS", "4", ("0", "4", "8"))),
            max_layer_edits=reader.integer("MAX_LAYER_EDITS", DEFAULT_MAX_LAYER_EDITS, low=0,
                                           high=MAX_LAYERS),
            max_prompts=reader.integer("MAX_PROMPTS", DEFAULT_MAX_PROMPTS, low=1, high=MAX_PROMPTS_LIMIT),
            allow_private_urls=reader.flag("ALLOW_PRIVATE_URLS", False),
            allowed_private_networks=reader.networks("ALLOWED_PRIVATE_NETWORKS"),
            fetch_connect_timeout_s=reader.number("FETCH_CONNECT_TIMEOUT_S", 5.0, low=0.1, high=60.0),
            fetch_timeout_s=reader.number("FETCH_TIMEOUT_S", 30.0, low=0.1, high=600.0),
            download_models=reader.choice("DOWNLOAD_MODELS", "never", ("never", "missing")),
            lora_roots=tuple(Path(p) for p in reader.text("LORA_ROOTS", str(RUNPOD_VOLUME)).split(os.pathsep) if p),
            lora_cache_dir=Path(reader.text("LORA_CACHE_DIR", str(hf_home / "lora-cache"))),
            lora_cache_max_bytes=reader.integer("LORA_CACHE_MAX_BYTES", 20 * GIB, low=MIB),
            lora_cache_max_files=reader.integer("LORA_CACHE_MAX_FILES", 50, low=1),
            lora_max_download_bytes=reader.integer("LORA_MAX_DOWNLOAD_BYTES", 2 * GIB, low=1024),
            lora_download_timeout_s=reader.number("LORA_DOWNLOAD_TIMEOUT_S", 600.0, low=1.0, high=3600.0),
            device=reader.choice("DEVICE", "auto", ("auto", "cuda", "cpu")),
            transformer_swap=reader.choice("TRANSFORMER_SWAP", "auto", ("auto", "always", "never")),
            attention_backend=reader.choice("ATTENTION_BACKEND", "sdpa", ("sdpa", "cudnn", "flash")),
            compile=reader.flag("COMPILE", False),
            compile_cache_dir=_optional_folder(reader.text("COMPILE_CACHE_DIR", str(hf_home / COMPILE_CACHE_FOLDER))),
            caption_decoder=reader.choice("CAPTION_DECODER", "auto", CAPTION_DECODERS),
            quantize=reader.choice("QUANTIZE", "none", ("none", "fp8")),
            cfg_batch=reader.flag("CFG_BATCH", False),
            # "none": every block linear in FP8 (about 8.4 GiB less than the default).
            fp8_keep_bf16=reader.names("FP8_KEEP_BF16", ",".join(DEFAULT_FP8_KEEP_BF16),
                                       BLOCK_LINEARS + ("none",)) - {"none"},
            fp8_pack_qkv=reader.choice("FP8_PACK_QKV", "off", ("on", "off")) == "on",
            fp8_cache=reader.choice("FP8_CACHE", "on", ("on", "off")) == "on",
            fp8_cache_dir=Path(reader.text("FP8_CACHE_DIR", str(hf_home / FP8_CACHE_FOLDER))),
            memory_mode=reader.choice("MEMORY_MODE", "auto", ("auto", "resident", "text_offload", "offload")),
            gpu_memory_gib=reader.number("GPU_MEMORY_GIB", None, low=1.0, high=4096.0),
            weights_prefetch=reader.choice("WEIGHTS_PREFETCH", "on", ("on", "auto", "off")),
            warmup=reader.flag("WARMUP", True),
            job_timeout_s=reader.integer("JOB_TIMEOUT_S", 0, low=0, high=MAX_JOB_TIMEOUT_S),
            upload_attempts=reader.integer("UPLOAD_ATTEMPTS", 4, low=1, high=10),
            upload_timeout_s=reader.number("UPLOAD_TIMEOUT_S", 20.0, low=0.1, high=300.0),
            upload_backoff_s=reader.number("UPLOAD_BACKOFF_S", 0.5, low=0.0, high=30.0),
        )
        if settings.quantize != "none" and settings.memory_mode == "offload":
            raise ConfigError(f"MEMORY_MODE: offload cannot be used with QUANTIZE={settings.quantize} "
                              "(FP8 needs the transformer resident on the GPU); drop one of them")
        return settings

    @property
    def address_policy(self) -> AddressPolicy:
        """What job URLs may reach (src/plumbing/url_guard.py)."""
        return AddressPolicy(self.allow_private_urls, self.allowed_private_networks)


def default_hf_home(env: Mapping[str, str]) -> Path:
    """HF_HOME if set; else the RunPod network volume's cache; else the library default."""
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"])
    if (RUNPOD_VOLUME / "huggingface-cache").is_dir():
        return RUNPOD_VOLUME / "huggingface-cache"
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / ".cache" / "huggingface"
    return Path.home() / ".cache" / "huggingface"


def _log_level(reader: "_EnvReader") -> str:
    level = reader.text("LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL: {level!r} is not allowed; allowed: {', '.join(LOG_LEVELS)}")
    return level


def _parallel(reader: "_EnvReader") -> str:
    """PARALLEL: `off`, `auto`, or a number of GPUs (as its digits)."""
    raw = reader.text("PARALLEL", "off").lower()
    if raw in ("off", "auto"):
        return raw
    try:
        ranks = int(raw)
    except ValueError:
        raise ConfigError(f"PARALLEL: {raw!r} is not allowed; allowed: auto, off or a number of "
                          f"GPUs, 1 to {MAX_PARALLEL_RANKS}") from None
    if not 1 <= ranks <= MAX_PARALLEL_RANKS:
        raise ConfigError(f"PARALLEL: {ranks} is out of range; allowed: 1 to {MAX_PARALLEL_RANKS}")
    return str(ranks)


def _optional_folder(value: str) -> Path | None:
    """A folder setting that `off` turns off."""
    return None if value.strip().lower() == "off" else Path(value)


def _bucket_from_env(reader: "_EnvReader") -> BucketConfig | None:
    """RunPod's BUCKET_* names. All of name and keys, or none of them."""
    name = reader.text("BUCKET_NAME", "")
    key_id = reader.text("BUCKET_ACCESS_KEY_ID", "")
    secret = reader.env.get("BUCKET_SECRET_ACCESS_KEY", "")
    endpoint = reader.text("BUCKET_ENDPOINT_URL", "")
    given = [n for n, v in (("BUCKET_NAME", name), ("BUCKET_ACCESS_KEY_ID", key_id),
                            ("BUCKET_SECRET_ACCESS_KEY", secret)) if v]
    if not given:
        if endpoint:
            raise ConfigError("BUCKET_ENDPOINT_URL is set but BUCKET_NAME, BUCKET_ACCESS_KEY_ID "
                              "and BUCKET_SECRET_ACCESS_KEY are not")
        return None
    if len(given) < 3:
        missing = sorted({"BUCKET_NAME", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"} - set(given))
        raise ConfigError(f"{', '.join(missing)} must be set too when {', '.join(given)} is set")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"BUCKET_ENDPOINT_URL: {endpoint!r} must start with http:// or https://")
    return BucketConfig(bucket_name=name, access_key_id=key_id, secret_access_key=secret,
                        endpoint_url=endpoint or None, region=reader.text("BUCKET_REGION", "") or None)


@dataclass
class _EnvReader:
    env: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, "").strip() or default

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            allowed = f"{low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{name}: {value} is out of range; allowed: {allowed}")
        return value

    def number(self, name: str, default: float | None, low: float, high: float = math.inf) -> float | None:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            allowed = f"{low:g} to {high:g}" if math.isfinite(high) else f"a finite number >= {low}"
            raise ConfigError(f"{name}: {raw!r} is out of range; allowed: {allowed}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value

    def names(self, name: str, default: str, allowed: tuple[str, ...]) -> frozenset[str]:
        raw = self.text(name, default)
        values = {part.strip().lower() for part in raw.split(",") if part.strip()}
        unknown = sorted(values - set(allowed))
        if unknown:
            raise ConfigError(f"{name}: {', '.join(unknown)} not allowed; allowed: a comma list of {', '.join(allowed)}")
        return frozenset(values)

    def networks(self, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """A comma list of networks in CIDR form ('10.1.2.0/24, fd00::/8'), or none."""
        found = []
        for part in self.text(name, "").split(","):
            if not part.strip():
                continue
            try:
                found.append(ipaddress.ip_network(part.strip()))
            except ValueError:
                raise ConfigError(f"{name}: {part.strip()!r} is not a network; allowed: a comma list of "
                                  "networks such as 10.1.2.0/24 or fd00::/8") from None
        return tuple(found)

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name, "").lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: {raw!r} is not a boolean; allowed: 1/0, true/false, yes/no, on/off")
