"""The layer workflow on the tiny real pipelines, in process: decompose with layer
edits, resize_to_input, the `composite` operation and the zip/psd/ora archives. Results
are fetched from the loopback S3 through their presigned URLs; the expected pixels are
computed here, with Pillow's alpha_composite and direct pipeline calls. The same
workflow through the local API: tests/test_local_api.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from src.plumbing.config import Settings
from src.serving.worker import Worker
from tests.conftest import AUTHORS_GREEN, fetch, on_matte, png_b64, reference_edit_pipeline, sample_image
from tests.layer_checks import (EDITS, SEED, SOURCE_SIZE, alpha_over, assert_archive_holds, decompose_job,
                                fetch_archive, layer_pile, read_archive, same_pixels)

@dataclass
class Job:
    output: dict
    progress: list[dict]
    images: dict[str, Image.Image]  # every result image by name, fetched from its URL


def run_job(worker: Worker, job_id: str, job_input: dict) -> Job:
    progress: list[dict] = []
    output = worker.handle({"id": job_id, "input": job_input}, progress=progress.append)
    assert output.get("success"), output
    return Job(output, progress, {entry["name"]: fetch(entry["url"]) for entry in output["images"]})


@pytest.fixture(scope="module")
def edited(worker) -> Job:
    """One decomposition into 3 layers with layers 0 and 2 edited, at the model's size."""
    return run_job(worker, "layer-edits", decompose_job(edits=EDITS))


@pytest.fixture(scope="module")
def edited_at_input_size(worker) -> Job:
    """The same job with resize_to_input."""
    return run_job(worker, "layer-edits-resized", decompose_job(edits=EDITS, resize_to_input=True))


# --- decompose with edits ------------------------------------------------------

def test_the_output_lists_original_and_edited_layers_and_both_composites(edited):
    out = edited.output
    assert [entry["name"] for entry in out["images"]] == [
        "layer_0", "layer_1", "layer_2", "composite", "edited_layer_0", "edited_layer_2", "composite_edited"]
    assert [(entry["name"], entry["index"]) for entry in out["layers"]] == [(f"layer_{i}", i) for i in range(3)]
    assert out["composite"]["name"] == "composite" and out["composite_edited"]["name"] == "composite_edited"
    # Each edit as it ran: its own seed, else the job's.
    assert [(e["name"], e["index"], e["seed"], e["num_inference_steps"], e["true_cfg_scale"])
            for e in out["edited_layers"]] == [("edited_layer_0", 0, SEED, 2, 4.0), ("edited_layer_2", 2, 99, 2, 2.0)]
    folder = out["composite"]["key"].rsplit("/", 1)[0]
    assert all(entry["key"] == f"{folder}/{entry['name']}.png" for entry in out["images"])
    assert all(image.mode == "RGBA" for image in edited.images.values())


def test_an_edited_layer_keeps_its_alpha_exactly_and_gets_new_colour(edited):
    for index in (0, 2):
        original, edit = edited.images[f"layer_{index}"], edited.images[f"edited_layer_{index}"]
        assert edit.size == original.size
        assert edit.getchannel("A").tobytes() == original.getchannel("A").tobytes()
        assert edit.convert("RGB").tobytes() != original.convert("RGB").tobytes()


def test_each_composite_is_the_alpha_over_of_its_layers(edited):
    images = edited.images
    originals = [images[f"layer_{i}"] for i in range(3)]
    final = [images["edited_layer_0"], images["layer_1"], images["edited_layer_2"]]
    assert same_pixels(images["composite"], alpha_over(originals))
    assert same_pixels(images["composite_edited"], alpha_over(final))
    assert not same_pixels(images["composite_edited"], images["composite"])


