"""FP8_CACHE (src/models/fp8/cache.py): the FP8 block linears written once and loaded at start give
the same transformer, bit for bit, as quantizing at start, and the same images; a cache of
another revision or recipe, or a damaged one, is refused with a reason and the worker
quantizes at start instead. On the tiny models, CPU, float32 (the CPU worker's dtype)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from src.models.fp8 import cache as fp8_cache
from src.models.files import tensors as weights
from src.models.files.early_read import read_at_start, start_files
from src.models.fp8.linear import FP8_RECIPES, MODULATION_LINEARS, RECIPE_VERSION, Fp8Linear, quantize_blocks
from src.models.files.tensors import locate
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import FAST, REPO_ROOT, image_from_b64, png_b64, sample_image
from tests.fake_hf_hub import start_fake_hub

EDIT_REPO, LAYERED_REPO = "Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Layered"
CPU_DTYPE = torch.float32  # src/models/host.py dtype_for: what a CPU worker loads in
# What fp8.RECIPE_VERSION names: the bytes Fp8Linear stores for a fixed weight. A change to
# the quantization that leaves RECIPE_VERSION alone fails here: old caches would load wrong.
PINNED_RECIPE = ("e4m3-rowwise-amax-v2", "606905d7eb172cdea8082685507107d9")


def fingerprint() -> str:
    rows = torch.randn(64, 96, generator=torch.Generator().manual_seed(15)) * torch.logspace(-4, 4, 64)[:, None]
    rows[3] = 0
    with torch.device("meta"):
        linear = torch.nn.Linear(96, 64, bias=False)
    linear.weight = torch.nn.Parameter(rows.bfloat16(), requires_grad=False)
    quantized = Fp8Linear(linear)
    digest = hashlib.sha256()
    for tensor in (quantized.weight, quantized.weight_scale):
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def test_the_recipe_version_names_what_fp8linear_stores():
    assert (RECIPE_VERSION, fingerprint()) == PINNED_RECIPE


def test_the_recipe_id_changes_with_the_keep_set_and_the_dtype():
    base = fp8_cache.recipe(MODULATION_LINEARS, torch.bfloat16)
    assert fp8_cache.recipe_id(base) == fp8_cache.recipe_id(fp8_cache.recipe(reversed(MODULATION_LINEARS),
                                                                              torch.bfloat16))
    others = [fp8_cache.recipe((), torch.bfloat16), fp8_cache.recipe(MODULATION_LINEARS, torch.float32),
              {**base, "quantization": "e4m3-rowwise-amax-v3"}]
    assert len({fp8_cache.recipe_id(spec) for spec in [base, *others]}) == 4
    # Each named recipe (FP8_KEEP_BF16) writes and looks for its own cache.
    assert len({fp8_cache.recipe_id(fp8_cache.recipe(keep, torch.bfloat16)) for keep in FP8_RECIPES.values()}) == \
        len(FP8_RECIPES)


def snapshot_transformer(hf_home, repo_id=EDIT_REPO):
    ref = locate(repo_id, hf_home)
    return ref, ref.path / fp8_cache.TRANSFORMER


def quantized_at_start(folder, keep):
    """The worker's path without a cache: from_pretrained, then quantize_blocks."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=CPU_DTYPE)
    quantize_blocks(model, torch.device("cpu"), keep=keep)
    return model


