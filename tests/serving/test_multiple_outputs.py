"""Several results per job: `num_images` and prompt lists, each result equal to the
single-image job with its prompt and seed, with the shared encodings done once."""

from __future__ import annotations

import dataclasses

import pytest

from src.serving.worker import Worker
from tests.conftest import FAST, fetch, image_from_b64, png_b64, same_pixels, sample_image


def run(worker: Worker, **job_input) -> dict:
    updates: list[dict] = []
    output = worker.handle({"id": "multi", "input": job_input}, progress=updates.append)
    output["_progress"] = updates
    return output


def pixels_of(entry: dict):
    return fetch(entry["url"]).convert("RGB")


class CallCounter:
    """Counts forward calls of a real module (a hook, not a stand-in)."""

    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def test_num_images_and_prompt_lists_equal_single_jobs_with_consecutive_seeds(worker):
    source = png_b64(sample_image())
    prompts = ["make it blue", "add a red hat"]
    out = run(worker, image_base64=source, prompt=prompts, num_images=2, seed=41, **FAST)
    assert out["success"] is True and out["seed"] == 41
    entries = out["images"]
    assert [(e["name"], e["prompt_index"], e["seed"]) for e in entries] == [
        ("output_0", 0, 41), ("output_1", 0, 42), ("output_2", 1, 43), ("output_3", 1, 44)]
    # The compatibility fields describe the first image.
    assert out["output_url"] == entries[0]["url"] and out["r2_key"] == entries[0]["key"]
    assert out["image_size"] == [entries[0]["width"], entries[0]["height"]]
    results = [pixels_of(entry) for entry in entries]
    for entry, result in zip(entries, results):
        single = run(worker, image_base64=source, prompt=prompts[entry["prompt_index"]], seed=entry["seed"], **FAST)
        assert single["images"][0]["seed"] == entry["seed"] and single["images"][0]["prompt_index"] == 0
        assert same_pixels(result, pixels_of(single["images"][0])), entry["name"]
    assert not same_pixels(results[0], results[1])  # another seed, another image
    # Progress names the image of how many; each image reports its own steps.
    images_seen = sorted({(u["image"], u["images"]) for u in out["_progress"]})
    assert images_seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert out["_progress"][-1] == {"step": 2, "of": 2, "image": 4, "images": 4}


def test_shared_encodings_run_once_per_prompt_and_once_per_reference(worker):
    """Two prompts x two images with true CFG: 2 prompt encodings and 1 negative, not 8;
    one VAE encode per reference image, not one per result."""
    pipeline = worker.host.edit
    text = CallCounter(pipeline.text_encoder)
    vae = CallCounter(pipeline.vae.encoder)
    try:
        out = run(worker, operation="edit_multi", image_base64=png_b64(sample_image()),
                  images_base64=[png_b64(sample_image(seed=1))], prompt=["a", "b"], num_images=2, seed=5,
                  true_cfg_scale=4.0, **FAST)
    finally:
        text.remove()
        vae.remove()
    assert out["success"] is True and len(out["images"]) == 4
    assert text.calls == 3
    assert vae.calls == 2  # two reference images, encoded once each
    # The pipeline's own methods are back: the next job encodes afresh.
    assert "encode_prompt" not in vars(pipeline) and "_encode_vae_image" not in vars(pipeline)


def test_edit_multi_with_several_prompts_equals_single_jobs(worker):
    images = [png_b64(sample_image()), png_b64(sample_image(size=(64, 96), seed=2))]
    job = dict(operation="edit_multi", image_base64=images[0], images_base64=images[1:], return_base64=True,
               **FAST)
    out = run(worker, prompt=["put them together", "side by side"], seed=2**32 - 1, **job)
    # Seeds wrap within the schema's range, to a seed a single job can ask for.
    assert [e["seed"] for e in out["images"]] == [2**32 - 1, 0]
    for entry in out["images"]:
        single = run(worker, prompt=["put them together", "side by side"][entry["prompt_index"]],
                     seed=entry["seed"], **job)
        assert same_pixels(image_from_b64(entry["base64"]), image_from_b64(single["edited_image_base64"]))
    assert out["edited_image_base64"] == out["images"][0]["base64"]


def test_a_single_prompt_keeps_the_single_result_shape(worker):
    out = run(worker, image_base64=png_b64(sample_image()), prompt="x", seed=3, **FAST)
    [entry] = out["images"]
    assert entry["name"] == "output" and entry["prompt_index"] == 0 and entry["seed"] == 3
    assert out["_progress"][-1] == {"step": 2, "of": 2}


def test_lightning_applies_to_every_result(worker):
    source = png_b64(sample_image())
    out = run(worker, image_base64=source, prompt="x", num_images=2, seed=8, lightning=4, width=256, height=256)
    assert out["success"] is True and out["lightning"]["steps"] == 4
    second = out["images"][1]
    single = run(worker, image_base64=source, prompt="x", seed=second["seed"], lightning=4, width=256, height=256)
    assert same_pixels(pixels_of(second), pixels_of(single["images"][0]))


def test_prompt_count_over_the_workers_limit_is_refused_before_any_work(worker):
    limited = Worker(settings=dataclasses.replace(worker.settings, max_prompts=2), host=worker.host,
                     price=worker.price, loras=worker.loras)
    out = run(limited, image_base64=png_b64(sample_image()), prompt=["a", "b", "c"], **FAST)
    assert out == {"error": "prompt: 3 prompts; this worker allows at most 2 per job (MAX_PROMPTS)", "_progress": []}
    assert run(limited, image_base64=png_b64(sample_image()), prompt=["a", "b"], **FAST)["success"] is True


@pytest.mark.parametrize("job, error", [
    ({"prompt": ["a", ""]}, "prompt[1]: required and non-empty for edit"),
    ({"prompt": []}, "prompt: a list of 0 prompts; give 1 to 32"),
    ({"prompt": "a", "num_images": 5}, "num_images: input should be less than or equal to 4; got 5"),
    ({"prompt": "a", "num_images": 0}, "num_images: input should be greater than or equal to 1; got 0"),
    ({"operation": "decompose", "prompt": ["a", "b"]}, "prompt: decompose takes one prompt (a string), not a list"),
    ({"operation": "decompose", "num_images": 2}, "num_images: not used by decompose (edit and edit_multi only)"),
])
def test_bad_counts_are_refused_naming_the_key(worker, job, error):
    assert run(worker, image_base64=png_b64(sample_image()), **job) == {"error": error, "_progress": []}


def test_inline_results_over_the_limit_fail_clearly_without_a_bucket(worker):
    no_bucket = Worker(settings=dataclasses.replace(worker.settings, bucket=None, max_inline_bytes=20_000),
                       host=worker.host, price=worker.price, loras=worker.loras)
    out = run(no_bucket, image_base64=png_b64(sample_image()), prompt="x", num_images=4, seed=1, **FAST)
    assert out["error"].startswith("output: ") and "do not fit in RunPod's result limit (20000 bytes" in out["error"]
