"""LoRAs under QUANTIZE=fp8 (src/models/lora/fp8_fusing.py): each touched linear fused in bf16 from the
published weights and then quantized equals diffusers' own fuse quantized afterwards; the
base model comes back bit for bit; Lightning runs through the worker on the CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from src.models.fp8.linear import Fp8Linear, quantize_blocks, rowwise_fp8
from src.models.lora.fp8_fusing import PublishedWeights, PublishedWeightsError, touched_linears
from src.models.lora.sources import LoraFile
from src.models.lora.adapters import LIGHTNING_SCHEDULER_CONFIG, FusedLoras, LoraLibrary
from src.models.files.snapshots import main_snapshot
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import edit_hat, edited_pixels, reference_edit_pipeline, sample_image

EDIT_REPO = "Qwen/Qwen-Image-Edit-2511"
LIGHTNING_4 = "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"


@pytest.fixture(scope="module")
def snapshot(hf_home) -> Path:
    return main_snapshot(hf_home, EDIT_REPO)


@pytest.fixture(scope="module")
def lightning_file(hf_home) -> Path:
    return next(hf_home.glob(f"hub/models--lightx2v--*/snapshots/*/{LIGHTNING_4}"))


def tiny_transformer(snapshot: Path, dtype: torch.dtype):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(snapshot / "transformer", dtype=dtype)


def adapters(transformer, files_and_scales: list[tuple[Path, float]]) -> list:
    """The worker's checked adapters for these files (LoraLibrary, as jobs get them)."""
    from diffusers import QwenImageEditPlusPipeline

    library = LoraLibrary(QwenImageEditPlusPipeline, transformer, "Qwen/Qwen-Image-Edit-2511")
    return [library.adapter(LoraFile(str(path), path, hashlib.sha256(path.read_bytes()).hexdigest()), scale, "loras")
            for path, scale in files_and_scales]


def diffusers_fused(snapshot: Path, dtype: torch.dtype, chosen: list):
    """The tiny transformer in `dtype` with `chosen` fused by diffusers itself, as the bf16
    worker fuses them (load_lora_weights, set_adapters, fuse_lora, unload_lora_weights)."""
    from diffusers import QwenImageEditPlusPipeline

    transformer = tiny_transformer(snapshot, dtype)
    pipeline = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                         processor=None, transformer=transformer)
    for adapter in chosen:
        pipeline.load_lora_weights(dict(adapter.state_dict), adapter_name=adapter.name)
    pipeline.set_adapters([a.name for a in chosen], adapter_weights=[a.scale for a in chosen])
    pipeline.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[a.name for a in chosen])
    pipeline.unload_lora_weights()
    return transformer


def state(transformer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in transformer.state_dict().items()}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and torch.equal(a, b)