def cached(hf_home, root, keep, repo_id=EDIT_REPO):
    ref, folder = snapshot_transformer(hf_home, repo_id)
    spec = fp8_cache.recipe(keep, CPU_DTYPE)
    skeleton = fp8_cache.empty_transformer(folder, CPU_DTYPE, keep)
    return fp8_cache.find(root, ref.repo_id, ref.revision, spec, fp8_cache.cached_tensor_specs(skeleton))


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def tensor_attributes(model):
    """Tensors modules hold as plain attributes (the rotary frequencies), by module and name."""
    return {(module_name, key): value for module_name, module in model.named_modules()
            for key, value in vars(module).items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("keep", [frozenset(MODULATION_LINEARS), frozenset()], ids=["keep-modulation", "all-fp8"])
def test_a_cached_transformer_is_bit_for_bit_the_one_quantized_at_start(hf_home, tmp_path, keep):
    ref, folder = snapshot_transformer(hf_home)
    fp8_cache.build(folder, tmp_path, ref.repo_id, ref.revision, keep, CPU_DTYPE)
    model, report = fp8_cache.load_transformer(cached(hf_home, tmp_path, keep), folder, CPU_DTYPE,
                                               torch.device("cpu"), keep)
    want = quantized_at_start(folder, keep)
    got_parameters, want_parameters = dict(model.named_parameters()), dict(want.named_parameters())
    assert got_parameters.keys() == want_parameters.keys()
    assert any(isinstance(module, Fp8Linear) for module in model.modules())
    for name, expected in want_parameters.items():
        actual = got_parameters[name]
        assert (actual.dtype, actual.shape, actual.device, actual.requires_grad) == \
            (expected.dtype, expected.shape, expected.device, expected.requires_grad), name
        assert torch.equal(as_bits(actual), as_bits(expected)), name
    assert dict(model.named_buffers()).keys() == dict(want.named_buffers()).keys()
    got_attributes, want_attributes = tensor_attributes(model), tensor_attributes(want)
    assert got_attributes.keys() == want_attributes.keys() and got_attributes
    assert all(torch.equal(got_attributes[key], value) and got_attributes[key].dtype == value.dtype
               for key, value in want_attributes.items())
    assert dict(model.config) == dict(want.config) and model.training is want.training is False
    # Bytes: the cache's files and the snapshot's tensors but the quantized weights.
    cache_files = sum(path.stat().st_size for path in report_folder(tmp_path).glob("*.safetensors"))
    snapshot_bytes = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    assert report.cache_bytes == cache_files
    stored, _ = weights.stored_tensors(folder)
    quantized_weights = sum(stored[f"{name}.weight"].nbytes for name in fp8_cache.fp8_modules(model))
    assert quantized_weights > 0 and report.snapshot_bytes == snapshot_bytes - quantized_weights


def report_folder(root):
    return next(root.glob("*/*/*"))


def test_the_cache_files_are_safetensors_files_that_safetensors_reads(hf_home, tmp_path):
    ref, folder = snapshot_transformer(hf_home)
    written = fp8_cache.build(folder, tmp_path, ref.repo_id, ref.revision, MODULATION_LINEARS, CPU_DTYPE)
    ours, _ = weights.stored_tensors(written)
    seen = set()
    for path in written.glob("*.safetensors"):
        with safe_open(path, framework="pt") as file:
            for name in file.keys():
                assert torch.equal(as_bits(file.get_tensor(name)), as_bits(weights.read_tensor(ours[name])))
                seen.add(name)
    assert seen == ours.keys() and len(seen) > 0
    manifest = json.loads((written / fp8_cache.MANIFEST).read_text())
    assert (manifest["repo_id"], manifest["revision"]) == (ref.repo_id, ref.revision)
    # A second build finds it whole and writes nothing.
    before = {path: path.stat().st_mtime_ns for path in written.iterdir()}
    assert fp8_cache.build(folder, tmp_path, ref.repo_id, ref.revision, MODULATION_LINEARS, CPU_DTYPE) == written
    assert {path: path.stat().st_mtime_ns for path in written.iterdir()} == before


def build_other_revision(hf_home, root):
    ref, folder = snapshot_transformer(hf_home)
    fp8_cache.build(folder, root, ref.repo_id, "0" * 40, MODULATION_LINEARS, CPU_DTYPE)


def build_other_keep_set(hf_home, root):
    ref, folder = snapshot_transformer(hf_home)
    fp8_cache.build(folder, root, ref.repo_id, ref.revision, (), CPU_DTYPE)


def build_and(damage):
    def make(hf_home, root):
        ref, folder = snapshot_transformer(hf_home)
        damage(fp8_cache.build(folder, root, ref.repo_id, ref.revision, MODULATION_LINEARS, CPU_DTYPE))
    return make


def truncate(cache):
    shard = next(cache.glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 100)


def garble_header(cache):
    """A shard of the same size whose header length is garbage."""
    shard = next(cache.glob("*.safetensors"))
    with open(shard, "r+b") as file:
        file.write(b"\xff" * 8)


def moved_from_another_revision(cache):
    """A whole cache copied under this revision's folder from another revision's."""
    manifest = json.loads((cache / fp8_cache.MANIFEST).read_text())
    (cache / fp8_cache.MANIFEST).write_text(json.dumps({**manifest, "revision": "1" * 40}))


@pytest.mark.parametrize("make, reason", [
    (build_other_revision, "caches of other revisions only: 000000000000 (this snapshot: "),
    (build_other_keep_set, "this revision has caches of other recipes: "),
    (build_and(truncate), "bytes; the manifest says"),
    (build_and(garble_header), "does not fit the file's"),
    (build_and(lambda cache: (cache / fp8_cache.MANIFEST).unlink()), "(a build that did not finish)"),
    (build_and(moved_from_another_revision), "was written for revision '1111111111111111111111111111111111111111'"),
], ids=["other-revision", "other-keep-set", "truncated", "garbled-header", "no-manifest", "other-manifest"])
def test_an_unusable_cache_is_refused_with_its_reason(hf_home, tmp_path, make, reason):
    make(hf_home, tmp_path)
    with pytest.raises(fp8_cache.CacheUnusable, match=None) as refused:
        cached(hf_home, tmp_path, frozenset(MODULATION_LINEARS))
    assert reason in str(refused.value)


# -- The worker --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_root(hf_home, tmp_path_factory):
    """FP8 caches of both tiny transformers, written by tools/download_models.py --fp8 from an
    HF_HOME it filled from a loopback hub (tests/fake_hf_hub.py)."""
    hub = start_fake_hub(hf_home)
    home = tmp_path_factory.mktemp("fp8-hf-home")
    try:
        done = subprocess.run([sys.executable, "tools/download_models.py", "--hf-home", str(home), "--fp8",
                               "--fp8-dtype", "float32"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"})
    finally:
        hub.stop()
    assert done.returncode == 0, done.stderr
    assert f"FP8 caches under {home / 'qwen-fp8'}" in done.stdout
    return home / "qwen-fp8"


def fp8_worker(worker_env, cache_dir, **extra):
    return start_worker(Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,layered",
                                           "FP8_CACHE_DIR": str(cache_dir), **extra}))


@pytest.fixture(scope="module")
def quantizing_worker(worker_env):
    return start_worker(Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,layered",
                                           "FP8_CACHE": "off"}))


