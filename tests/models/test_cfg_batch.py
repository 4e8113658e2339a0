"""CFG_BATCH (src/models/cfg_batch.py): true CFG's two passes of a step as one batch of two,
against diffusers' edit pipeline called directly (float32 on the CPU, tiny models).

Each half is its own pass up to rounding: the tests hold the batched output to within
float32 rounding of stock, and check that the transformer's blocks really ran one batch of
two per step (the text padded under a mask where the prompts' lengths differ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.models.cfg_batch import cfg_batched
from src.models.files.snapshots import main_snapshot
from src.plumbing.config import Settings
from src.serving.startup import start_worker
from tests.conftest import FAST, image_from_b64, png_b64, reference_edit_pipeline, same_pixels, sample_image

# float32 rounding of a pass run in another batch with a masked attention sum: the decoded
# image in [0, 1] moves by about 1e-6 on the tiny models.
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def pipeline(hf_home):
    path = main_snapshot(hf_home, "Qwen/Qwen-Image-Edit-2511")
    return reference_edit_pipeline(path)


class BlockCalls:
    """(batch, text tokens, unmasked text tokens or None) of each call of the first block."""

    def __init__(self, pipeline):
        self.calls: list[tuple] = []
        self.handle = pipeline.transformer.transformer_blocks[0].register_forward_pre_hook(self.hook,
                                                                                          with_kwargs=True)

    def hook(self, module, args, kwargs):
        mask = kwargs.get("encoder_hidden_states_mask")
        self.calls.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"].shape[1],
                           None if mask is None else int(mask.sum())))


def edit(pipeline, prompt: str, batched: bool, true_cfg_scale: float = 4.0) -> tuple[np.ndarray, list]:
    blocks = BlockCalls(pipeline)
    try:
        with cfg_batched(pipeline, batched):
            image = pipeline(image=[sample_image()], prompt=prompt, negative_prompt=" ", true_cfg_scale=true_cfg_scale,
                             num_inference_steps=3, width=256, height=256, output_type="np",
                             generator=torch.Generator("cpu").manual_seed(11)).images
    finally:
        blocks.handle.remove()
    return image, blocks.calls


def test_each_step_runs_one_batch_of_two_within_rounding_of_stock(pipeline):
    stock, stock_calls = edit(pipeline, "a red hat on the left", batched=False)
    batched, batched_calls = edit(pipeline, "a red hat on the left", batched=True)
    # Stock: two passes a step, the prompt's text longer than the negative prompt's.
    (_, long, _), (_, short, _) = stock_calls[:2]
    assert len(stock_calls) == 6 and long > short
    # Batched: one pass a step, both texts padded to the longer, the padding masked.
    assert batched_calls == [(2, long, long + short)] * 3
    assert np.abs(batched - stock).max() < ROUNDING
    assert "forward" not in pipeline.transformer.__dict__ and "encode_prompt" not in pipeline.__dict__


def test_texts_of_one_length_run_unmasked(pipeline):
    stock, _ = edit(pipeline, " ", batched=False)  # the prompt is the negative prompt
    batched, calls = edit(pipeline, " ", batched=True)
    assert [(batch, mask) for batch, _, mask in calls] == [(2, None)] * 3
    assert np.abs(batched - stock).max() < ROUNDING


def test_without_true_cfg_the_pipeline_runs_as_it_would(pipeline):
    stock, _ = edit(pipeline, "a red hat", batched=False, true_cfg_scale=1.0)
    batched, calls = edit(pipeline, "a red hat", batched=True, true_cfg_scale=1.0)
    assert [batch for batch, _, _ in calls] == [1] * 3
    assert np.array_equal(batched, stock)


def test_the_setting_is_off_by_default():
    assert Settings.from_env({}).cfg_batch is False
    assert Settings.from_env({"CFG_BATCH": "true"}).cfg_batch is True


def test_a_worker_with_cfg_batch_serves_the_stock_images(worker_env, worker):
    batched_worker = start_worker(Settings.from_env({**worker_env, "CFG_BATCH": "true"}))
    job = {"image_base64": png_b64(sample_image()), "prompt": ["a red hat", "a blue scarf on the right"],
           "num_images": 2, "seed": 5, "return_base64": True, **FAST}
    blocks = BlockCalls(batched_worker.host.edit)
    got = batched_worker.handle({"id": "cfg-batch", "input": job})
    blocks.handle.remove()
    want = worker.handle({"id": "stock", "input": job})
    assert "error" not in got, got
    assert [batch for batch, _, _ in blocks.calls] == [2] * (4 * FAST["num_inference_steps"])
    assert len(got["images"]) == len(want["images"]) == 4
    for a, b in zip(got["images"], want["images"]):
        a, b = image_from_b64(a["base64"]), image_from_b64(b["base64"])
        # 8-bit images: float32 rounding can move a value across a level's boundary.
        difference = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
        assert same_pixels(a, b) or (difference.max() <= 1 and difference.mean() < 1e-3)