SETS = {
    "lightning": [("lightning", 1.0)],
    "custom_on_every_linear": [("tiny_lora_diffusers.safetensors", 0.8)],
    "lightning_and_custom": [("lightning", 1.0), ("tiny_lora_aitoolkit.safetensors", -0.7)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("chosen", SETS, ids=list(SETS))
def test_fused_then_quantized_equals_diffusers_fuse_quantized(snapshot, lora_dir, lightning_file, dtype, chosen):
    files = [(lightning_file if name == "lightning" else lora_dir / name, scale) for name, scale in SETS[chosen]]
    transformer = tiny_transformer(snapshot, dtype)
    quantize_blocks(transformer, torch.device("cpu"))
    chosen_adapters = adapters(transformer, files)
    reference = diffusers_fused(snapshot, dtype, chosen_adapters)
    base = state(transformer)
    fused = FusedLoras(lambda: PublishedWeights(snapshot / "transformer", dtype), dtype)
    pipeline = SimpleNamespace(transformer=transformer)

    fused.apply(pipeline, chosen_adapters)
    touched = set(touched_linears(transformer, chosen_adapters))
    assert touched and all(name.startswith("transformer_blocks.") for name in touched)
    for name, module in transformer.named_modules():
        if isinstance(module, Fp8Linear):  # quantized, as at load, from diffusers' bf16 fuse
            values, scale = rowwise_fp8(reference.get_submodule(name).weight.detach())
            assert bitwise_equal(module.weight, values) and bitwise_equal(module.weight_scale, scale.reshape(1, -1))
            assert bitwise_equal(module.weight, base[f"{name}.weight"]) == (name not in touched)
        elif isinstance(module, torch.nn.Linear):  # kept in bf16 (the modulation): diffusers' fuse itself
            assert bitwise_equal(module.weight, reference.get_submodule(name).weight)

    fused.apply(pipeline, [])
    after = state(transformer)
    assert after.keys() == base.keys() and all(bitwise_equal(after[k], base[k]) for k in base)


def test_a_fuse_that_fails_part_way_leaves_the_base_exact(snapshot, lora_dir):
    """Published weights that are not the served model's (another revision) are refused
    at the first linear that differs, after some were fused: those are put back."""
    transformer = tiny_transformer(snapshot, torch.float32)
    quantize_blocks(transformer, torch.device("cpu"))
    chosen = adapters(transformer, [(lora_dir / "tiny_lora_diffusers.safetensors", 1.0)])
    names = touched_linears(transformer, chosen)
    published = dict(PublishedWeights(snapshot / "transformer", torch.float32))
    published[names[-1]] = published[names[-1]] * 1.5  # the last FP8 linear: the others fuse first
    base = state(transformer)
    fused = FusedLoras(lambda: published, torch.float32)
    with pytest.raises(PublishedWeightsError, match=f"{names[-1]}: the published weight, quantized, differs"):
        fused.apply(SimpleNamespace(transformer=transformer), chosen)
    assert fused.active == ()
    after = state(transformer)
    assert all(bitwise_equal(after[k], base[k]) for k in base)


def test_published_weights_read_sharded_and_single_file_snapshots(tmp_path):
    tensors = {"transformer_blocks.0.attn.to_q.weight": torch.randn(4, 4),
               "transformer_blocks.0.attn.to_k.weight": torch.randn(4, 4), "norm_out.weight": torch.ones(4)}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    save_file(tensors, str(single / "diffusion_pytorch_model.safetensors"))
    keys = sorted(tensors)
    for shard, part in enumerate((keys[:1], keys[1:])):
        save_file({key: tensors[key] for key in part}, str(sharded / f"part-{shard}.safetensors"))
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {key: f"part-{0 if key in keys[:1] else 1}.safetensors" for key in keys}}))
    for folder in (single, sharded):
        weights = PublishedWeights(folder, torch.bfloat16)
        assert torch.equal(weights["transformer_blocks.0.attn.to_k"], tensors["transformer_blocks.0.attn.to_k.weight"]
                           .bfloat16())
        weights.check(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"])
        with pytest.raises(PublishedWeightsError, match="lack 1 of the 2 linears .*first: transformer_blocks.0.img_mod.1"):
            weights.check(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mod.1"])
    with pytest.raises(PublishedWeightsError, match="cannot be read"):
        PublishedWeights(tmp_path / "nothing", torch.bfloat16).check(["transformer_blocks.0.attn.to_q"])


# ---------------------------------------------------------------------------------------
# The worker's job path.

@pytest.fixture(scope="module")
def fp8_worker(worker_env):
    """An FP8 worker with the Lightning files read and checked at start (PRELOAD)."""
    return start_worker(Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,lightning"}))


def edit(worker, **extra) -> dict:
    return edit_hat(worker, "fp8-lora", **extra)


pixels = edited_pixels


def test_fp8_lightning_equals_diffusers_fuse_then_quantize_called_directly(fp8_worker, lightning_file):
    """FP8 is the only change: diffusers' pipeline with the Lightning LoRA fused by
    diffusers, then its blocks quantized, called directly, gives the worker's pixels."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = edit(fp8_worker, lightning=4, num_inference_steps=None)
    assert out["lightning"]["steps"] == 4 and out["timings_ms"]["lora"] > 0
    pipeline = reference_edit_pipeline(fp8_worker.host.edit_ref.path)
    pipeline.load_lora_weights(str(lightning_file), adapter_name="lightning")
    pipeline.fuse_lora(adapter_names=["lightning"], lora_scale=1.0)
    pipeline.unload_lora_weights()
    quantize_blocks(pipeline.transformer, torch.device("cpu"))
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    expected = pipeline(image=[sample_image()], prompt="a hat", negative_prompt=" ", true_cfg_scale=1.0,
                        guidance_scale=1.0, num_inference_steps=4, width=256, height=256,
                        generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected).astype(int))


def test_fp8_lora_jobs_leave_the_base_model_bit_identical(fp8_worker, lora_dir):
    transformer = fp8_worker.host.edit.transformer
    before_job = edit(fp8_worker)
    base = state(transformer)
    custom = {"source": str(lora_dir / "tiny_lora_diffusers.safetensors"), "scale": 0.8}
    first = edit(fp8_worker, loras=[custom])
    assert not np.array_equal(pixels(first), pixels(before_job))
    again = edit(fp8_worker, loras=[custom])
    assert np.array_equal(pixels(again), pixels(first)) and "lora" not in again["timings_ms"]  # stays fused
    switched = edit(fp8_worker, lightning=8, num_inference_steps=None, loras=[custom])  # restore, then fuse
    assert switched["timings_ms"]["lora"] > 0
    after_job = edit(fp8_worker)
    assert after_job["timings_ms"]["lora"] > 0
    assert np.array_equal(pixels(after_job), pixels(before_job))
    after = state(transformer)
    assert all(bitwise_equal(after[k], base[k]) for k in base)


@pytest.mark.parametrize("lightning", [4, None], ids=["lightning4", "base_4_steps_no_cfg"])
def test_fp8_lightning_stays_near_the_unquantized_lightning_job(fp8_worker, worker, lightning, guarantee_figures):
    """The deviation docs/loras.md quotes for FP8 Lightning on the tiny models (float32 reference),
    beside FP8's own on the same job shape without the LoRA."""
    job = {"lightning": 4, "num_inference_steps": None} if lightning else {"num_inference_steps": 4,
                                                                           "true_cfg_scale": 1.0}
    difference = np.abs(pixels(edit(fp8_worker, **job)) - pixels(edit(worker, **job)))
    # The same bound as FP8 without LoRAs (tests/models/test_fp8.py).
    assert 0 < difference.mean() < 8, difference.mean()
    name = "lightning4" if lightning else "4_steps_no_cfg"
    guarantee_figures[f"fp8_{name}_mean_abs_8bit"] = round(float(difference.mean()), 2)
    guarantee_figures[f"fp8_{name}_max_abs_8bit"] = int(difference.max())


def test_fp8_set_held_on_the_device_is_fused_there_and_gives_the_in_place_fuses_image(fp8_worker, worker_env):
    """With room in the plan (GPU_MEMORY_GIB) the FP8 Lightning set is fused straight into
    its device copy, the layers never written (src/models/lora/resident.py `_hold_on_device`):
    the held values are the host-held worker's (`_hold_in_host_memory`, whose Lightning job
    gives diffusers' own fuse's image, above), bit for bit, and so is the image; the base
    comes back exact, and a release (copied out first) and a stage again give the same image."""
    held = start_worker(Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,lightning",
                                           "GPU_MEMORY_GIB": "400", "WARMUP": "false"}))
    switch, transformer = held.host.loras, held.host.edit.transformer
    assert switch.resident.where == "device" and fp8_worker.host.loras.resident.where == "host"
    base = state(transformer)
    lightning = edit(held, lightning=4, num_inference_steps=None)
    assert switch.mode == "resident"
    held_on_host = edit(fp8_worker, lightning=4, num_inference_steps=None)
    assert np.array_equal(pixels(lightning), pixels(held_on_host))
    held_values, host_values = state(transformer), state(fp8_worker.host.edit.transformer)
    assert all(bitwise_equal(held_values[k], host_values[k]) for k in held_values)
    assert any(not bitwise_equal(held_values[k], base[k]) for k in base)  # the set did change weights
    edit(held)
    after = state(transformer)
    assert switch.mode == "base" and all(bitwise_equal(after[k], base[k]) for k in base)
    # Released for a job that needs the room: copied out first (its first CPU copy), staged
    # again by the next job of the set, the same image.
    held_bytes = switch.device_copy_bytes()
    switch.release_device_copy(held.host.for_operation("edit"))
    assert switch.device_copy_bytes() == 0
    again = edit(held, lightning=4, num_inference_steps=None)
    assert switch.device_copy_bytes() == held_bytes and np.array_equal(pixels(again), pixels(lightning))


def test_fp8_start_reads_the_held_sets_published_weights_ahead(fp8_worker, lightning_file, worker_env):
    """The published bf16 weights the held set's fuse reads (its FP8 linears') are read into the
    page cache while the warm-up runs, and waited for before the fuse: the start's last read
    report covers exactly them, from the snapshot's transformer files. WEIGHTS_PREFETCH=off
    reads none of them ahead."""
    from safetensors import safe_open

    with safe_open(str(lightning_file), "pt") as file:
        lora_linears = {key.split(".lora_down.")[0] for key in file.keys() if ".lora_down." in key}
    modules = dict(fp8_worker.host.edit.transformer.named_modules())
    fp8_linears = sorted(name for name in lora_linears if isinstance(modules[name], Fp8Linear))
    assert fp8_linears and len(fp8_linears) < len(lora_linears)  # the bf16-kept ones are not read
    transformer = fp8_worker.host.edit_ref.path / "transformer"
    sizes, files = {}, set()
    for path in transformer.glob("*.safetensors"):
        with safe_open(str(path), "pt") as file:
            for key in file.keys():
                if key.removesuffix(".weight") in fp8_linears and key.endswith(".weight"):
                    tensor = file.get_slice(key)
                    sizes[key] = int(np.prod(tensor.get_shape())) * {"F32": 4, "BF16": 2, "F16": 2}[tensor.get_dtype()]
                    files.add(path.resolve())
    assert len(sizes) == len(fp8_linears)
    report = fp8_worker.host.prefetched[-1]
    assert (report["bytes"], report["files"]) == (sum(sizes.values()), len(files))

    quiet = start_worker(Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,lightning",
                                            "WEIGHTS_PREFETCH": "off", "WARMUP": "false"}))
    assert quiet.host.prefetched == [] and quiet.host.loras.resident is not None