JOBS = [
    {"image_base64": png_b64(sample_image()), "prompt": "a red hat", "seed": 11, "return_base64": True, **FAST},
    {"operation": "decompose", "image_base64": png_b64(sample_image()), "prompt": "a hat", "layers": 2, "seed": 5,
     "num_inference_steps": 2, "return_base64": True},
]


def pixels(output: dict) -> list[np.ndarray]:
    return [np.asarray(image_from_b64(entry["base64"])) for entry in output["images"]]


def test_a_worker_with_the_cache_gives_the_pixels_of_one_that_quantizes_at_start(worker_env, cache_root,
                                                                                  quantizing_worker, caplog):
    with caplog.at_level(logging.INFO, logger="src.models.host"):
        worker = fp8_worker(worker_env, cache_root)
    assert [(entry["model"], entry["cache"]) for entry in worker.host.fp8_loads] == [(EDIT_REPO, True),
                                                                                      (LAYERED_REPO, True)]
    assert "FP8 cache: Qwen/Qwen-Image-Edit-2511@" in caplog.text
    # The read-ahead (WEIGHTS_PREFETCH, on) leaves the snapshots' bf16 transformers alone.
    edit, layered = worker.host.edit_ref.path, worker.host.layered_ref.path
    read_ahead = [weights.weight_files(edit / folder) for folder in ("text_encoder", "vae")] + \
             [weights.weight_files(layered / "vae")]
    assert [report["bytes"] for report in worker.host.prefetched] == [
        sum(path.stat().st_size for files in read_ahead[:2] for path in files),
        sum(path.stat().st_size for path in read_ahead[2])]
    assert [entry["cache"] for entry in quantizing_worker.host.fp8_loads] == []  # FP8_CACHE=off: not even looked
    for job in JOBS:
        got = worker.handle({"id": "cached", "input": job})
        want = quantizing_worker.handle({"id": "quantized", "input": job})
        assert "error" not in got, got
        assert len(got["images"]) == len(want["images"]) > 0
        assert all(np.array_equal(a, b) for a, b in zip(pixels(got), pixels(want)))


