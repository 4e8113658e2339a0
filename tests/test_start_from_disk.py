"""tools/disk_weights.py and tools/start_bench.py --from-disk on the tiny models (CPU): the
layout written is one the worker loads through handler.py's start (with QUANTIZE=fp8 through
its FP8 cache, the quantized linears' bf16 weights being holes), and the start's results
say what it read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT
from tools.disk_weights import LAYOUT_FILE, fill_holes, make_fp8, write_layout


def start_from_disk(hf_home: Path, out: Path, label: str, **env: str) -> dict:
    command = [sys.executable, str(REPO_ROOT / "tools" / "start_bench.py"), "--from-disk", str(hf_home),
               "--preload", "edit", "--out", str(out), "--label", label]
    subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DEVICE": "cpu", "WARMUP": "true", **env})
    results = json.loads(next(out.glob(f"*-{label}.json")).read_text())
    assert results["disk_layout"]["size"] == "tiny"
    [start] = results["starts"]
    return start


def weight_bytes(*folders: Path) -> int:
    return sum(path.stat().st_size for folder in folders for path in folder.glob("*.safetensors"))


def test_the_written_layout_starts_the_worker_from_disk_in_fp8_then_bf16(hf_home, tmp_path):
    home = tmp_path / "hf"
    record = write_layout(home, hf_home, "fp8", "tiny", torch.device("cpu"), fp8_dtype=torch.float32)
    snapshot = Path(record["snapshot"])
    assert record["holes"]["tensors"] > 0

    start = start_from_disk(home, tmp_path / "out", "fp8", QUANTIZE="fp8")
    assert "error" not in start, start
    assert start["fp8_loads"] == [{"model": "Qwen/Qwen-Image-Edit-2511", "cache": True,
                                   "seconds": start["fp8_loads"][0]["seconds"],
                                   "bytes_read": start["fp8_loads"][0]["bytes_read"]}]
    ahead = [report for report in start["weights_read"]["reports"] if report["how"] == "read-ahead"]
    # The read-ahead reads the FP8 cache instead of the transformer, beside the text encoder's and
    # VAE's files, and begins before handler.py imports torch (src/models/files/early_read.py).
    cache_bytes = sum(path.stat().st_size for path in (home / "qwen-fp8").rglob("fp8-*.safetensors"))
    assert cache_bytes > 0
    assert sum(report["bytes"] for report in ahead) == weight_bytes(snapshot / "text_encoder",
                                                                    snapshot / "vae") + cache_bytes
    assert start["read_began_s"] < start["torch_import_began_s"]
    assert start["stages_s"]["read"] > 0 and start["ready_s"] >= start["stages_s"]["load"]
    assert start["settings"] == {"QUANTIZE": "fp8", "DEVICE": "cpu", "PRELOAD": "edit"}
    assert start["compile_cache"] == "off"

    filled = fill_holes(home, torch.device("cpu"))
    assert filled["precision"] == "bf16" and filled["filled_bytes"] == record["holes"]["bytes"]
    assert not (home / "qwen-fp8").exists()
    start = start_from_disk(home, tmp_path / "out", "bf16")
    assert "error" not in start, start
    assert start["fp8_loads"] == []
    assert start["read_began_s"] < start["torch_import_began_s"]
    # Each file read once: the load took the early read over.
    assert start["weights_read"]["bytes"] == weight_bytes(*(snapshot / name for name in
                                                            ("transformer", "text_encoder", "vae")))
    assert json.loads((home / LAYOUT_FILE).read_text())["precision"] == "bf16"


def test_the_written_weights_are_the_ones_loaded(hf_home, tmp_path):
    """Every tensor the layout holds is one the models load (none left at a random init),
    finite, and the filled holes hold weights again."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    home = tmp_path / "hf"
    record = write_layout(home, hf_home, "fp8", "tiny", torch.device("cpu"), fp8_dtype=torch.float32)
    fill_holes(home, torch.device("cpu"))
    snapshot = Path(record["snapshot"])
    encoder, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(snapshot / "text_encoder",
                                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = {}
    for path in (snapshot / "text_encoder").glob("*.safetensors"):
        stored.update(load_file(path))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, stored[name].to(value.dtype)), name
    transformer = QwenImageTransformer2DModel.from_pretrained(snapshot / "transformer")
    state = transformer.state_dict()
    assert all(torch.isfinite(value).all() for value in state.values())
    assert all(state[name].abs().sum() > 0 for name in record["holes"]["names"])

    # Back to fp8 (the GPU run's order: bf16 first, then its holes punched and the cache written).
    from src.models.fp8 import cache as fp8_cache

    again = make_fp8(home, torch.device("cpu"), dtype=torch.float32)
    assert again["holes"]["names"] == record["holes"]["names"]
    punched = QwenImageTransformer2DModel.from_pretrained(snapshot / "transformer").state_dict()
    assert all(not punched[name].any() for name in again["holes"]["names"])
    keep = frozenset(fp8_cache.fp8.DEFAULT_FP8_KEEP_BF16)
    skeleton = fp8_cache.empty_transformer(snapshot / "transformer", torch.float32, keep)
    cache = fp8_cache.find(home / "qwen-fp8", "Qwen/Qwen-Image-Edit-2511", snapshot.name,
                           fp8_cache.recipe(keep, torch.float32), fp8_cache.cached_tensor_specs(skeleton))
    model, _ = fp8_cache.load_transformer(cache, snapshot / "transformer", torch.float32, torch.device("cpu"), keep)
    assert all(torch.isfinite(value.float()).all() for value in model.state_dict().values())
