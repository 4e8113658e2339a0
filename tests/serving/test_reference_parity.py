"""Reference parity: where the pinned diffusers departs from how the models' authors run
the models (docs/upstream-register.md), the worker follows the authors. Each test here
fails on a worker that calls diffusers with its defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import (AUTHORS_GREEN, FAST, direct_edit, image_from_b64, on_matte, png_b64, same_pixels,
                            sample_image)

IMAGE_TOKEN = 151655  # <|image_pad|> in Qwen2.5-VL's vocabulary


def run(worker, **job_input) -> dict:
    out = worker.handle({"id": "parity", "input": job_input})
    assert "error" not in out, out
    return out


class TextEncoderCalls:
    """What the Qwen2.5-VL language model receives, call by call: the token ids given to
    the text encoder and the rope positions it computed from them."""

    def __init__(self, text_encoder):
        self.calls: list[dict] = []
        self.handles = [
            text_encoder.register_forward_pre_hook(self._encoder_called, with_kwargs=True),
            text_encoder.model.language_model.register_forward_pre_hook(self._language_model_called,
                                                                        with_kwargs=True),
        ]

    def _encoder_called(self, module, args, kwargs):
        self.calls.append({"input_ids": kwargs.get("input_ids")})

    def _language_model_called(self, module, args, kwargs):
        if self.calls and "position_ids" not in self.calls[-1]:
            self.calls[-1]["position_ids"] = kwargs.get("position_ids")

    def close(self):
        for handle in self.handles:
            handle.remove()


def image_token_positions(call: dict) -> torch.Tensor:
    """The (t, h, w) rope positions of the image tokens of the first sequence: (3, n)."""
    positions = call["position_ids"]
    assert positions is not None, "the language model got no positions: it falls back to sequential ones"
    image_tokens = call["input_ids"][0] == IMAGE_TOKEN
    assert image_tokens.any()
    return positions[-3:, 0, image_tokens]  # the last three rows are (t, h, w) whatever the layout


def test_both_prompts_of_a_cfg_edit_see_the_image_at_its_3d_positions(worker):
    """diffusers #14194: the text encoder must get the image tokens' (t, h, w) positions,
    not the sequential ones it falls back to without mm_token_type_ids."""
    calls = TextEncoderCalls(worker.host.edit.text_encoder)
    try:
        run(worker, image_base64=png_b64(sample_image()), prompt="a red hat", negative_prompt="blurry",
            true_cfg_scale=4.0, seed=2, **FAST)
    finally:
        calls.close()
    assert len(calls.calls) == 2  # the prompt and the negative prompt, each with the image
    for call in calls.calls:
        t, h, w = image_token_positions(call)
        # A grid of merged patches: one temporal index, rows and columns that differ.
        assert torch.all(t == t[0]) and not torch.equal(h, w)
        assert h.unique().numel() > 1 and w.unique().numel() > 1


def test_prompt_embeddings_equal_the_text_encoder_called_with_the_processors_whole_output(worker):
    pipeline = worker.host.edit
    image = sample_image((384, 384))
    embeds, _ = pipeline.encode_prompt("a red hat", image=[image], device=torch.device("cpu"))

    text = pipeline.prompt_template_encode.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>a red hat")
    inputs = pipeline.processor(text=[text], images=[image], padding=True, return_tensors="pt")
    assert "mm_token_type_ids" in inputs  # what diffusers 0.42.1 leaves out
    with torch.no_grad():
        hidden = pipeline.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]
    expected = hidden[0, pipeline.prompt_template_encode_start_idx:]
    assert torch.equal(embeds[0], expected)


def test_captioning_sees_the_image_at_its_3d_positions(worker):
    """An empty decompose prompt is captioned by `generate` with the processor's whole
    output: checked here, not fixed (it was right already)."""
    calls = TextEncoderCalls(worker.host.layered().text_encoder)
    try:
        run(worker, operation="decompose", image_base64=png_b64(sample_image()), prompt="", layers=2,
            num_inference_steps=2, seed=4)
    finally:
        calls.close()
    first = calls.calls[0]  # generate's prefill, image included
    t, h, w = image_token_positions(first)
    assert not torch.equal(h, w)


def decompose_directly(pipeline, image: Image.Image, seed: int, **settings) -> list[Image.Image]:
    return pipeline(image=image.convert("RGBA"), prompt="a scene", negative_prompt=" ", true_cfg_scale=4.0,
                    guidance_scale=1.0, layers=2, resolution=640, num_inference_steps=2,
                    generator=torch.Generator("cpu").manual_seed(seed), **settings).images[0]


def test_decompose_runs_with_the_authors_cfg_normalization(worker):
    """Qwen-Image-Layered's README and demo app call the pipeline with cfg_normalize=True
    and use_en_prompt=True; diffusers' default is cfg_normalize=False."""
    source = sample_image()
    job = dict(operation="decompose", image_base64=png_b64(source), prompt="a scene", layers=2,
               num_inference_steps=2, seed=6, return_base64=True)
    out = run(worker, **job)
    assert out["cfg_normalize"] is True
    got = [image_from_b64(entry["base64"]) for entry in out["layers"]]
    authors = decompose_directly(worker.host.layered(), source, 6, cfg_normalize=True, use_en_prompt=True)
    assert all(same_pixels(a, b) for a, b in zip(got, authors))
    # The setting changes these layers: diffusers' default gives others, which a job can still ask for.
    plain = decompose_directly(worker.host.layered(), source, 6)
    assert not all(same_pixels(a, b) for a, b in zip(got, plain))
    out = run(worker, **job, cfg_normalize=False)
    assert out["cfg_normalize"] is False
    assert all(same_pixels(image_from_b64(entry["base64"]), b) for entry, b in zip(out["layers"], plain))