def test_the_early_read_takes_the_caches_files_for_the_transformers(worker_env, cache_root, quantizing_worker):
    """handler.py's early read (src/models/files/early_read.py) reads each FP8 cache instead of the bf16
    transformer it stands for; the load takes it over, reading nothing again, with the same pixels."""
    settings = Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,layered",
                                  "FP8_CACHE_DIR": str(cache_root)})
    edit, layered = (locate(repo, settings.hf_home) for repo in (EDIT_REPO, LAYERED_REPO))

    def cache_files(ref):
        return sorted(cache_root.glob(f"{ref.repo_id.replace('/', '--')}/{ref.revision}/*/{fp8_cache.SHARD_PREFIX}*"))

    early = read_at_start(settings)
    assert {name: files for name, (files, _) in early.readings.items()} == {
        "edit": cache_files(edit) + weights.weight_files(edit.path / "text_encoder", edit.path / "vae"),
        "layered": cache_files(layered) + weights.weight_files(layered.path / "vae")}
    assert all(cache_files(ref) for ref in (edit, layered))
    worker = start_worker(settings, early)
    assert [entry["cache"] for entry in worker.host.fp8_loads] == [True, True]
    assert [report["bytes"] for report in worker.host.prefetched] == [
        sum(path.stat().st_size for path in files) for files in
        (cache_files(edit) + weights.weight_files(edit.path / "text_encoder", edit.path / "vae"),
         cache_files(layered) + weights.weight_files(layered.path / "vae"))]
    got = worker.handle({"id": "early", "input": JOBS[0]})
    assert np.array_equal(pixels(got)[0], pixels(quantizing_worker.handle({"id": "quantized", "input": JOBS[0]}))[0])
    # A cache of another recipe is not the load's: the early read takes the bf16 transformer.
    other = Settings.from_env({**worker_env, "QUANTIZE": "fp8", "FP8_CACHE_DIR": str(cache_root),
                               "FP8_KEEP_BF16": ",".join(MODULATION_LINEARS)})
    assert start_files(other) == {"edit": weights.weight_files(edit.path)}


def test_a_cache_of_another_recipe_is_not_loaded(worker_env, cache_root, caplog):
    # cache_root holds the default recipe's caches; a worker keeping fewer linears in bf16
    # (the default before SGLang's recipe) must not load them, and says why.
    with caplog.at_level(logging.INFO, logger="src.models.host"):
        worker = fp8_worker(worker_env, cache_root, PRELOAD="edit", FP8_KEEP_BF16=",".join(MODULATION_LINEARS))
    assert [entry["cache"] for entry in worker.host.fp8_loads] == [False]
    assert "this revision has caches of other recipes" in caplog.text
    kept = {name.split(".", 2)[2] for name, module in worker.host.edit.transformer.named_modules()
            if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear)}
    assert kept == set(MODULATION_LINEARS)
    assert "error" not in worker.handle({"id": "other-recipe", "input": JOBS[0]})


def test_a_damaged_cache_is_logged_and_the_worker_quantizes_at_start(worker_env, cache_root, quantizing_worker,
                                                                     tmp_path, caplog):
    damaged = tmp_path / "damaged"
    shutil.copytree(cache_root, damaged)
    for cache in damaged.glob("*/*/*"):
        truncate(cache)
    with caplog.at_level(logging.INFO, logger="src.models.host"):
        worker = fp8_worker(worker_env, damaged, PRELOAD="edit")
    assert [entry["cache"] for entry in worker.host.fp8_loads] == [False]
    assert "FP8 cache not used for Qwen/Qwen-Image-Edit-2511@" in caplog.text
    assert "the manifest says" in caplog.text and "quantizing at start instead" in caplog.text
    got = worker.handle({"id": "damaged", "input": JOBS[0]})
    want = quantizing_worker.handle({"id": "quantized", "input": JOBS[0]})
    assert np.array_equal(pixels(got)[0], pixels(want)[0])
