"""handler.py's early read-ahead (src/models/files/early_read.py): it imports no torch, reads what the
start's load would read ahead and nothing else, the load takes it over without reading a file
again, and the worker serves the same pixels as one that reads nothing ahead. On the tiny models (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from src.models.files.early_read import (FP8_MANIFEST, fp8_cache_files, fp8_cache_recipe, fp8_revision_folder,
                                   read_at_start, start_files)
from src.models.host import ModelHost
from src.models.files.read_ahead import weight_files
from src.models.files.snapshots import locate
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import REPO_ROOT, edit_hat, edited_pixels

# Imports handler.py and runs the early read as main() does, then says whether torch or the runpod
# SDK (the heavy imports main() makes after the read began) got imported.
EARLY_READ = """
import json, os, sys
import handler
from src.models.files.early_read import read_at_start
from src.plumbing.config import Settings
early = read_at_start(Settings.from_env(os.environ))
reports = {name: reading.result() for name, (files, reading) in early.readings.items()}
print(json.dumps({"torch": "torch" in sys.modules, "runpod": "runpod" in sys.modules, "reports": reports}))
"""


def test_the_early_read_imports_no_torch_and_reads_what_the_load_reads_ahead(hf_home):
    env = {"HF_HOME": str(hf_home), "DEVICE": "cpu", "PRELOAD": "edit,layered", "WEIGHTS_PREFETCH": "on"}
    done = subprocess.run([sys.executable, "-c", EARLY_READ], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=120, check=True)
    early = json.loads(done.stdout.splitlines()[-1])
    assert early["torch"] is False and early["runpod"] is False
    # The load's own read-ahead, without an early read: the same files per pipeline.
    host = ModelHost(Settings.from_env(env))
    host.load()
    assert [(report["files"], report["bytes"]) for report in early["reports"].values()] == [
        (report["files"], report["bytes"]) for report in host.prefetched]
    assert list(early["reports"]) == ["edit", "layered"] and all(report["bytes"] > 0 for report in host.prefetched)


def test_a_worker_that_read_early_serves_the_pixels_of_one_that_read_nothing_ahead(worker_env):
    on = Settings.from_env({**worker_env, "WEIGHTS_PREFETCH": "on", "WARMUP": "false"})
    off = Settings.from_env({**worker_env, "WEIGHTS_PREFETCH": "off", "WARMUP": "false"})
    assert read_at_start(off) is None  # `off` reads nothing early
    early = read_at_start(on)
    [(files, _)] = early.readings.values()
    assert files == weight_files(locate(on.edit_model, on.hf_home).path)
    reading = start_worker(on, early)
    quiet = start_worker(off, read_at_start(off))
    assert early.readings == {}  # taken over by the load
    [report] = reading.host.prefetched  # the early read's: the load read no file again
    assert report["bytes"] == sum(path.stat().st_size for path in files) > 0
    assert quiet.host.prefetched == []
    assert np.array_equal(edited_pixels(edit_hat(reading, "early")), edited_pixels(edit_hat(quiet, "off")))


def test_a_missing_model_is_left_to_the_load(hf_home, tmp_path):
    assert read_at_start(Settings.from_env({"HF_HOME": str(tmp_path), "DEVICE": "cpu"})) is None
    files = start_files(Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cpu", "PRELOAD": "edit,layered",
                                           "LAYERED_MODEL": "Qwen/Qwen-Image-Layered-Missing"}))
    assert list(files) == ["edit"] and files["edit"]


def test_the_early_read_leaves_a_cache_of_another_quantization_unread(hf_home, tmp_path):
    """A cache whose manifest names another way of quantizing (an older RECIPE_VERSION) is not the
    load's (fp8_cache.find ignores it): the early read takes the bf16 transformer instead."""
    settings = Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cpu", "QUANTIZE": "fp8",
                                  "FP8_CACHE_DIR": str(tmp_path)})
    edit = locate(settings.edit_model, settings.hf_home)
    folder = fp8_revision_folder(tmp_path, edit.repo_id, edit.revision) / "a-recipe"
    folder.mkdir(parents=True)
    (folder / "shard-0.safetensors").write_bytes(bytes(64))

    def manifest(recipe: dict) -> None:
        (folder / FP8_MANIFEST).write_text(json.dumps({"repo_id": edit.repo_id, "revision": edit.revision,
                                                       "recipe": recipe, "files": {"shard-0.safetensors": 64}}))

    manifest(fp8_cache_recipe(settings.fp8_keep_bf16, "float32"))
    assert fp8_cache_files(settings, edit) == [folder / "shard-0.safetensors"]
    manifest({**fp8_cache_recipe(settings.fp8_keep_bf16, "float32"), "quantization": "e4m3-rowwise-amax-v1"})
    assert fp8_cache_files(settings, edit) is None
    assert start_files(settings) == {"edit": weight_files(edit.path)}
