"""FP8_PACK_QKV (src/models/fp8/packed.py): each attention's Q/K/V triples as one FP8 matmul give
the unpacked transformer's outputs bit for bit (on the CPU, whose build runs the same scaled
matmul), keep the three linears' names, weights and scales, and keep every LoRA path exact:
unfused branches, the FP8 fuse, the held-ready set pointed at on the device or copied from
CPU memory, and the base model back bit for bit after all of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.models.fp8.linear import PACKED_PROJECTIONS, Fp8Linear, prepared_bytes, quantize_blocks
from src.models.fp8.packed import PackedFp8Linear, ProjectionView, pack_projections, unpack_projections
from src.models.files.snapshots import main_snapshot
from src.plumbing.config import DEFAULT_FP8_KEEP_BF16, Settings
from src.serving.startup import start_worker
from tests.conftest import FAST, edit_hat, edited_pixels, image_from_b64, png_b64, sample_image

EDIT_REPO = "Qwen/Qwen-Image-Edit-2511"


def quantized_transformer(hf_home, dtype=torch.bfloat16, keep=DEFAULT_FP8_KEEP_BF16):
    from diffusers import QwenImageTransformer2DModel

    folder = main_snapshot(hf_home, EDIT_REPO) / "transformer"
    transformer = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).eval()
    quantize_blocks(transformer, torch.device("cpu"), keep=frozenset(keep))
    return transformer


def one_pass(transformer, seed: int = 0) -> torch.Tensor:
    """The transformer's output for an 8x8-latent image and 7 text tokens, random but fixed by `seed`."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    dtype = transformer.dtype
    kwargs = dict(hidden_states=torch.randn(1, 64, config.in_channels, generator=generator).to(dtype),
                  encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=generator).to(dtype),
                  encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.bool), timestep=torch.tensor([0.5]),
                  img_shapes=[[(1, 8, 8)]], return_dict=False)
    with torch.no_grad():
        return transformer(**kwargs)[0]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_packed_passes_equal_unpacked_ones_and_unpacking_gives_the_linears_back(hf_home, dtype):
    transformer = quantized_transformer(hf_home, dtype)
    linears = {name: module for name, module in transformer.named_modules() if type(module) is Fp8Linear}
    before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    want = [one_pass(transformer, seed) for seed in (0, 1)]
    blocks = len(transformer.transformer_blocks)
    assert pack_projections(transformer) == 2 * blocks and pack_projections(transformer) == 0
    for seed, expected in zip((0, 1), want):
        assert bitwise_equal(one_pass(transformer, seed), expected)
    for block in transformer.transformer_blocks:
        for packed_name, names in PACKED_PROJECTIONS.items():
            packed = getattr(block.attn, packed_name)
            assert isinstance(packed, PackedFp8Linear) and packed._held_output is None  # let go after each pass
            for index, name in enumerate(names):
                view = getattr(block.attn, name)
                assert isinstance(view, ProjectionView) and isinstance(view, Fp8Linear) and view.index == index
    # Each linear's weight, row scales and bias, as views of the packed rows, are the ones it had.
    modules = dict(transformer.named_modules())
    for name, linear in linears.items():
        view = modules[name]
        assert (view.in_features, view.out_features) == (linear.in_features, linear.out_features)
        assert all(bitwise_equal(getattr(view, part), before[f"{name}.{part}"]) for part in ("weight", "weight_scale",
                                                                                              "bias"))
    assert unpack_projections(transformer) == 2 * blocks
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(bitwise_equal(after[k], before[k]) for k in before)
    assert bitwise_equal(one_pass(transformer), want[0])


