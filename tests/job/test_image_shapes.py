"""The image shapes each operation takes (schema.MAX_ASPECT_RATIO), found in the pipelines:
at the limit the tiny pipelines take an image, one past it they raise, and the worker
refuses it from the image's header, before any model runs, naming the key, the shape and
the limit (tests/hostile_inputs.py has such images too, each followed by a job served)."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from src.job.schema import MAX_ASPECT_RATIO
from tests.conftest import FAST, direct_edit, png_b64, reference_edit_pipeline

EDIT_LIMIT, DECOMPOSE_LIMIT = MAX_ASPECT_RATIO["edit"], MAX_ASPECT_RATIO["decompose"]
MAX_REFUSAL_S = 1.0
ONE_STEP = {**FAST, "num_inference_steps": 1}  # an image at 279:1 is encoded at about 1 MP, whatever the output


def shaped(ratio: int, tall: bool = True, short_side: int = 2, mode: str = "RGB") -> Image.Image:
    """A gradient whose sides stand `ratio` to 1."""
    size = (short_side, short_side * ratio) if tall else (short_side * ratio, short_side)
    return Image.linear_gradient("L").resize(size).convert(mode)


def run(worker, **job_input) -> dict:
    return worker.handle({"id": "shape", "input": {"prompt": "x", "seed": 1, **job_input}})


@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_edit_serves_images_at_the_limit(worker, tall):
    out = run(worker, image_base64=png_b64(shaped(EDIT_LIMIT, tall)), **ONE_STEP)
    assert out.get("success") is True, out
    assert out["image_size"] == [256, 256]


def test_edit_multi_serves_images_at_the_limit(worker):
    out = run(worker, operation="edit_multi", image_base64=png_b64(shaped(EDIT_LIMIT)),
              images_base64=[png_b64(shaped(EDIT_LIMIT, tall=False))], **ONE_STEP)
    assert out.get("success") is True, out


@pytest.mark.parametrize("job, expected", [
    ({"image_base64": png_b64(shaped(EDIT_LIMIT + 1))},
     "image_base64: image is 2x560, 280.0:1 between its sides; edit takes at most 279:1"),
    ({"image_base64": png_b64(Image.new("RGB", (1, 1000)))},  # the example
     "image_base64: image is 1x1000, 1000.0:1 between its sides; edit takes at most 279:1"),
    ({"image_base64": png_b64(Image.new("RGB", (3000, 10)))},
     "image_base64: image is 3000x10, 300.0:1 between its sides; edit takes at most 279:1"),
    ({"operation": "edit_multi", "image_base64": png_b64(shaped(4)),
      "images_base64": [png_b64(shaped(EDIT_LIMIT + 1, tall=False))]},
     "images_base64[0]: image is 560x2, 280.0:1 between its sides; edit_multi takes at most 279:1"),
    ({"operation": "decompose", "prompt": "", "resolution": 1024, "image_base64": png_b64(shaped(DECOMPOSE_LIMIT + 1))},
     "image_base64: image is 2x328, 164.0:1 between its sides; decompose takes at most 163:1"),
    ({"operation": "decompose", "image_base64": png_b64(shaped(1000, mode="RGBA"))},
     "image_base64: image is 2x2000, 1000.0:1 between its sides; decompose takes at most 163:1"),
], ids=["edit one past", "1x1000", "3000x10", "edit_multi second image", "decompose one past", "decompose 1000:1"])
def test_past_the_limit_the_worker_refuses_before_any_model_runs(worker, job, expected):
    started = time.perf_counter()
    out = run(worker, **job)
    seconds = time.perf_counter() - started
    assert set(out) == {"error"} and out["error"].startswith(expected), out
    assert out["error"].endswith("crop or pad it")
    assert seconds < MAX_REFUSAL_S


def test_composite_runs_no_model_and_takes_any_shape(worker):
    out = worker.handle({"id": "shape", "input": {"operation": "composite", "return_base64": True,
                                                  "layers_base64": [png_b64(shaped(1000, mode="RGBA"))]}})
    assert out.get("success") is True and out["image_size"] == [2, 2000], out


def test_the_edit_pipeline_itself_takes_the_limit_and_fails_one_past_it(worker):
    """The limit is the pipeline's: called directly, diffusers' edit pipeline runs at 279:1
    and raises past it (Qwen2.5-VL's processor, on the ~384x384 condition image)."""
    pipeline = reference_edit_pipeline(worker.host.edit_ref.path)
    image = direct_edit(pipeline, [shaped(EDIT_LIMIT)], "x", seed=1, num_inference_steps=1, width=256, height=256)
    assert image.size == (256, 256)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        direct_edit(pipeline, [shaped(EDIT_LIMIT + 1)], "x", seed=1, num_inference_steps=1, width=256, height=256)


class _FirstStepDone(Exception):
    pass


def test_the_layered_pipeline_captions_at_the_limit_and_fails_one_past_it(worker, hf_home):
    """Captioning an empty prompt at resolution 1024 is decompose's tightest shape: the
    pipeline gets through it and its first step at 163:1 (stopped there: a 96x13088 image
    would take long to finish on the CPU) and raises past it."""
    from diffusers import QwenImageLayeredPipeline

    from src.models.vl_processor import load_processor
    from src.models.files.tensors import locate

    path = str(locate(worker.settings.layered_model, hf_home).path)
    pipeline = QwenImageLayeredPipeline.from_pretrained(path, processor=load_processor(path), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)

    def stop(*args, **kwargs):
        raise _FirstStepDone

    def decompose(ratio: int):
        pipeline(image=shaped(ratio, mode="RGBA"), prompt="", num_inference_steps=1, layers=2, resolution=1024,
                 use_en_prompt=True, callback_on_step_end=stop, generator=torch.Generator().manual_seed(0))

    with pytest.raises(_FirstStepDone):
        decompose(DECOMPOSE_LIMIT)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        decompose(DECOMPOSE_LIMIT + 1)
