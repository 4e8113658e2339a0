"""QUANTIZE=fp8 (src/models/fp8/linear.py): the scaled FP8 linear against the linear it replaces, which
layers are replaced, and the worker's job path with FP8 on the CPU (torch's CPU build
runs the same scaled matmul as the GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.models.fp8.linear import (BLOCK_LINEARS, DEFAULT_FP8_KEEP_BF16, E4M3_MAX, MODULATION_LINEARS, Fp8Linear,
                            prepared_bytes, quantize_blocks, rowwise_fp8)
from src.models.files.snapshots import main_snapshot
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import FAST, direct_edit, image_from_b64, png_b64, reference_edit_pipeline, same_pixels, sample_image

# e4m3 keeps 3 mantissa bits: rounding moves a value by at most 2**-4 of itself, or, near
# zero (subnormals, steps of 2**-9), by half a step.
E4M3_RELATIVE_STEP, E4M3_SUBNORMAL_HALF_STEP = 2**-4, 2**-10


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_rowwise_values_times_scales_give_the_rows_back():
    rows = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 64)[:, None]
    values, scales = rowwise_fp8(rows)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (64, 1)
    # Each row's largest value maps to e4m3's largest: the whole range is used, per row.
    assert torch.allclose(values.float().abs().amax(dim=1), torch.full((64,), E4M3_MAX))
    restored = values.float() * scales
    assert torch.all((restored - rows).abs() <= E4M3_RELATIVE_STEP * rows.abs() + E4M3_SUBNORMAL_HALF_STEP * scales)


def test_fp8_linear_is_close_to_the_linear_it_replaces_but_not_equal():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    x = torch.randn(2, 7, 256, generator=generator)
    with torch.no_grad():
        want = linear(x)
        got = Fp8Linear(linear)(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    # Weights and activations each round by up to 2**-4; summed over 256 products the
    # errors average out to a few percent of the output.
    assert 1e-3 < relative_l2(got, want) < 0.05
    assert Fp8Linear(linear).weight.dtype == torch.float8_e4m3fn


def test_zero_rows_give_the_bias_and_no_nans():
    linear = torch.nn.Linear(32, 16)
    with torch.no_grad():
        out = Fp8Linear(linear)(torch.zeros(3, 32))
    assert torch.equal(out, linear.bias.detach().expand(3, 16))


def tiny_transformer(hf_home):
    from diffusers import QwenImageTransformer2DModel

    folder = main_snapshot(hf_home, "Qwen/Qwen-Image-Edit-2511") / "transformer"
    return QwenImageTransformer2DModel.from_pretrained(folder)


def block_linears(transformer, kind) -> set[str]:
    """Names, inside a block, of the linears of type `kind` (or a subclass: the worker gives
    the edit transformer's linears LoRA branches, src/models/lora/branches.py), over all blocks."""
    return {name for block in transformer.transformer_blocks for name, m in block.named_modules()
            if isinstance(m, kind)}


def test_the_blocks_linears_but_sglangs_recipe_are_replaced(hf_home):
    transformer = tiny_transformer(hf_home)
    assert block_linears(transformer, torch.nn.Linear) == set(BLOCK_LINEARS)
    outside = [name for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith("transformer_blocks.")]
    assert quantize_blocks(transformer, torch.device("cpu")) == 11 * len(transformer.transformer_blocks)
    # The modulation linears (one token per pass) and the image MLP's down-projection keep
    # their precision by default (SGLang's validated recipe)...
    assert block_linears(transformer, torch.nn.Linear) == {"img_mod.1", "txt_mod.1", "img_mlp.net.2"}
    assert block_linears(transformer, Fp8Linear) == set(BLOCK_LINEARS) - {"img_mod.1", "txt_mod.1", "img_mlp.net.2"}
    # ...as do the embedders and the output projection.
    assert outside and all(type(transformer.get_submodule(name)) is torch.nn.Linear for name in outside)


def test_keep_chooses_which_block_linears_stay(hf_home):
    everything = tiny_transformer(hf_home)
    assert quantize_blocks(everything, torch.device("cpu"), keep=()) == 14 * len(everything.transformer_blocks)
    assert block_linears(everything, torch.nn.Linear) == set()
    down_too = tiny_transformer(hf_home)
    quantize_blocks(down_too, torch.device("cpu"), keep=MODULATION_LINEARS + ("img_mlp.net.2",))
    assert block_linears(down_too, torch.nn.Linear) == {"img_mod.1", "txt_mod.1", "img_mlp.net.2"}


def test_prepared_bytes_are_the_quantized_transformers_bytes(hf_home):
    for keep in ((), MODULATION_LINEARS, DEFAULT_FP8_KEEP_BF16):
        transformer = tiny_transformer(hf_home)
        predicted = prepared_bytes(transformer, keep)
        quantize_blocks(transformer, torch.device("cpu"), keep=keep)
        actual = sum(p.numel() * p.element_size() for p in transformer.parameters())
        assert predicted == actual == prepared_bytes(transformer, keep)


@pytest.fixture(scope="module")
def fp8_worker(worker_env):
    return start_worker(Settings.from_env({**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,layered"}))


def job(*leave_out: str, **extra) -> dict:
    """An edit job on the tiny models (FAST), with `extra` keys and without `leave_out`."""
    full = {"image_base64": png_b64(sample_image()), "prompt": "a red hat", "seed": 11, "return_base64": True,
            **FAST, **extra}
    return {key: value for key, value in full.items() if key not in leave_out}


def pixels(entry: dict) -> np.ndarray:
    return np.asarray(image_from_b64(entry["base64"])).astype(int)


@pytest.mark.parametrize("request_input", [
    job(),
    job("width", "height", operation="decompose", layers=2),
], ids=["edit", "decompose"])
def test_fp8_jobs_stay_near_the_unquantized_images(fp8_worker, worker, request_input, guarantee_figures):
    for pipeline in (fp8_worker.host.edit, fp8_worker.host.layered()):
        assert block_linears(pipeline.transformer, torch.nn.Linear) == set(DEFAULT_FP8_KEEP_BF16)
    quantized = fp8_worker.handle({"id": "fp8", "input": request_input})
    reference = worker.handle({"id": "full", "input": request_input})
    assert "error" not in quantized, quantized
    assert len(quantized["images"]) == len(reference["images"])
    for got, want in zip(quantized["images"], reference["images"]):
        difference = np.abs(pixels(got) - pixels(want))
        # Tiny random weights amplify rounding (docs/performance.md: a few 8-bit levels on average);
        # the images differ, so FP8 ran, and stay close.
        assert 0 < difference.mean() < 8, (got["name"], difference.mean())
        guarantee_figures[f"fp8_mean_abs_8bit_{request_input.get('operation', 'edit')}_{got['name']}"] = \
            round(float(difference.mean()), 2)


def test_fp8_edit_equals_the_pipeline_with_quantized_blocks_called_directly(fp8_worker):
    """FP8 is the only change: diffusers' pipeline, its blocks quantized the same way and
    called directly, gives the worker's pixels."""
    pipeline = reference_edit_pipeline(fp8_worker.host.edit_ref.path)
    quantize_blocks(pipeline.transformer, torch.device("cpu"))
    source = sample_image()
    out = fp8_worker.handle({"id": "fp8-fidelity", "input": {**job(), "seed": 1234}})
    expected = direct_edit(pipeline, [source], "a red hat", 1234, num_inference_steps=2, width=256, height=256)
    assert same_pixels(image_from_b64(out["edited_image_base64"]).convert("RGB"), expected)