def with_hidden_rgb(image: Image.Image, hidden: np.ndarray) -> Image.Image:
    """`image` (RGBA) with `hidden` as the RGB of its fully transparent pixels."""
    pixels = np.array(image)
    transparent = pixels[..., 3] == 0
    pixels[transparent, :3] = hidden[transparent]
    return Image.fromarray(pixels, "RGBA")


def test_what_lies_under_transparent_pixels_does_not_reach_the_model(worker):
    source = sample_image(mode="RGBA")
    noise = np.random.default_rng(0).integers(0, 256, size=(source.height, source.width, 3), dtype=np.uint8)
    noisy, zeroed = with_hidden_rgb(source, noise), with_hidden_rgb(source, np.zeros_like(noise))
    assert noisy.tobytes() != zeroed.tobytes()
    job = dict(prompt="x", seed=9, return_base64=True, **FAST)
    from_noisy = run(worker, image_base64=png_b64(noisy), **job)
    from_zeroed = run(worker, image_base64=png_b64(zeroed), **job)
    assert from_noisy["edited_image_base64"] == from_zeroed["edited_image_base64"]
    assert from_noisy["matte"] == "#1ed760"


def test_a_jobs_matte_replaces_the_authors_green(worker):
    source = sample_image(mode="RGBA")
    out = run(worker, image_base64=png_b64(source), prompt="x", seed=9, matte="#FF8000", return_base64=True, **FAST)
    assert out["matte"] == "#ff8000"
    expected = direct_edit(worker.host.edit, [on_matte(source, (255, 128, 0))], "x", 9, num_inference_steps=2,
                           width=256, height=256)
    assert same_pixels(image_from_b64(out["edited_image_base64"]).convert("RGB"), expected)
    on_green = direct_edit(worker.host.edit, [on_matte(source, AUTHORS_GREEN)], "x", 9, num_inference_steps=2,
                           width=256, height=256)
    assert not same_pixels(expected, on_green)


def test_an_opaque_edit_reports_no_matte(worker):
    assert "matte" not in run(worker, image_base64=png_b64(sample_image()), prompt="x", seed=1, **FAST)


@pytest.mark.parametrize("job_input, error", [
    ({"matte": "green"}, "matte: a colour as '#rrggbb' (hex digits), e.g. '#ffffff'; got 'green'"),
    ({"matte": "#12345"}, "matte: a colour as '#rrggbb' (hex digits), e.g. '#ffffff'; got '#12345'"),
    ({"operation": "decompose", "matte": "#ffffff"},
     "matte: only used when RGBA images go to the edit model: edit, edit_multi, or decompose with edits"),
    ({"cfg_normalize": False}, "cfg_normalize: only used by decompose"),
])
def test_bad_matte_and_cfg_normalize_are_refused_with_the_key(worker, job_input, error):
    out = worker.handle({"id": "bad", "input": {"image_base64": png_b64(sample_image()), "prompt": "x", **job_input}})
    assert out == {"error": error}


LONG_TEXT = "\U0001F600" * 2000  # 4 UTF-8 bytes each: 8000 byte tokens for the tiny models' tokenizer


@pytest.mark.parametrize("job_input, key", [
    ({"prompt": LONG_TEXT}, "prompt"),
    ({"operation": "decompose", "edits": [{"layer": 0, "prompt": "x", "negative_prompt": LONG_TEXT}]},
     "edits[0].negative_prompt"),
])
def test_an_edit_prompt_past_the_models_text_positions_is_refused_before_the_gpu(worker, job_input, key):
    """The edit pipeline never truncates; past the transformer's text rope positions it
    fails inside the model (register row 16)."""
    progress = []
    out = worker.handle({"id": "long", "input": {"image_base64": png_b64(sample_image()), "prompt": "x",
                                                 **job_input}}, progress.append)
    assert out == {"error": f"{key}: 8000 tokens; at most 3000 (the edit model's text positions); shorten it"}
    assert progress == []
    assert run(worker, image_base64=png_b64(sample_image()), prompt="x", seed=1, **FAST)["success"]
