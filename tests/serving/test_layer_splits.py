"""Recursive decomposition (`split`) on the tiny real pipelines, in process: chosen layers
of a decomposition decomposed again in the same job. Each sub-layer is compared pixel for
pixel with the Layered pipeline called directly on its layer, as fetched from the
loopback S3, with the job's settings and seed; the archives are read back with psd-tools
and zipfile (the writers' groups in every format, pyora's reading included:
tests/serving/test_archives.py); bad splits are refused before any model runs; JOB_TIMEOUT_S stops a
job inside its split."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from src.serving.deadline import JobGuard
from tests.conftest import fetch, png_b64, sample_image
from tests.layer_checks import (SEED, alpha_over, assert_archive_holds, decompose_job, fetch_archive, read_archive,
                                same_pixels)

SPLITS = [{"layer": 1, "layers": 2}, {"layer": 2, "layers": 3, "prompt": "a glowing square"}]
# The pipeline sizes its output from the input's aspect, rounded to 32: this source's
# layers are 1024x384, and a 1024x384 layer decomposes at 1056x384.
OFF_BUCKET_SOURCE = (104, 40)


def run_job(worker, job_id: str, job_input: dict, progress: list | None = None) -> tuple[dict, dict[str, Image.Image]]:
    output = worker.handle({"id": job_id, "input": job_input},
                           progress=(progress if progress is not None else []).append)
    assert output.get("success"), output
    return output, {entry["name"]: fetch(entry["url"]) for entry in output["images"]}


def decompose_directly(worker, image: Image.Image, layers: int, prompt: str) -> list[Image.Image]:
    """The Layered pipeline's own output for `image` with the test jobs' settings, called
    the authors' way (as tests/serving/test_worker.py checks the top decomposition)."""
    return worker.host.layered()(image=image.convert("RGBA"), prompt=prompt, negative_prompt=" ",
                                  true_cfg_scale=4.0, guidance_scale=1.0, layers=layers, resolution=640,
                                  num_inference_steps=2, cfg_normalize=True, use_en_prompt=True,
                                  generator=torch.Generator("cpu").manual_seed(SEED)).images[0]


@pytest.fixture(scope="module")
def split(worker):
    """A decomposition into 3 layers with layer 1 split in 2 (captioned) and layer 2 in 3
    (with a prompt), and a psd archive."""
    progress: list[dict] = []
    output, images = run_job(worker, "split", decompose_job(split=SPLITS, archive="psd"), progress)
    return output, images, progress


def test_the_output_groups_each_split_layers_sub_layers(split):
    output, images, _ = split
    assert [entry["name"] for entry in output["images"]] == [
        "layer_0", "layer_1", "layer_2", "composite", "layer_1_0", "layer_1_1", "layer_2_0", "layer_2_1", "layer_2_2"]
    assert [(entry["name"], entry["index"]) for entry in output["layers"]] == [(f"layer_{i}", i) for i in range(3)]
    assert [(group["layer"], [(entry["name"], entry["index"]) for entry in group["layers"]])
            for group in output["splits"]] == [
        (1, [("layer_1_0", 0), ("layer_1_1", 1)]), (2, [("layer_2_0", 0), ("layer_2_1", 1), ("layer_2_2", 2)])]
    folder = output["composite"]["key"].rsplit("/", 1)[0]
    assert all(entry["key"] == f"{folder}/{entry['name']}.png" for entry in output["images"])
    # RGBA, at the layers' size.
    assert all(image.mode == "RGBA" and image.size == images["layer_0"].size for image in images.values())
    # The top decomposition's composite is still that of its own layers.
    assert same_pixels(images["composite"], alpha_over([images[f"layer_{i}"] for i in range(3)]))


def test_each_sub_layer_equals_the_layered_pipeline_called_on_its_layer(worker, split):
    """Fidelity: the split of layer 1 (no prompt: the pipeline captions the layer) and of
    layer 2 (its own prompt) equal the pipeline called directly on the layer image the job
    returned, with the job's seed and settings."""
    _, images, _ = split
    for spec in SPLITS:
        layer = spec["layer"]
        expected = decompose_directly(worker, images[f"layer_{layer}"], spec["layers"], spec.get("prompt", ""))
        assert expected[0].size == images[f"layer_{layer}"].size  # this layer decomposes at its own size
        got = [images[f"layer_{layer}_{j}"] for j in range(spec["layers"])]
        assert all(same_pixels(a, b) for a, b in zip(got, expected, strict=True))
    # The prompt is the split's own: the job's prompt gives other sub-layers.
    with_job_prompt = decompose_directly(worker, images["layer_2"], 3, "a scene")
    assert not all(same_pixels(images[f"layer_2_{j}"], b) for j, b in enumerate(with_job_prompt))


def test_progress_names_each_split(split):
    _, _, progress = split
    assert progress[0] == {"step": 1, "of": 2}  # the decomposition's own steps
    assert {"step": 2, "of": 2, "stage": "split[0]"} in progress
    assert progress[-1] == {"step": 2, "of": 2, "stage": "split[1]"}


def test_the_psd_archive_holds_each_split_layer_as_a_group_in_its_place(split):
    output, images, _ = split
    entry = output["archive"]
    assert (entry["layers"], entry["width"], entry["height"]) == (6, *images["layer_0"].size)
    contents = read_archive("psd", fetch_archive(output, "psd"))
    names = ["layer_0", "layer_1/layer_1_0", "layer_1/layer_1_1", "layer_2/layer_2_0", "layer_2/layer_2_1",
             "layer_2/layer_2_2"]
    leaves = [images[name.rsplit("/", 1)[-1]] for name in names]
    # The merged image is the alpha-over of what the file holds: the sub-layers stand in for their layers.
    assert_archive_holds("psd", contents, names, leaves, alpha_over(leaves))


