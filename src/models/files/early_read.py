"""The start's read-ahead, begun before the heavy imports: what the load will read, read first.

handler.py starts it right after the settings (and DOWNLOAD_MODELS=missing's download), so the
weight files go into the page cache while Python imports torch, diffusers and transformers; the
load then finds their pages in memory. `WEIGHTS_PREFETCH` decides, as for every read-ahead.
It reads, per pipeline PRELOAD names and in the order the load takes them, the files
`ModelHost` would read ahead itself (the same folder rules: `edit_folders`, `layered_folders`),
with one change: under QUANTIZE=fp8 with a cache of the transformer, the FP8 cache's files.
`ModelHost` takes each pipeline's Future over and reads only what it lacks.

Invariants: no torch (a test imports this and handler.py and checks); a model or file that is
not there is left out without error (the load's ModelNotFound reports it); when unsure which
files the load will read (several FP8 caches could match), it reads fewer, never more.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from src.models.files.read_ahead import read_ahead_in_turn, should_prefetch, weight_files
from src.models.files.shared_components import own_components
from src.models.files.snapshots import ModelNotFound, ModelRef, locate
from src.plumbing.config import BLOCK_LINEARS, FP8_CACHE_FOLDER, RECIPE_VERSION, Settings

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"
FP8_MANIFEST = "manifest.json"
FP8_CACHE_FORMAT = 1  # the FP8 cache folder's layout and manifest; part of its recipe
# The dtype an FP8 cache was built from is the worker's (bf16 on CUDA, float32 on the CPU).
FP8_CACHE_DTYPES = {"cuda": ("bfloat16",), "cpu": ("float32",), "auto": ("bfloat16", "float32")}


def edit_folders(snapshot: Path, fp8_cached: bool) -> tuple[Path, ...]:
    """The edit snapshot's folders read ahead: all of it, but the transformer where the FP8 cache serves it."""
    if not fp8_cached:
        return (snapshot,)
    return tuple(path for path in sorted(snapshot.iterdir()) if path.is_dir() and path.name != TRANSFORMER)


def layered_folders(snapshot: Path, own_text_encoder: bool, fp8_cached: bool) -> tuple[Path, ...]:
    """Layered's folders read ahead: transformer and VAE, its text encoder only where it does not
    borrow the edit model's; not the transformer where the FP8 cache serves it."""
    names = (TRANSFORMER, "vae") + (("text_encoder",) if own_text_encoder else ())
    return tuple(snapshot / name for name in names if not (fp8_cached and name == TRANSFORMER))


def fp8_revision_folder(root: Path, repo_id: str, revision: str) -> Path:
    """Where the FP8 caches of one snapshot lie, one folder per recipe (src/models/fp8/cache.py)."""
    return root / repo_id.replace("/", "--") / revision


def fp8_cache_recipe(keep, dtype: str) -> dict:
    """What decides an FP8 cache's bytes (src/models/fp8/cache.py): how (RECIPE_VERSION), which
    linears (BLOCK_LINEARS less `keep`), from which dtype (`bfloat16`, `float32`)."""
    return {"format": FP8_CACHE_FORMAT, "quantization": RECIPE_VERSION,
            "quantized": sorted(set(BLOCK_LINEARS) - set(keep)), "dtype": dtype}


def fp8_cache_files(settings: Settings, ref: ModelRef) -> list[Path] | None:
    """The files of the FP8 cache the load will take `ref`'s transformer from, judged from the
    manifests (fp8_cache.find checks the tensors at load). None: no cache fits, the load
    reads the bf16 transformer. Empty: several fit (unsure which), read neither."""
    if settings.quantize != "fp8" or not settings.fp8_cache:
        return None
    root = settings.fp8_cache_dir or settings.hf_home / FP8_CACHE_FOLDER
    recipes = [fp8_cache_recipe(settings.fp8_keep_bf16, dtype)
               for dtype in FP8_CACHE_DTYPES.get(settings.device, FP8_CACHE_DTYPES["auto"])]
    fitting = []
    folder = fp8_revision_folder(root, ref.repo_id, ref.revision)
    for recipe_folder in sorted(folder.iterdir()) if folder.is_dir() else ():
        try:
            manifest = json.loads((recipe_folder / FP8_MANIFEST).read_text())
            files = manifest["files"]
            fits = (manifest["repo_id"], manifest["revision"]) == (ref.repo_id, ref.revision) \
                and manifest["recipe"] in recipes
            paths = [recipe_folder / name for name in sorted(files)]
            whole = all(path.is_file() and path.stat().st_size == files[path.name] for path in paths)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a cache the load could use
        if fits and whole:
            fitting.append(paths)
    if not fitting:
        return None
    return fitting[0] if len(fitting) == 1 else []


def start_files(settings: Settings) -> dict[str, list[Path]]:
    """The weight files the start's load reads, per pipeline, in the order it loads them; a
    model that is not in the cache is left out (the load says so)."""
    files: dict[str, list[Path]] = {}
    try:
        edit = locate(settings.edit_model, settings.hf_home)
    except ModelNotFound:
        return files
    edit_cache = fp8_cache_files(settings, edit)
    files["edit"] = (edit_cache or []) + weight_files(*edit_folders(edit.path, edit_cache is not None))
    if "layered" in settings.preload:
        try:
            layered = locate(settings.layered_model, settings.hf_home)
        except ModelNotFound:
            return files
        layered_cache = fp8_cache_files(settings, layered)
        own_text_encoder = "text_encoder" in own_components(edit.path, layered.path)
        files["layered"] = (layered_cache or []) + weight_files(
            *layered_folders(layered.path, own_text_encoder, layered_cache is not None))
    return files


@dataclass
class EarlyRead:
    """The start's read-ahead under way: per pipeline, its files and the Future of their read."""

    readings: dict[str, tuple[list[Path], Future]] = field(default_factory=dict)

    def take(self, pipeline: str) -> tuple[list[Path], Future] | None:
        """The read of `pipeline`'s files, once (None where it has none)."""
        return self.readings.pop(pipeline, None)


def read_at_start(settings: Settings) -> EarlyRead | None:
    """Start reading what the start's load will read, on a background thread (None: WEIGHTS_PREFETCH
    says not to, or nothing is there to read)."""
    if not should_prefetch(settings.weights_prefetch, settings.hf_home):
        return None
    files = {name: paths for name, paths in start_files(settings).items() if paths}
    if not files:
        return None
    log.info("reading the weights ahead while the libraries import: %s", ", ".join(files))
    futures = read_ahead_in_turn(list(files.values()))
    return EarlyRead({name: (paths, future) for (name, paths), future in zip(files.items(), futures)})
