"""The worker in process on the tiny real pipelines, storing into the loopback S3."""

from __future__ import annotations

import dataclasses
import re

import pytest
import requests
import torch
from PIL import Image

from src.serving.worker import Worker
from tests.conftest import (AUTHORS_GREEN, FAST, direct_edit, fetch, image_from_b64, on_matte, png_b64,
                            reference_edit_pipeline, same_pixels, sample_image)



def run(worker: Worker, job_id: str = "job-1", **job_input) -> dict:
    updates: list[dict] = []
    output = worker.handle({"id": job_id, "input": job_input}, progress=updates.append)
    output["_progress"] = updates
    return output


# --- edit ---------------------------------------------------------------------

def test_edit_stores_the_image_and_reports_timings_cost_and_progress(worker, s3):
    out = run(worker, "edit-1", operation="edit", image_base64=png_b64(sample_image()), prompt="make it blue",
              seed=7, **FAST)
    assert out["success"] is True and out["operation"] == "edit" and out["seed"] == 7
    assert out["num_inference_steps"] == 2
    assert out["model"]["id"] == "Qwen/Qwen-Image-Edit-2511" and re.fullmatch(r"[0-9a-f]{40}", out["model"]["revision"])
    [entry] = out["images"]
    assert re.fullmatch(r"qwen-edit/edit-1/[0-9a-f]{8}/output\.png", entry["key"]) and entry["key"] == out["r2_key"]
    assert entry["url"] == out["output_url"]
    fetched = fetch(entry["url"])
    assert fetched.format == "PNG" and fetched.size == (256, 256) == tuple(out["image_size"])
    assert entry["bytes"] == len(requests.get(entry["url"]).content)
    assert "base64" not in entry and "edited_image_base64" not in out  # new-shape request, bucket set
    assert set(out["timings_ms"]) >= {"decode", "inference", "encode", "upload", "total"}
    assert out["inference_time_ms"] == int(out["timings_ms"]["inference"])
    assert out["cost"]["usd_per_hour"] == 1.80 and out["cost"]["gpu"] == "cpu"
    assert out["cost_usd"] == pytest.approx(out["cost"]["seconds"] * 1.80 / 3600, abs=1e-6)
    assert out["_progress"][-1] == {"step": 2, "of": 2}


def test_edit_equals_the_pipeline_called_directly(worker, hf_home):
    """Fidelity: a separately loaded diffusers pipeline gives the same pixels."""
    pipeline = reference_edit_pipeline(worker.host.edit_ref.path)
    source = sample_image()
    out = run(worker, "fidelity-1", operation="edit", image_base64=png_b64(source), prompt="a red hat",
              seed=1234, return_base64=True, **FAST)
    expected = direct_edit(pipeline, [source], "a red hat", 1234, num_inference_steps=2, width=256, height=256)
    assert same_pixels(image_from_b64(out["edited_image_base64"]).convert("RGB"), expected)
    assert same_pixels(fetch(out["output_url"]).convert("RGB"), expected)


def test_same_seed_same_image_and_a_null_seed_is_drawn_and_returned(worker):
    job = dict(operation="edit", image_base64=png_b64(sample_image()), prompt="x", return_base64=True, **FAST)
    first, second = run(worker, seed=99, **job), run(worker, seed=99, **job)
    assert first["edited_image_base64"] == second["edited_image_base64"]
    drawn = run(worker, seed=None, **job)
    assert 0 <= drawn["seed"] < 2**32
    again = run(worker, seed=drawn["seed"], **job)
    assert again["edited_image_base64"] == drawn["edited_image_base64"]


def test_rgba_edit_keeps_the_alpha_resized_to_the_output(worker):
    source = sample_image(size=(96, 64), mode="RGBA")
    out = run(worker, operation="edit", image_base64=png_b64(source), prompt="x", seed=3, return_base64=True,
              num_inference_steps=2, width=384, height=256)
    result = image_from_b64(out["edited_image_base64"])
    assert result.mode == "RGBA" and result.size == (384, 256)
    expected_alpha = source.getchannel("A").resize((384, 256), Image.Resampling.LANCZOS)
    assert result.getchannel("A").tobytes() == expected_alpha.tobytes()
    # The model saw the image on the authors' green; the alpha went back on afterwards.
    on_green = direct_edit(worker.host.edit, [on_matte(source, AUTHORS_GREEN)], "x", 3,
                           num_inference_steps=2, width=384, height=256)
    assert same_pixels(result.convert("RGB"), on_green)
    assert out["matte"] == "#1ed760"


def test_rgba_jpeg_edit_is_refused_before_inference(worker):
    out = run(worker, operation="edit", image_base64=png_b64(sample_image(mode="RGBA")), prompt="x",
              output_format="jpeg", **FAST)
    assert out["error"].startswith("output_format: 'jpeg' cannot keep the input image's alpha channel")
    assert out["_progress"] == []


