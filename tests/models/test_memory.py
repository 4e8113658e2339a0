"""Memory modes (src/models/memory/modes.py): the choice (src/models/memory/plan.py), and the same images from
every mode. On the CPU the streamed modes run diffusers' group-offloading hooks with
the CPU as both homes: the hooks move nothing, but every module runs through them."""

from __future__ import annotations

import pytest
import torch

from src.models.fp8 import linear as fp8
from src.models.memory import modes as memory
from src.models.memory import plan as memory_plan
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import FAST, image_from_b64, png_b64, sample_image

GIB = memory.GIB
# The full-size models' bf16 bytes (tools/bench.py builds them from the published configs).
TRANSFORMER, TEXT_ENCODER, VAE = int(38.1 * GIB), int(15.4 * GIB), int(0.24 * GIB)
# The edit transformer under QUANTIZE=fp8, measured on the H100 bench with every block
# linear in FP8 (FP8_KEEP_BF16=none).
FP8_ALL_LINEARS_GIB = 19.1


@pytest.fixture(scope="module")
def full_size_transformer():
    """The edit transformer at its published size, on the meta device: shapes, no memory."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(zero_cond_t=True).to(torch.bfloat16)


def test_fp8_prepared_bytes_match_the_measured_transformer(full_size_transformer):
    assert fp8.prepared_bytes(full_size_transformer, keep=()) / GIB == pytest.approx(FP8_ALL_LINEARS_GIB, abs=0.1)
    # The modulation linears kept in bf16 are a third of the blocks' weights; the default
    # (SGLang's recipe) keeps the image MLP's down-projection too.
    kept = fp8.prepared_bytes(full_size_transformer, keep=fp8.MODULATION_LINEARS) / GIB
    assert kept == pytest.approx(FP8_ALL_LINEARS_GIB + 6.3, abs=0.1)
    default = fp8.prepared_bytes(full_size_transformer, keep=fp8.DEFAULT_FP8_KEEP_BF16) / GIB
    assert default == pytest.approx(FP8_ALL_LINEARS_GIB + 8.4, abs=0.1)


# (card, GiB the worker sees, FP8_KEEP_BF16 or None for bf16) -> (mode, transformers swapped)
@pytest.mark.parametrize("card, capacity_gib, keep_bf16, mode, swap", [
    ("H100 80 GB", 79.1, None, "resident", True),  # both bf16 transformers do not fit: they swap
    # FP8's default (27.5 GiB a transformer): both with the text encoder leave too little for
    # the largest jobs, so the transformers swap; with the modulation alone kept (25.4 GiB)
    # both pipelines stay resident.
    ("H100 80 GB", 79.1, fp8.DEFAULT_FP8_KEEP_BF16, "resident", True),
    ("H100 80 GB", 79.1, fp8.MODULATION_LINEARS, "resident", False),
    ("L40S 48 GB", 44.5, None, "text_offload", True),
    ("L40S 48 GB", 44.5, fp8.DEFAULT_FP8_KEEP_BF16, "text_offload", True),  # FP8's default: 27.5 GiB
    ("L40S 48 GB", 44.5, fp8.MODULATION_LINEARS, "text_offload", True),  # 25.4 GiB
    # FP8_KEEP_BF16=none: 19.1 GiB. Resident would leave 8.5 GiB, too little for 10 layers at
    # 1024; streaming the text encoder serves every job.
    ("L40S 48 GB", 44.5, (), "text_offload", True),
    ("A100 40 GB", 38.9, None, "offload", False),
    ("RTX 4090 24 GB", 23.1, None, "offload", False),
])
def test_auto_picks_the_fastest_arrangement_that_serves_every_job(full_size_transformer, card, capacity_gib,
                                                                  keep_bf16, mode, swap):
    transformer = TRANSFORMER if keep_bf16 is None else fp8.prepared_bytes(full_size_transformer, keep=keep_bf16)
    arrangement = memory_plan.configure(
        int(capacity_gib * GIB), memory_plan.WeightBytes(TEXT_ENCODER, transformer, VAE),
        "none" if keep_bf16 is None else "fp8", gpu=card)
    assert (arrangement.mode, arrangement.swap) == (mode, swap), card
    assert arrangement.plan.fits(memory_plan.LARGEST_EDIT)


def test_fp8_on_a_card_too_small_to_hold_its_transformer_fails_the_start(full_size_transformer):
    arrangement = memory_plan.configure(int(23.1 * GIB), memory_plan.WeightBytes(
        TEXT_ENCODER, fp8.prepared_bytes(full_size_transformer, keep=()), VAE), "fp8")
    assert arrangement.mode == "offload"  # which ModelHost.arrange_memory refuses with one line


def test_a_forced_mode_is_kept_whatever_the_memory():
    weights = memory_plan.WeightBytes(TEXT_ENCODER, TRANSFORMER, VAE)
    assert memory_plan.configure(GIB, weights, "none", mode_setting="resident").mode == "resident"
    assert memory_plan.configure(1000 * GIB, weights, "none", mode_setting="offload").mode == "offload"
    assert memory_plan.configure(1000 * GIB, weights, "none", swap_setting="always").swap is True


@pytest.fixture(scope="module", params=["text_offload", "offload"])
def streamed_worker(request, worker_env):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    worker = start_worker(Settings.from_env({**worker_env, "MEMORY_MODE": request.param, "PRELOAD": "edit,layered"}))
    assert worker.host.memory_mode == request.param
    streamed = {"text_encoder": True, "vae": False, "transformer": request.param == "offload"}
    for pipeline in (worker.host.edit, worker.host.layered()):
        assert {name: _is_group_offload_enabled(getattr(pipeline, name)) for name in streamed} == streamed
    return worker


def job(**extra) -> dict:
    return {"image_base64": png_b64(sample_image()), "prompt": "a red hat", "seed": 11, "return_base64": True,
            **FAST, **extra}


def images_of(out: dict) -> list[bytes]:
    assert "error" not in out, out
    return [image_from_b64(entry["base64"]).tobytes() for entry in out["images"]]


def test_streamed_modes_give_the_resident_images(worker, streamed_worker):
    edit = job(operation="edit", true_cfg_scale=4.0)
    assert images_of(streamed_worker.handle({"id": "m1", "input": edit})) == \
        images_of(worker.handle({"id": "r1", "input": edit}))
    decompose = job(operation="decompose", layers=2, resolution=640, num_inference_steps=2)
    for key in ("width", "height"):
        decompose.pop(key)
    assert images_of(streamed_worker.handle({"id": "m2", "input": decompose})) == \
        images_of(worker.handle({"id": "r2", "input": decompose}))


def test_loras_run_only_where_the_transformer_is_resident(worker, streamed_worker):
    lightning = job(operation="edit", lightning=4)
    del lightning["num_inference_steps"]  # the preset sets it
    out = streamed_worker.handle({"id": "m3", "input": lightning})
    if streamed_worker.host.memory_mode == "offload":
        assert out["error"] == ("lightning: LoRAs fuse into the transformer's weights on the GPU, and this "
                                "worker streams them from CPU memory (MEMORY_MODE offload); use a GPU that "
                                "holds the transformer (resident or text_offload)")
    else:
        assert images_of(out) == images_of(worker.handle({"id": "r3", "input": lightning}))


def test_weights_gathered_into_one_block_keep_their_values(worker):
    """The streamed modes page-lock each streamed module as one block of its exact size
    (`memory.pin_exactly`, measured on the GPU by tools/bench.py); the gathering is plain torch."""
    import copy

    encoder = copy.deepcopy(worker.host.edit.text_encoder)
    tensors = list(dict.fromkeys([*encoder.parameters(), *encoder.buffers()]))
    before = [tensor.detach().clone() for tensor in tensors]
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = encoder(input_ids=ids).logits

    block = memory.gather_into_one_block(encoder).block

    assert block.nbytes >= sum(tensor.nbytes for tensor in tensors) > 0
    for tensor, value in zip(tensors, before):
        assert tensor.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        assert torch.equal(tensor, value)
    assert torch.equal(encoder(input_ids=ids).logits, expected)


def test_the_plan_counts_the_padded_lora_branches(full_size_transformer):
    """COMPILE=true allocates the LoRA branches after the plan is made: it must leave them room."""
    from src.models.lora import branches as lora_branches

    branches = lora_branches.padded_bytes(full_size_transformer, 64, torch.bfloat16)
    assert 1.0 * GIB < branches < 1.2 * GIB  # the H200 bench's 1.1 GiB
    plain = memory_plan.WeightBytes(TEXT_ENCODER, TRANSFORMER, VAE)
    compiled = memory_plan.WeightBytes(TEXT_ENCODER, TRANSFORMER, VAE, lora_branches=branches)
    for mode in ("resident", "text_offload"):
        assert compiled.resident(mode, False) - plain.resident(mode, False) == branches
    assert compiled.resident("offload", False) == plain.resident("offload", False)  # no LoRAs there