def test_a_view_on_its_own_computes_its_rows_and_the_packed_output_goes_once_all_took_theirs(hf_home):
    transformer = quantized_transformer(hf_home)
    attention = transformer.transformer_blocks[0].attn
    separate = {name: getattr(attention, name) for name in PACKED_PROJECTIONS["packed_qkv"]}
    pack_projections(transformer)
    x, other = (torch.randn(1, 5, separate["to_q"].in_features, dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        assert bitwise_equal(attention.to_k(x), separate["to_k"](x))
        assert bitwise_equal(attention.to_q(other), separate["to_q"](other))  # another tensor: computed again
        assert attention.packed_qkv._held_input is other
        assert bitwise_equal(attention.to_v(other), separate["to_v"](other))
        assert bitwise_equal(attention.to_k(other), separate["to_k"](other))
    assert attention.packed_qkv._held_input is None and attention.packed_qkv._held_output is None


def test_a_triple_with_a_linear_kept_in_bf16_stays_unpacked(hf_home):
    transformer = quantized_transformer(hf_home, keep=DEFAULT_FP8_KEEP_BF16 + ("attn.to_k",))
    want = one_pass(transformer)
    assert pack_projections(transformer) == len(transformer.transformer_blocks)  # the text streams' only
    attention = transformer.transformer_blocks[0].attn
    assert type(attention.to_q) is Fp8Linear and type(attention.to_k) is torch.nn.Linear
    assert isinstance(attention.add_k_proj, ProjectionView) and not hasattr(attention, "packed_qkv")
    assert bitwise_equal(one_pass(transformer), want)


def test_prepared_bytes_count_the_packed_linears_as_before(hf_home):
    transformer = quantized_transformer(hf_home)
    touched = ("attn.to_q", "attn.add_v_proj", "img_mlp.net.0.proj")
    whole, some = prepared_bytes(transformer, DEFAULT_FP8_KEEP_BF16), \
        prepared_bytes(transformer, DEFAULT_FP8_KEEP_BF16, only=touched)
    pack_projections(transformer)
    assert prepared_bytes(transformer, DEFAULT_FP8_KEEP_BF16) == whole
    assert prepared_bytes(transformer, DEFAULT_FP8_KEEP_BF16, only=touched) == some
    assert sum(p.numel() * p.element_size() for p in transformer.parameters()) == whole


# -- The worker: jobs, LoRA sets and the held-ready Lightning set, packed against unpacked --------------


def jobs(worker, lora_dir) -> list[np.ndarray]:
    """Base, a custom LoRA unfused (branches) and then fused (LORA_FUSE_AFTER=2), the held-ready
    Lightning 4 set, Lightning 8 (branches), the base again, and a decomposition."""
    custom = {"source": str(lora_dir / "tiny_lora_diffusers.safetensors"), "scale": 0.8}
    outs = [edit_hat(worker, "packed"), edit_hat(worker, "packed", loras=[custom]),
            edit_hat(worker, "packed", loras=[custom]),
            edit_hat(worker, "packed", lightning=4, num_inference_steps=None),
            edit_hat(worker, "packed", lightning=8, num_inference_steps=None), edit_hat(worker, "packed")]
    assert outs[1]["timings_ms"]["lora"] >= 0 and outs[2]["timings_ms"]["lora"] > 0
    job = {key: value for key, value in FAST.items() if key not in ("width", "height")}
    decomposed = worker.handle({"id": "packed", "input": {**job, "image_base64": png_b64(sample_image()),
                                                          "prompt": "layers", "operation": "decompose", "layers": 2,
                                                          "seed": 3, "return_base64": True}})
    assert "error" not in decomposed, decomposed
    layers = [np.asarray(image_from_b64(layer["base64"])).astype(int) for layer in decomposed["layers"]]
    return [edited_pixels(out) for out in outs] + layers


@pytest.fixture(scope="module")
def fp8_env(worker_env) -> dict[str, str]:
    return {**worker_env, "QUANTIZE": "fp8", "PRELOAD": "edit,layered,lightning", "LORA_FUSE_AFTER": "2",
            "WARMUP": "false"}


@pytest.fixture(scope="module")
def unpacked_pixels(fp8_env, lora_dir) -> list[np.ndarray]:
    return jobs(start_worker(Settings.from_env(fp8_env)), lora_dir)


@pytest.mark.parametrize("plan, held", [({}, "host"), ({"GPU_MEMORY_GIB": "400"}, "device")],
                         ids=["held_in_cpu_memory", "held_on_the_device"])
def test_packed_worker_gives_the_unpacked_workers_pixels_and_keeps_its_base_exact(fp8_env, lora_dir, unpacked_pixels,
                                                                                  plan, held):
    worker = start_worker(Settings.from_env({**fp8_env, "FP8_PACK_QKV": "on", **plan}))
    transformer = worker.host.edit.transformer
    assert sum(isinstance(m, PackedFp8Linear) for m in transformer.modules()) == 2 * len(transformer.transformer_blocks)
    assert any(isinstance(m, PackedFp8Linear) for m in worker.host.layered().transformer.modules())
    assert worker.host.loras.resident.where == held
    base = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    got = jobs(worker, lora_dir)
    assert len(got) == len(unpacked_pixels)
    for index, (a, b) in enumerate(zip(got, unpacked_pixels)):
        assert np.array_equal(a, b), index
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[0], got[3])  # the LoRAs did change them
    after = transformer.state_dict()
    assert all(bitwise_equal(after[k], base[k]) for k in base)


def test_fp8_pack_qkv_is_read_and_checked(worker_env):
    from src.plumbing.config import ConfigError

    assert Settings.from_env(worker_env).fp8_pack_qkv is False
    assert Settings.from_env({**worker_env, "FP8_PACK_QKV": "on"}).fp8_pack_qkv is True
    with pytest.raises(ConfigError, match="FP8_PACK_QKV"):
        Settings.from_env({**worker_env, "FP8_PACK_QKV": "yes"})
