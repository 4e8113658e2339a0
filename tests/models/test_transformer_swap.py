"""The transformer swap (src/models/memory/transformer_swap.py) on the tiny models: with
TRANSFORMER_SWAP=always the CPU worker moves its transformers exactly as a GPU worker does
(pointed at their CPU copy to leave, copied in from it to come back), so alternating edits
and decompositions give the images of a worker that never swaps, the warm-up moves one
transformer at most, and nothing is ever copied back into a transformer's CPU copy."""

from __future__ import annotations

import warnings

import pytest
import torch

from src.models.fp8 import linear as fp8
from src.models.memory.transformer_swap import HOST_MARGIN_BYTES, host_room_for_twins
from src.plumbing.config import DEFAULT_FP8_KEEP_BF16, Settings
from src.serving.worker import Worker
from src.serving.startup import start_worker
from tests.conftest import FAST, image_from_b64, png_b64, sample_image

CUSTOM = "tiny_lora_diffusers.safetensors"


def started(worker_env, swap: str) -> Worker:
    # A set fuses on its first job: a fused set is a change of weights the swap must not carry off.
    # The start log is clean: the warm-up's NaN warnings (one step: 0/0 in the scheduler, NaN cast
    # to uint8) would fail this start.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,layered", "TRANSFORMER_SWAP": swap,
                                               "LORA_FUSE_AFTER": "1"}))


@pytest.fixture(scope="module")
def swapping_worker(worker_env):
    return started(worker_env, "always")


@pytest.fixture(scope="module")
def still_worker(worker_env):
    return started(worker_env, "never")


def job(operation: str, **extra) -> dict:
    if operation == "decompose":
        return {"operation": "decompose", "image_base64": png_b64(sample_image()), "prompt": "a scene", "seed": 3,
                "layers": 2, "resolution": 640, "num_inference_steps": 2, "return_base64": True, **extra}
    return {"image_base64": png_b64(sample_image()), "prompt": "a red hat", "seed": 11, "return_base64": True,
            **FAST, **extra}


def images_of(out: dict) -> list[bytes]:
    assert "error" not in out, out
    return [image_from_b64(entry["base64"]).tobytes() for entry in out["images"]]


def points_into(parameters, block: torch.Tensor) -> bool:
    storage = block.untyped_storage().data_ptr()
    return all(p.untyped_storage().data_ptr() == storage for p in parameters)


def test_the_warm_up_moves_one_transformer_and_ends_with_the_edit_one_in_place(swapping_worker):
    host = swapping_worker.host
    assert host.swap_transformers and host.swap.use_twins
    assert host.swap.moves_in == 1  # Layered warmed where it was loaded, then the edit transformer in
    assert host.transformer_on_device == "edit" and not host.needs_loading("edit")
    layered_twin = host.swap.twin_of(host.layered().transformer)
    assert points_into(host.layered().transformer.parameters(), layered_twin.host.block)


def test_alternating_jobs_give_the_images_of_a_worker_that_never_swaps(swapping_worker, still_worker, lora_dir):
    host = swapping_worker.host
    edit_transformer, layered_transformer = host.edit.transformer, host.layered().transformer
    edit_twin, layered_twin = host.swap.twin_of(edit_transformer), host.swap.twin_of(layered_transformer)
    copies = {id(twin): twin.host.block.clone() for twin in (edit_twin, layered_twin)}
    lora = {"source": str(lora_dir / CUSTOM), "scale": 0.8}
    jobs = [job("edit", loras=[lora]), job("decompose"), job("edit"), job("decompose"), job("edit", loras=[lora]),
            job("edit")]
    moves = host.swap.moves_in
    for number, payload in enumerate(jobs):
        out = swapping_worker.handle({"id": f"s{number}", "input": payload})
        assert images_of(out) == images_of(still_worker.handle({"id": f"r{number}", "input": payload})), number
        decompose = payload.get("operation") == "decompose"
        idle, twin = (edit_transformer, edit_twin) if decompose else (layered_transformer, layered_twin)
        assert points_into(idle.parameters(), twin.host.block), number  # left by pointing, not copied
        assert not points_into((edit_transformer if not decompose else layered_transformer).parameters(),
                               twin.host.block)
        if number:  # (the first job reports the start's load)
            assert ("load" in out["timings_ms"]) == (number in (1, 2, 3, 4))  # the jobs that changed operation
    assert host.swap.moves_in == moves + 4
    assert host.loras.mode == "base"
    for twin in (edit_twin, layered_twin):  # the fused set never reached a CPU copy
        assert torch.equal(twin.host.block, copies[id(twin)])


def test_the_copies_need_both_transformers_beside_the_margin():
    transformer = 41 * 10**9
    assert host_room_for_twins(2 * transformer, 2 * transformer + HOST_MARGIN_BYTES)
    assert not host_room_for_twins(2 * transformer, 2 * transformer + HOST_MARGIN_BYTES - 1)
    assert not host_room_for_twins(2 * transformer, 128 * 10**9, other_bytes=54 * 10**9)  # a Lightning set too
    assert host_room_for_twins(2 * transformer, None)  # unknown (off Linux): tried, as the pin then says


def test_the_cpu_memory_figures_in_the_docs():
    """docs/performance.md's table of CPU memory per card: the published transformer's bytes,
    twice, and the Lightning set's touched linears, fused and base."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(zero_cond_t=True).to(torch.bfloat16)
    touched = tuple(name for name in fp8.BLOCK_LINEARS if name not in fp8.MODULATION_LINEARS)
    gb = 1e9
    assert 2 * fp8.prepared_bytes(transformer, fp8.BLOCK_LINEARS) / gb == pytest.approx(81.7, abs=0.1)
    assert 2 * fp8.prepared_bytes(transformer, fp8.BLOCK_LINEARS, only=touched) / gb == pytest.approx(54.4, abs=0.1)
    keep = DEFAULT_FP8_KEEP_BF16
    assert 2 * fp8.prepared_bytes(transformer, keep) / gb == pytest.approx(59.1, abs=0.1)
    assert 2 * fp8.prepared_bytes(transformer, keep, only=touched) / gb == pytest.approx(31.7, abs=0.1)
