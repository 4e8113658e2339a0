"""FP8_CACHE: the transformer's FP8 block linears written once, loaded directly at start.

`build` (tools/download_models.py --fp8) writes each quantized linear's e4m3 weight and
float32 row scales once, under FP8_CACHE_DIR as `<org>--<name>/<revision>/<recipe id>/`
(`fp8-NNNNN.safetensors` shards and `manifest.json`; never inside the snapshot, which a RunPod
cached model may hold read-only). `load_transformer` builds the transformer's skeleton on the
meta device, reads the FP8 linears from the cache and every other tensor from the snapshot by
key: the bf16 weights of the quantized linears are never read.

Invariants: the recipe id hashes the quantization (fp8.RECIPE_VERSION), which linears are FP8
(BLOCK_LINEARS less FP8_KEEP_BF16) and the dtype cast to first. A cache is used only when its
manifest names this revision and recipe, every file has the manifest's size and every header
holds the tensors this skeleton's FP8 linears need, with their dtypes and shapes; else the
worker quantizes at start and logs why. Contents are not hashed at load (that would read them
twice); a build writes into a temporary folder renamed into place after the manifest, so a
build cut short leaves no cache. Loaded, the transformer is bit for bit the one quantized at
start (the same cast and `Fp8Linear`). Bytes, times, the CPU/GPU check: docs/performance.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.models.fp8 import linear as fp8
from src.models.files import tensors as weights
from src.models.files.early_read import FP8_CACHE_FORMAT as FORMAT  # the manifest's "format"
from src.models.files.early_read import FP8_MANIFEST, fp8_cache_recipe, fp8_revision_folder
from src.models.files.tensors import locate  # which snapshot the worker loads: refs/main, offline

log = logging.getLogger(__name__)

MANIFEST = FP8_MANIFEST  # named where the early read-ahead finds the cache without torch
SHARD_PREFIX = "fp8-"
# Shards of about this size: several files read in parallel, and a build holds one linear at a time.
SHARD_BYTES = 2 * 1000**3
# Each tensor's bytes start at a multiple of this, as safetensors' own writer aligns them.
ALIGNMENT = 8
TRANSFORMER = "transformer"
SAFETENSORS_NAMES = {dtype: name for name, dtype in weights.SAFETENSORS_DTYPES.items()}


class CacheUnusable(RuntimeError):
    """Why a cache on disk is not loaded (one line, for the log)."""


def recipe(keep: Iterable[str], dtype: torch.dtype) -> dict:
    """What decides the cached bytes (`early_read.fp8_cache_recipe`, which judges caches without torch)."""
    return fp8_cache_recipe(keep, str(dtype).removeprefix("torch."))


def recipe_id(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_folder(root: Path, repo_id: str, revision: str, spec: dict) -> Path:
    return fp8_revision_folder(root, repo_id, revision) / recipe_id(spec)


# -- The transformer without weights -----------------------------------------------------------


def empty_transformer(folder: Path, dtype: torch.dtype, keep: Iterable[str]) -> torch.nn.Module:
    """The transformer of the diffusers folder `folder` with its parameters on the meta device
    and its block linears already `Fp8Linear`s (but those in `keep`), built the way diffusers'
    from_pretrained builds it: under `dtype` as the default dtype, no weight init, parameters
    empty (accelerate's init_empty_weights), so the tensors the model computes at init (the
    rotary frequencies) are the same."""
    import accelerate
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.modeling_utils import no_init_weights

    previous = QwenImageTransformer2DModel._set_default_torch_dtype(dtype)
    try:
        with no_init_weights(), accelerate.init_empty_weights():
            model = QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(folder))
    finally:
        torch.set_default_dtype(previous)
    fp8.quantize_blocks(model, torch.device("meta"), keep=frozenset(keep))
    model.register_to_config(_name_or_path=folder)  # as from_pretrained records it
    return model.eval()


def fp8_modules(model: torch.nn.Module) -> dict[str, fp8.Fp8Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, fp8.Fp8Linear)}


def cached_tensor_specs(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors a cache holds for `model` (a skeleton from empty_transformer): each FP8
    linear's weight and weight_scale, with their dtypes and shapes."""
    return {f"{name}.{part}": (getattr(module, part).dtype, tuple(getattr(module, part).shape))
            for name, module in fp8_modules(model).items() for part in ("weight", "weight_scale")}


# -- Finding a cache ----------------------------------------------------------------------------


@dataclass
class Cache:
    folder: Path
    manifest: dict
    tensors: dict[str, weights.StoredTensor] = field(repr=False)
    header_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(stored.nbytes for stored in self.tensors.values()) + self.header_bytes