def test_a_layer_edit_equals_the_edit_pipeline_called_directly(worker, edited):
    """Fidelity: a separately loaded edit pipeline, given the layer on the authors' green
    and the edit's settings and no size (the authors' call: about 1 MP at the layer's
    aspect, the size the layer is encoded at), gives the edited RGB; resized to the
    layer's size, it takes the layer's alpha."""
    pipeline = reference_edit_pipeline(worker.host.edit_ref.path)
    for edit, seed in ((EDITS[0], SEED), (EDITS[1], EDITS[1]["seed"])):
        layer = edited.images[f"layer_{edit['layer']}"]
        rgb = pipeline(image=[on_matte(layer, AUTHORS_GREEN)], prompt=edit["prompt"],
                       negative_prompt=edit.get("negative_prompt", " "),
                       true_cfg_scale=edit.get("true_cfg_scale", 4.0), guidance_scale=1.0,
                       num_inference_steps=edit["num_inference_steps"],
                       generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        assert rgb.size != layer.size  # a 640 layer is edited at 1024 and resized back
        expected = rgb.resize(layer.size, Image.Resampling.LANCZOS).convert("RGBA")
        expected.putalpha(layer.getchannel("A"))
        assert same_pixels(edited.images[f"edited_layer_{edit['layer']}"], expected)


def test_progress_names_each_edit(edited):
    stages = [update.get("stage") for update in edited.progress]
    assert stages[0] is None  # the decomposition's own steps
    assert {"step": 2, "of": 2, "stage": "edits[0]"} in edited.progress
    assert edited.progress[-1] == {"step": 2, "of": 2, "stage": "edits[1]"}


# --- resize_to_input -----------------------------------------------------------

def test_resize_to_input_returns_every_image_at_the_input_size(edited, edited_at_input_size):
    out, images = edited_at_input_size.output, edited_at_input_size.images
    assert edited.images["layer_0"].size != SOURCE_SIZE
    assert all(image.size == SOURCE_SIZE for image in images.values())
    assert all((entry["width"], entry["height"]) == SOURCE_SIZE for entry in out["images"])
    # The same layers and edits as at the model's size, resized (same seed, same job).
    for name in ("layer_0", "layer_1", "edited_layer_2"):
        assert same_pixels(images[name], edited.images[name].resize(SOURCE_SIZE, Image.Resampling.LANCZOS))
    for index in (0, 2):
        assert (images[f"edited_layer_{index}"].getchannel("A").tobytes()
                == images[f"layer_{index}"].getchannel("A").tobytes())
    assert same_pixels(images["composite"], alpha_over([images[f"layer_{i}"] for i in range(3)]))
    assert same_pixels(images["composite_edited"],
                       alpha_over([images["edited_layer_0"], images["layer_1"], images["edited_layer_2"]]))


# --- archives ------------------------------------------------------------------

# psd: through the local API, in tests/test_local_api.py.
@pytest.mark.parametrize("fmt", ["zip", "ora"])
def test_a_decompose_archive_holds_the_final_layers_and_their_composite(worker, fmt):
    job = run_job(worker, f"archive-{fmt}", decompose_job(layers=2, edits=[EDITS[0]], resize_to_input=True,
                                                          archive=fmt))
    entry = job.output["archive"]
    assert (entry["layers"], entry["width"], entry["height"]) == (2, *SOURCE_SIZE)
    contents = read_archive(fmt, fetch_archive(job.output, fmt))
    # The stack as the job leaves it: the edited layer in place of its original.
    assert_archive_holds(fmt, contents, ["edited_layer_0", "layer_1"],
                         [job.images["edited_layer_0"], job.images["layer_1"]], job.images["composite_edited"])


# --- composite -----------------------------------------------------------------

def test_composite_stacks_the_layers_on_the_cpu(worker):
    layers = layer_pile()
    layers_base64 = [png_b64(layer) for layer in layers[:3]] + [png_b64(layers[3].convert("RGB"))]
    job = run_job(worker, "composite-1", {"operation": "composite", "layers_base64": layers_base64})
    out = job.output
    rgb_as_opaque = layers[3].convert("RGB").convert("RGBA")
    assert same_pixels(job.images["composite"], alpha_over(layers[:3] + [rgb_as_opaque]))
    assert out["image_size"] == [48, 32] and out["composite"]["name"] == "composite"
    # No model ran: no progress, no inference or load stage, no model in the output.
    assert job.progress == [] and out["inference_time_ms"] == 0 and "model" not in out
    assert set(out["timings_ms"]) == {"decode", "composite", "encode", "upload", "total"}


def test_composite_archive_holds_the_sent_layers(worker):
    layers = layer_pile()
    job = run_job(worker, "composite-2", {"operation": "composite", "layers_base64": [png_b64(l) for l in layers],
                                          "archive": "ora"})
    contents = read_archive("ora", fetch_archive(job.output, "ora"))
    assert_archive_holds("ora", contents, [f"layer_{i}" for i in range(4)], layers, alpha_over(layers))


# --- bad input -----------------------------------------------------------------

def bad_layers() -> list[str]:
    return [png_b64(Image.new("RGBA", (48, 32), (255, 0, 0, 128))), png_b64(Image.new("RGBA", (32, 32)))]


@pytest.mark.parametrize("job_input, expected", [
    (decompose_job(layers=2, edits=[{"layer": 3, "prompt": "x"}]),
     "edits[0].layer: layer 3 does not exist: this decomposition makes layers 0 to 1 (layers: 2)"),
    (decompose_job(edits=[{"layer": 12, "prompt": "x"}]), "edits[0].layer: input should be less than 10; got 12"),
    (decompose_job(edits=[{"layer": 1, "prompt": "x"}, {"layer": 1, "prompt": "y"}]),
     "edits[1].layer: layer 1 is already edited by edits[0]; one edit per layer (put both instructions in one prompt)"),
    (decompose_job(edits=[{"layer": 1, "prompt": " "}]), "edits[0].prompt: required and non-empty"),
    (decompose_job(output_format="jpeg", archive="zip"),
     "archive: the archive comes with the layers as images, and 'jpeg' cannot hold their alpha; "
     "use output_format png or webp"),
    (decompose_job(archive="tar"), "archive: input should be 'zip', 'psd' or 'ora'; got 'tar'"),
    ({"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "x",
      "edits": [{"layer": 0, "prompt": "x"}]},
     "edits: only used by decompose"),
    ({"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "x", "resize_to_input": True},
     "resize_to_input: only used by decompose"),
    ({"operation": "composite", "layers_base64": bad_layers()},
     "layers_base64[1]: 32x32, but layers_base64[0] is 48x32; all layers must be the same size"),
    ({"operation": "composite", "layers_base64": bad_layers()[:1], "image_base64": png_b64(sample_image())},
     "image_base64: not used by composite (it stacks layers_base64 on the CPU and runs no model)"),
    ({"operation": "composite", "layers_base64": bad_layers()[:1], "output_format": "jpeg"},
     "output_format: 'jpeg' cannot hold the layers' alpha; composite allows png or webp"),
    ({"operation": "composite"},
     "layers_base64: required for composite: 1 to 16 RGBA images, back to front, all the same size"),
], ids=["missing-layer", "layer-out-of-range", "layer-twice", "empty-edit-prompt", "archive-jpeg", "archive-tar",
        "edits-on-edit", "resize-on-edit", "composite-sizes", "composite-image", "composite-jpeg",
        "composite-no-layers"])
def test_bad_layer_input_is_refused_before_any_model_runs(worker, job_input, expected):
    progress: list[dict] = []
    assert worker.handle({"id": "bad", "input": job_input}, progress=progress.append) == {"error": expected}
    assert progress == []


def test_edits_are_capped_by_MAX_LAYER_EDITS(worker, worker_env):
    one_edit = dataclasses.replace(worker, settings=Settings.from_env({**worker_env, "MAX_LAYER_EDITS": "1"}))
    progress: list[dict] = []
    two_edits = decompose_job(edits=[{"layer": 0, "prompt": "x"}, {"layer": 1, "prompt": "y"}])
    out = one_edit.handle({"id": "capped", "input": two_edits}, progress=progress.append)
    assert out == {"error": "edits: 2 edits; at most 1 in one job (MAX_LAYER_EDITS)"} and progress == []


def test_a_one_step_edit_is_noted(worker):
    out = worker.handle({"id": "one-step-edit", "input": decompose_job(
        layers=2, resize_to_input=True, edits=[{"layer": 1, "prompt": "x", "num_inference_steps": 1}])})
    assert out["success"] and out["warnings"] == [
        "edits[0].num_inference_steps: with 1 step the models' scheduler (shift_terminal) yields NaN "
        "and a black image; use 2 or more for a real image"]