@pytest.mark.parametrize("count", [2, 3])
def test_multi_image_edit_combines_the_images(worker, count):
    sources = [sample_image(seed=i, mode="RGBA" if i == 1 else "RGB") for i in range(count)]
    out = run(worker, operation="edit_multi", image_base64=png_b64(sources[0]),
              images_base64=[png_b64(s) for s in sources[1:]], prompt="put them together", seed=5,
              return_base64=True, **FAST)
    assert out["success"] and out["operation"] == "edit_multi"
    # RGBA inputs are flattened onto white before the pipeline sees them.
    flattened = [on_matte(s, (255, 255, 255)) for s in sources]
    expected = direct_edit(worker.host.edit, flattened, "put them together", 5, num_inference_steps=2,
                           width=256, height=256)
    assert same_pixels(image_from_b64(out["edited_image_base64"]), expected)


def test_edit_with_extra_images_is_a_multi_image_edit(worker):
    sources = [sample_image(seed=1), sample_image(seed=2)]
    job = dict(image_base64=png_b64(sources[0]), images_base64=[png_b64(sources[1])], prompt="merge", seed=8,
               return_base64=True, **FAST)
    as_edit = run(worker, operation="edit", **job)
    as_multi = run(worker, operation="edit_multi", **job)
    assert as_edit["edited_image_base64"] == as_multi["edited_image_base64"]


@pytest.mark.parametrize("fmt, quality", [("jpeg", 80), ("webp", 90)])
def test_output_formats(worker, fmt, quality):
    out = run(worker, operation="edit", image_base64=png_b64(sample_image()), prompt="x", seed=1,
              output_format=fmt, output_quality=quality, **FAST)
    assert out["r2_key"].endswith(f"/output.{fmt}")
    assert fetch(out["output_url"]).format == fmt.upper()


def test_auto_resize_false_keeps_the_input_size(worker):
    out = run(worker, operation="edit", image_base64=png_b64(sample_image(size=(300, 270))), prompt="x",
              auto_resize=False, num_inference_steps=1)
    assert out["image_size"] == [288, 256]


# --- compatibility ------------------------------------------------------------

def test_orchestrator_payload_and_health_check(worker):
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    legacy = {"image_base64": png_b64(grey), "prompt": "test", "num_inference_steps": 1, "seed": None,
              "guidance_scale": 1.0, "negative_prompt": " ", "images_base64": [], "use_fp8": False,
              "width": 256, "height": 256}
    out = run(worker, **legacy)
    assert "error" not in out and out["success"] is True
    for key in ("edited_image_base64", "output_url", "seed", "inference_time_ms", "image_size", "cost_usd"):
        assert key in out
    assert image_from_b64(out["edited_image_base64"]).size == tuple(out["image_size"])
    assert run(worker, **legacy, return_base64=False).get("edited_image_base64") is None
    assert "use_fp8" in run(worker, **{**legacy, "use_fp8": True})["warnings"][0]


def test_one_step_is_served_as_the_pipeline_gives_it_with_a_note(worker):
    out = run(worker, operation="edit", image_base64=png_b64(sample_image()), prompt="x", seed=1,
              return_base64=True, num_inference_steps=1, width=256, height=256)
    assert out["success"] and out["warnings"][0].startswith("num_inference_steps: with 1 step")
    assert image_from_b64(out["edited_image_base64"]).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_without_a_bucket_images_come_back_inline(worker):
    no_bucket = dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, bucket=None))
    out = run(no_bucket, operation="edit", image_base64=png_b64(sample_image()), prompt="x", **FAST)
    assert out["success"] and out["output_url"] is None and out["r2_key"] is None
    assert image_from_b64(out["edited_image_base64"]).size == (256, 256)


def test_inline_output_over_runpods_limit(worker):
    tiny_limit = dataclasses.replace(worker.settings, max_inline_bytes=1000)
    without_bucket = dataclasses.replace(worker, settings=dataclasses.replace(tiny_limit, bucket=None))
    out = run(without_bucket, operation="edit", image_base64=png_b64(sample_image()), prompt="x", **FAST)
    assert out["error"].startswith("output: ") and "configure a bucket" in out["error"]
    with_bucket = dataclasses.replace(worker, settings=tiny_limit)
    out = run(with_bucket, operation="edit", image_base64=png_b64(sample_image()), prompt="x",
              return_base64=True, **FAST)
    assert out["success"] and "edited_image_base64" not in out and fetch(out["output_url"]).size == (256, 256)
    assert "inline limit" in out["warnings"][0]


# --- per-job bucket and storage faults -----------------------------------------

def test_per_job_r2_bucket_is_used(worker, s3):
    s3.client().create_bucket(Bucket="job-bucket")
    r2 = {"endpoint_url": s3.endpoint_url, "access_key_id": "job-key", "secret_access_key": "job-secret",
          "bucket_name": "job-bucket", "region": "us-east-1"}
    out = run(worker, "r2-job", operation="edit", image_base64=png_b64(sample_image()), prompt="x", r2=r2, **FAST)
    assert out["success"]
    assert re.fullmatch(r"qwen-edit/r2-job/[0-9a-f]{8}/output\.png", out["r2_key"])
    stored = s3.client().get_object(Bucket="job-bucket", Key=out["r2_key"])["Body"].read()
    assert stored == requests.get(out["output_url"]).content


