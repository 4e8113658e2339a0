"""tools/bench.py on the tiny models, the parts that run without a GPU: the stage clock
(`--breakdown`) keeps the timed models' signatures, so every captioning decoder runs under
it, diffusers' own `generate` too; `--levers` moves between FP8 recipes and back to bf16."""

from __future__ import annotations

import inspect

from src.models.files.snapshots import main_snapshot
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import png_b64, sample_image
from tools.bench import StageClock


def test_the_stage_clock_keeps_the_text_encoders_signature_for_stock_captioning(worker_env):
    worker = start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,layered", "CAPTION_DECODER": "stock"}))
    pipeline = worker.host.layered()
    unwrapped = inspect.signature(pipeline.text_encoder.forward)
    clock = StageClock()
    clock.attach(pipeline)
    assert inspect.signature(pipeline.text_encoder.forward) == unwrapped
    assert "pixel_values" in inspect.signature(pipeline.text_encoder.forward).parameters
    job = {"operation": "decompose", "image_base64": png_b64(sample_image()), "prompt": "", "layers": 2,
           "num_inference_steps": 2, "seed": 3, "return_base64": True}
    out = worker.handle({"id": "breakdown", "input": job})
    assert "error" not in out, out  # was: ValueError: The following model_kwargs are not used by the model
    report = clock.report(out["timings_ms"]["inference"] / 1000)
    assert report["text_encoder"] > 0 and report["transformer"] > 0 and report["vae_decode"] > 0


def named_transformer(hf_home):
    """The tiny edit transformer in bf16 with the bench's named random weights written in,
    those weights, and a copy of its state."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from tools.bench import NamedRandomWeights

    folder = main_snapshot(hf_home, "Qwen/Qwen-Image-Edit-2511") / "transformer"
    transformer = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    named = NamedRandomWeights(transformer, device="cpu")
    named.write_into(transformer)
    return transformer, named, {name: value.clone() for name, value in transformer.state_dict().items()}


def test_levers_move_between_fp8_recipes_and_back_to_the_bf16_weights(hf_home):
    """`--levers` measures every recipe in one run: the block linears go back to their bf16
    values (the named random weights) between recipes, so each recipe quantizes the same weights."""
    import torch

    from src.models.fp8.linear import Fp8Linear
    from src.plumbing.config import FP8_RECIPES
    from tools.bench import set_precision

    transformer, named, original = named_transformer(hf_home)
    blocks = len(transformer.transformer_blocks)
    for recipe in ("sglang", "all", "vllm-omni", "modulation"):
        set_precision(transformer, FP8_RECIPES[recipe], named, torch.device("cpu"))
        quantized = sum(isinstance(module, Fp8Linear) for module in transformer.modules())
        assert quantized == (14 - len(FP8_RECIPES[recipe])) * blocks, recipe
    set_precision(transformer, None, named, torch.device("cpu"))
    restored = transformer.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


def test_levers_pack_and_unpack_the_projections_between_levers(hf_home):
    """A packed lever (FP8_PACK_QKV) and the next unpacked one quantize the same weights:
    set_precision unpacks first, so packed and unpacked levers run in any order."""
    import torch

    from src.models.fp8.linear import Fp8Linear
    from src.models.fp8.packed import PackedFp8Linear
    from src.plumbing.config import FP8_RECIPES
    from tools.bench import LEVERS, PACKED_SUFFIX, set_precision

    transformer, named, original = named_transformer(hf_home)
    blocks = len(transformer.transformer_blocks)
    set_precision(transformer, FP8_RECIPES["sglang"], named, torch.device("cpu"))
    unpacked = {name: value.clone() for name, value in transformer.state_dict().items()}
    set_precision(transformer, FP8_RECIPES["sglang"], named, torch.device("cpu"), packed=True)
    assert sum(isinstance(m, PackedFp8Linear) for m in transformer.modules()) == 2 * blocks
    set_precision(transformer, FP8_RECIPES["sglang"], named, torch.device("cpu"))
    again = transformer.state_dict()
    def bits(tensor):
        return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor

    assert again.keys() == unpacked.keys() and all(torch.equal(bits(again[k]), bits(unpacked[k])) for k in unpacked)
    assert sum(type(m) is Fp8Linear for m in transformer.modules()) == 11 * blocks
    set_precision(transformer, None, named, torch.device("cpu"), packed=True)
    restored = transformer.state_dict()
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)
    # Every packed lever has an unpacked twin of the same settings.
    for name, settings in LEVERS.items():
        if name.endswith(PACKED_SUFFIX):
            assert settings[4] and LEVERS[name.removesuffix(PACKED_SUFFIX)] == settings[:4] + (False,)