def test_a_zip_archive_groups_the_sub_layers_with_the_edits_in_place(worker):
    """(The ORA writer's groups: tests/serving/test_archives.py.)"""
    fmt = "zip"
    job = decompose_job(layers=2, split=[{"layer": 1, "layers": 2}], edits=[{"layer": 0, "prompt": "paint it red",
                                                                            "num_inference_steps": 2}],
                        resize_to_input=True, archive=fmt)
    output, images = run_job(worker, f"split-{fmt}", job)
    assert all(image.size == (100, 60) for image in images.values())  # resize_to_input reaches the sub-layers
    names = ["edited_layer_0", "layer_1/layer_1_0", "layer_1/layer_1_1"]
    leaves = [images[name.rsplit("/", 1)[-1]] for name in names]
    assert_archive_holds(fmt, read_archive(fmt, fetch_archive(output, fmt)), names, leaves, alpha_over(leaves))
    assert output["archive"]["layers"] == 3


def test_sub_layers_that_come_out_off_the_layers_size_are_resized_to_it(worker):
    """A 1024x384 layer decomposes at 1056x384 (the pipeline's rounding): its sub-layers are
    the pipeline's, resized to the layer's size (Lanczos)."""
    source = sample_image(size=OFF_BUCKET_SOURCE, mode="RGBA")
    job = {"operation": "decompose", "image_base64": png_b64(source), "prompt": "a scene", "layers": 2,
           "num_inference_steps": 2, "seed": SEED, "split": [{"layer": 0, "layers": 2}]}
    _, images = run_job(worker, "split-resized", job)
    layer = images["layer_0"]
    expected = decompose_directly(worker, layer, 2, "")
    assert layer.size == (1024, 384) and expected[0].size == (1056, 384)
    for j, sub_layer in enumerate(expected):
        assert same_pixels(images[f"layer_0_{j}"], sub_layer.resize(layer.size, Image.Resampling.LANCZOS))


def test_the_job_deadline_covers_the_splits(worker):
    """JOB_TIMEOUT_S (handler.py runs every job under the guard): a job whose time runs out
    during a split stops before the split's next model block, with the timeout error."""
    guard = JobGuard(timeout_s=20)
    guard.watch(worker.host.layered())
    started = time.monotonic()

    def progress(update: dict) -> None:  # the split's first step ends after the deadline
        if update.get("stage") == "split[0]" and update["step"] == 1:
            time.sleep(max(0.0, started + guard.timeout_s - time.monotonic()) + 0.2)

    job = {"id": "split-late", "input": decompose_job(layers=2, split=[{"layer": 0, "layers": 2}])}
    output = guard.run(lambda: worker.handle(job, progress=progress))
    assert output["error"].startswith("timeout: past JOB_TIMEOUT_S (20 s); stopped after "), output
    assert "before transformer" in output["error"] or "before vae" in output["error"], output


# --- bad input -----------------------------------------------------------------

@pytest.mark.parametrize("job_input, expected", [
    (decompose_job(split=[{"layer": 3, "layers": 2}]),
     "split[0].layer: layer 3 does not exist: this decomposition makes layers 0 to 2 (layers: 3)"),
    (decompose_job(split=[{"layer": 10, "layers": 2}]), "split[0].layer: input should be less than 10; got 10"),
    (decompose_job(split=[{"layer": 1, "layers": 2}, {"layer": 1, "layers": 3}]),
     "split[1].layer: layer 1 is already split by split[0]; one split per layer"),
    (decompose_job(split=[{"layer": 0, "layers": 11}]),
     "split[0].layers: input should be less than or equal to 10; got 11"),
    (decompose_job(split=[{"layer": 0, "layers": 1}]),
     "split[0].layers: input should be greater than or equal to 2; got 1"),
    (decompose_job(layers=4, split=[{"layer": i, "layers": 7} for i in range(3)]),
     "split: 21 sub-layers in all (7 + 7 + 7); at most 20 in one job (split fewer layers, or into fewer sub-layers)"),
    (decompose_job(split=[{"layer": 0}]), "split[0].layers: required"),
    (decompose_job(split=[{"layer": 0, "layers": 2, "seed": 4}]),
     "split[0].seed: unknown key; allowed keys: layer, layers, prompt"),
    (decompose_job(split=[{"layer": 2, "layers": 2}], edits=[{"layer": 2, "prompt": "x"}]),
     "split[0].layer: layer 2 is edited by edits[0]; a layer is either edited or split (send the edited layer "
     "to a decompose job of its own)"),
    ({"image_base64": png_b64(sample_image()), "prompt": "x", "split": [{"layer": 0, "layers": 2}]},
     "split: only used by decompose"),
], ids=["missing-layer", "layer-out-of-range", "layer-twice", "too-many-sub-layers", "too-few-sub-layers",
        "too-many-in-all", "no-count", "unknown-key", "edited-and-split", "split-on-edit"])
def test_bad_splits_are_refused_before_any_model_runs(worker, job_input, expected):
    progress: list[dict] = []
    assert worker.handle({"id": "bad-split", "input": job_input}, progress=progress.append) == {"error": expected}
    assert progress == []