def test_storage_failure_is_an_error_never_a_success(worker, s3):
    r2 = {"endpoint_url": s3.endpoint_url, "access_key_id": "k", "secret_access_key": "do-not-leak-this",
          "bucket_name": "no-such-bucket", "region": "us-east-1"}
    out = run(worker, operation="edit", image_base64=png_b64(sample_image()), prompt="x", r2=r2, **FAST)
    assert out == {"error": "storage: upload to bucket 'no-such-bucket' failed: NoSuchBucket", "_progress": out["_progress"]}


# --- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("job_input, expected", [
    ({"prompt": "x"}, "image_base64: required"),
    ({"image_base64": "!!!", "prompt": "x"}, "image_base64: not valid base64"),
    ({"image_base64": "aGVsbG8gd29ybGQ=", "prompt": "x"}, "image_base64: not a readable image"),
    ({"operation": "edit_multi", "image_base64": "aGVsbG8=", "prompt": "x"}, "images_base64: edit_multi needs 2 or 3"),
    ({"image_base64": "aGVsbG8=", "prompt": "x", "num_inference_steps": 1000}, "num_inference_steps: "),
    ({"image_base64": "aGVsbG8=", "prompt": "x", "colour": "red"}, "colour: unknown key"),
    ({"image_base64": "aGVsbG8=", "prompt": "x", "images_base64": ["aGVsbG8="] * 3},
     "images_base64: 3 extra images, 4 in all counting image_base64; at most 3 images in all"),
    ({"image_base64": "aGVsbG8="[:3] + "aGVsbG8="[4:], "prompt": "x"},  # one character short
     "image_base64: not valid base64: 7 characters with its '=' padding, but padded base64 comes in groups of 4 "
     "(4 or 8 here): cut short or with extra characters?"),
])
def test_bad_input_is_refused_and_the_next_job_succeeds(worker, job_input, expected):
    out = run(worker, **job_input)
    assert out["error"].startswith(expected) and out["_progress"] == []
    assert run(worker, image_base64=png_b64(sample_image()), prompt="ok", **FAST)["success"]


def test_an_oversize_image_is_refused(worker):
    small_limit = dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, max_image_pixels=64 * 64))
    out = run(small_limit, image_base64=png_b64(sample_image()), prompt="x", images_base64=[], **FAST)
    assert out["error"] == "image_base64: image is 96x64 = 6144 pixels; at most 4096 allowed (MAX_IMAGE_PIXELS)"
    extra = run(small_limit, image_base64=png_b64(Image.new("RGB", (8, 8))), prompt="x",
                images_base64=[png_b64(sample_image())], **FAST)
    assert extra["error"].startswith("images_base64[0]: image is 96x64")


# --- decompose ----------------------------------------------------------------

def test_decompose_returns_rgba_layers_and_their_composite(worker, hf_home):
    source = sample_image(size=(80, 64))
    out = run(worker, "decompose-1", operation="decompose", image_base64=png_b64(source), prompt="a scene",
              layers=3, num_inference_steps=2, seed=11)
    assert out["success"] and out["model"]["id"] == "Qwen/Qwen-Image-Layered"
    assert [layer["index"] for layer in out["layers"]] == [0, 1, 2]
    folder = out["composite"]["key"].rsplit("/", 1)[0]  # one run's images share one folder
    assert re.fullmatch(r"qwen-edit/decompose-1/[0-9a-f]{8}", folder)
    assert [layer["key"] for layer in out["layers"]] == [f"{folder}/layer_{i}.png" for i in range(3)]
    assert out["composite"]["key"] == f"{folder}/composite.png"
    assert len(out["images"]) == 4
    layers = [fetch(layer["url"]) for layer in out["layers"]]
    assert all(layer.mode == "RGBA" for layer in layers)
    composite = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        composite = Image.alpha_composite(composite, layer)
    assert same_pixels(fetch(out["composite"]["url"]), composite)
    # Fidelity: the layers equal the Layered pipeline's own output.
    expected = worker.host.layered()(image=source.convert("RGBA"), prompt="a scene", negative_prompt=" ",
                                      true_cfg_scale=4.0, guidance_scale=1.0, layers=3, resolution=640,
                                      num_inference_steps=2, cfg_normalize=True, use_en_prompt=True,
                                      generator=torch.Generator("cpu").manual_seed(11)).images[0]
    assert all(same_pixels(got, want) for got, want in zip(layers, expected))


def test_decompose_shares_the_edit_text_encoder(worker):
    worker.host.layered()
    assert worker.host.layered().text_encoder is worker.host.edit.text_encoder
    assert worker.host.layered().processor is worker.host.edit.processor


def test_decompose_refuses_jpeg_and_extra_images(worker):
    base = {"operation": "decompose", "image_base64": png_b64(sample_image())}
    assert run(worker, **base, output_format="jpeg")["error"].startswith("output_format: 'jpeg' cannot hold")
    assert run(worker, **base, images_base64=[png_b64(sample_image())])["error"].startswith("images_base64: not used")