def find(root: Path, repo_id: str, revision: str, spec: dict,
         expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> Cache:
    """The cache of `repo_id` at `revision` written with recipe `spec`, checked against the
    tensors `expected` (cached_tensor_specs); raises CacheUnusable saying why not."""
    folder = cache_folder(root, repo_id, revision, spec)
    if not folder.is_dir():
        raise CacheUnusable(f"none at {folder}{_what_is_there(root, repo_id, revision, spec)}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CacheUnusable(f"{folder} has no {MANIFEST} (a build that did not finish)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheUnusable(f"{folder / MANIFEST} is unreadable ({exc})") from None
    for key, want in (("repo_id", repo_id), ("revision", revision), ("recipe", spec)):
        if manifest.get(key) != want:
            raise CacheUnusable(f"{folder / MANIFEST} was written for {key} {manifest.get(key)!r}, not {want!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CacheUnusable(f"{folder / MANIFEST} lists no files")
    tensors: dict[str, weights.StoredTensor] = {}
    header_bytes = 0
    for name, size in sorted(files.items()):
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise CacheUnusable(f"{path} is {'missing' if actual is None else f'{actual} bytes'}; "
                                f"the manifest says {size} bytes (cut short or replaced)")
        try:
            found, header_size = weights.safetensors_header(path)
        except (OSError, weights.BadWeightFile) as exc:
            raise CacheUnusable(str(exc)) from None
        tensors.update(found)
        header_bytes += header_size
    if tensors.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        raise CacheUnusable(f"{folder} holds other tensors than this transformer's FP8 linears "
                            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                            f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''})")
    for name, (dtype, shape) in expected.items():
        stored = tensors[name]
        if (stored.dtype, stored.shape) != (dtype, shape):
            raise CacheUnusable(f"{stored.path}: {name} is {stored.dtype} {list(stored.shape)}, "
                                f"this transformer needs {dtype} {list(shape)}")
    return Cache(folder, manifest, tensors, header_bytes)


def _what_is_there(root: Path, repo_id: str, revision: str, spec: dict) -> str:
    """What caches of `repo_id` there are instead, for the log line."""
    here = fp8_revision_folder(root, repo_id, revision)
    repo = here.parent
    others = sorted(p.name for p in here.iterdir() if p.is_dir()) if here.is_dir() else []
    if others:
        recipes = []
        for name in others:
            try:
                recipes.append(json.loads((here / name / MANIFEST).read_text())["recipe"])
            except (OSError, ValueError, KeyError, TypeError):
                recipes.append(name)
        return f"; this revision has caches of other recipes: {recipes} (this one: {spec})"
    revisions = sorted(p.name[:12] for p in repo.iterdir() if p.is_dir()) if repo.is_dir() else []
    if revisions:
        return f"; caches of other revisions only: {', '.join(revisions)} (this snapshot: {revision[:12]})"
    return ""


# -- Loading --------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    seconds: float = 0.0
    cache_bytes: int = 0
    snapshot_bytes: int = 0

    @property
    def bytes_read(self) -> int:
        return self.cache_bytes + self.snapshot_bytes


def load_transformer(cache: Cache, folder: Path, dtype: torch.dtype, device: torch.device,
                     keep: Iterable[str]) -> tuple[torch.nn.Module, LoadReport]:
    """The transformer of the diffusers folder `folder`, its FP8 linears from `cache` on
    `device`, everything else from the folder's safetensors by key, cast to `dtype`, on the
    CPU: where from_pretrained followed by fp8.quantize_blocks leaves the same tensors."""
    start = time.perf_counter()
    model = empty_transformer(folder, dtype, keep)
    on_device = {f"{name}.{part}" for name in fp8_modules(model) for part in ("weight", "weight_scale", "bias")}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in weights.read_tensors(cache.tensors, weights.in_file_order(cache.tensors, cache.tensors)):
        state[name] = tensor.to(device)
    snapshot, header_bytes = weights.stored_tensors(folder)
    rest = [name for name in model.state_dict() if name not in state]
    missing = [name for name in rest if name not in snapshot]
    if missing:
        raise CacheUnusable(f"{folder} lacks {len(missing)} of the transformer's tensors, e.g. {missing[0]}")
    for name, tensor in weights.read_tensors(snapshot, weights.in_file_order(snapshot, rest)):
        # As from_pretrained loads: floating tensors cast to the model's dtype.
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device) if name in on_device else tensor
    model.load_state_dict(state, strict=True, assign=True)
    report = LoadReport(seconds=time.perf_counter() - start, cache_bytes=cache.nbytes,
                        snapshot_bytes=header_bytes + sum(snapshot[name].nbytes for name in rest))
    return model, report


# -- Building -------------------------------------------------------------------------------------


def build(folder: Path, root: Path, repo_id: str, revision: str, keep: Iterable[str], dtype: torch.dtype,
          report: Callable[[str], None] = log.info) -> Path:
    """Write the cache of the transformer in the diffusers folder `folder` (a snapshot's
    transformer/): each block linear not in `keep` read by key, cast to `dtype`, quantized
    by `Fp8Linear` on the CPU. Returns the cache's folder; one already there and whole is kept."""
    keep = frozenset(keep)
    spec = recipe(keep, dtype)
    skeleton = empty_transformer(folder, dtype, keep)
    expected = cached_tensor_specs(skeleton)
    final = cache_folder(root, repo_id, revision, spec)
    try:
        find(root, repo_id, revision, spec, expected)
        report(f"FP8 cache of {repo_id}@{revision[:12]} already at {final}")
        return final
    except CacheUnusable as exc:
        report(f"writing the FP8 cache of {repo_id}@{revision[:12]} to {final} ({exc})")
    snapshot, _ = weights.stored_tensors(folder)
    modules = fp8_modules(skeleton)
    missing = [name for name in modules if f"{name}.weight" not in snapshot]
    if missing:
        raise CacheUnusable(f"{folder} lacks {missing[0]}.weight")
    start = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        files = _write_shards(partial, modules, snapshot, expected, dtype)
        written = sum(files.values())
        manifest = {"format": FORMAT, "repo_id": repo_id, "revision": revision, "recipe": spec,
                    "recipe_id": final.name, "files": files, "torch": torch.__version__,
                    "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(final, partial)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    report(f"FP8 cache written: {len(files)} files, {written / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s")
    return final


def _write_shards(partial: Path, modules: dict[str, fp8.Fp8Linear], snapshot: dict[str, weights.StoredTensor],
                  expected: dict[str, tuple[torch.dtype, tuple[int, ...]]], dtype: torch.dtype) -> dict[str, int]:
    """The FP8 linears into shards of about SHARD_BYTES, one linear in memory at a time."""
    groups: list[list[str]] = [[]]
    group_bytes = 0
    # In the snapshot's order, so the build reads it front to back.
    for name in [key.removesuffix(".weight")
                 for key in weights.in_file_order(snapshot, (f"{name}.weight" for name in modules))]:
        nbytes = sum(_nbytes(*expected[f"{name}.{part}"]) for part in ("weight", "weight_scale"))
        if groups[-1] and group_bytes + nbytes > SHARD_BYTES:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += nbytes
    files = {}
    for index, names in enumerate(groups, start=1):
        path = partial / f"{SHARD_PREFIX}{index:05d}-of-{len(groups):05d}.safetensors"
        entries = [(f"{name}.{part}", *expected[f"{name}.{part}"]) for name in names for part in ("weight", "weight_scale")]

        def tensors(names=names):
            for key, weight in weights.read_tensors(snapshot, [f"{name}.weight" for name in names]):
                quantized = quantize_weight(weight, dtype)
                yield key, quantized.weight.data
                yield f"{key}_scale", quantized.weight_scale.data

        write_safetensors(path, entries, tensors())
        files[path.name] = path.stat().st_size
    return files


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> fp8.Fp8Linear:
    """`weight` (as stored) as the worker quantizes it: cast to its dtype, then Fp8Linear."""
    with torch.device("meta"):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    return fp8.Fp8Linear(linear)


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> None:
    """A safetensors file of `entries` (name, dtype, shape; in this order), the data taken one
    tensor at a time from the iterable `tensors` of (name, tensor), each checked against its entry."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + _nbytes(dtype, shape)]}
        offset += _nbytes(dtype, shape)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text)) % ALIGNMENT)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        position = 0
        for (name, dtype, shape), (given, tensor) in zip(entries, tensors, strict=True):
            if (given, tensor.dtype, tuple(tensor.shape)) != (name, dtype, shape):
                raise ValueError(f"{given}: got {tensor.dtype} {list(tensor.shape)}, expected {name}: "
                                 f"{dtype} {list(shape)}")
            begin = header[name]["data_offsets"][0]
            file.write(b"\0" * (begin - position))
            data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
            file.write(memoryview(data))
            position = begin + data.nbytes
        file.flush()
        os.fsync(file.fileno())


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _replace(final: Path, partial: Path) -> None:
    """`partial` renamed to `final`; an unusable folder already at `final` moved aside first.
    Another writer that got there first wins (its cache is the same bytes)."""
    if final.exists():
        stale = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(partial, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise


def build_for_models(hf_home: Path, root: Path, repo_ids: Iterable[str], keep: Iterable[str], dtype: torch.dtype,
                     report: Callable[[str], None] = log.info) -> list[Path]:
    """`build` for the transformer of each cached snapshot in `repo_ids` (tools/download_models.py --fp8)."""
    folders = []
    for repo_id in repo_ids:
        ref = locate(repo_id, hf_home)
        folders.append(build(ref.path / TRANSFORMER, root, repo_id, ref.revision, keep, dtype, report))
    return folders
