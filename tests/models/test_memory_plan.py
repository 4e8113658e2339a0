"""The memory plan (src/models/memory/plan.py): its arithmetic against the H200 measurements, the
levers it picks, the refusal texts, and the worker running them: a planned lever, a
refusal before any GPU work, and an out-of-memory error retried once with every lever
that applies to the job."""

from __future__ import annotations

import re

import pytest
import torch

from src.job.schema import parse_request
from src.models.memory import plan as memory_plan
from src.models.memory.plan import GIB, JobShape, MemoryPlan, need_bytes, shape_for
from src.plumbing.config import Settings
from src.serving.worker import Worker
from src.serving.startup import start_worker
from tests.conftest import fetch, png_b64, reference_edit_pipeline, same_pixels, sample_image

# Peak GPU memory above the weights, bf16, through the worker's job path on an H200
# (bench/results/nvidia-h200-2026-12-01-corners-multi.json: peak_gpu_gib - weights_gib).
MEASURED_GIB = [
    (JobShape("edit", 1024 * 1024, references=1), 2.1),
    (JobShape("edit", 2048 * 2048, references=1), 8.3),
    (JobShape("edit", 2048 * 2048, references=3), 8.4),
    (JobShape("decompose", 640 * 640, layers=10), 8.2),
    (JobShape("decompose", 1024 * 1024, layers=10), 18.5),
]


@pytest.mark.parametrize("shape, measured_gib", MEASURED_GIB)
def test_estimates_cover_the_measured_peaks_without_overshooting_far(shape, measured_gib):
    estimate_gib = need_bytes(shape, "none") / GIB
    assert measured_gib <= estimate_gib <= 1.3 * measured_gib


@pytest.mark.parametrize("shape, quantize, measured_gib", [
    (JobShape("edit", 2048 * 2048, references=3), "none", 2.83),
    (JobShape("decompose", 1024 * 1024, layers=10), "none", 4.27),
    (JobShape("edit", 2048 * 2048, references=3), "fp8", 4.8),
    (JobShape("decompose", 1024 * 1024, layers=10), "fp8", 7.65),
])
def test_the_transformer_stage_covers_its_measured_peak(shape, quantize, measured_gib):
    """The transformer passes' own peak above their start (`--breakdown`, H200)."""
    estimate_gib = memory_plan.SAFETY * memory_plan.stage_bytes(shape, quantize)["transformer"] / GIB
    assert measured_gib <= estimate_gib <= 1.3 * measured_gib


def test_transformer_tokens_are_the_pipelines():
    assert JobShape("edit", 1024 * 1024, references=1).tokens == 8192  # bench: tokens_per_pass [8192, 497]
    assert JobShape("edit", 2048 * 2048, references=3).tokens == 28672
    assert JobShape("decompose", 1024 * 1024, layers=10).tokens == 49152


def plan(budget_gib: float, quantize: str = "none") -> MemoryPlan:
    return MemoryPlan(int(budget_gib * GIB), quantize, "test GPU, 48 GiB; memory mode text_offload, "
                      "one transformer on the GPU at a time")


def test_a_job_that_fits_runs_without_levers():
    assert plan(24).levers_for(memory_plan.LARGEST_EDIT, "width") == ()
    assert plan(24).levers_for(memory_plan.LARGEST_DECOMPOSE, "layers") == ()


def test_cfg_runs_as_a_batch_of_two_only_where_the_pair_fits():
    large, small = JobShape("edit", 2048 * 2048, references=3), JobShape("edit", 512 * 512)
    plan = MemoryPlan(need_bytes(large, "none"), "none", "test")
    assert plan.levers_for(large, "width") == ()  # one sample at a time fits as it is...
    assert not plan.fits_cfg_batch(large, ())  # ...two at once would not
    assert plan.fits_cfg_batch(small, ())
    assert not plan.fits_cfg_batch(small, (), held_bytes=plan.budget_bytes)  # a held LoRA copy counts
    # A decomposition's layer edits (about 1 MP, one reference) are what would run two at once.
    assert memory_plan.cfg_pair(JobShape("decompose", 640 * 640, layers=4)) == JobShape("edit", 2 * 1024 * 1024, 2)
    assert memory_plan.cfg_pair(small).tokens == 2 * small.tokens


def test_levers_are_tried_least_change_first():
    assert plan(12).levers_for(memory_plan.LARGEST_DECOMPOSE, "layers") == ("layers_one_at_a_time",)
    assert plan(6).levers_for(memory_plan.LARGEST_EDIT, "width") == ("vae_tiling",)


def test_a_decomposition_that_cannot_fit_is_refused_with_what_would():
    with pytest.raises(ValueError) as refused:
        plan(4.9).levers_for(memory_plan.LARGEST_DECOMPOSE, "layers")
    assert str(refused.value) == (
        "layers: 10 layers at resolution 1024 need about 6 GiB of GPU memory beyond the weights; this worker has "
        "5 GiB (test GPU, 48 GiB; memory mode text_offload, one transformer on the GPU at a time); "
        "use at most 8 layers, or resolution 640")
    # What it names fits.
    assert plan(4.9).fits(JobShape("decompose", 1024 * 1024, layers=8))
    assert not plan(4.9).fits(JobShape("decompose", 1024 * 1024, layers=9))


def test_an_edit_that_cannot_fit_is_refused_with_the_largest_size_that_would():
    with pytest.raises(ValueError) as refused:
        plan(2).levers_for(memory_plan.LARGEST_EDIT, "width")
    text = str(refused.value)
    assert text.startswith("width: a 4.2-megapixel output with 3 images needs about 4 GiB of GPU memory beyond the "
                           "weights; this worker has 2 GiB (test GPU")
    side = int(text.rsplit("use at most ", 1)[1].split("x", 1)[0])
    assert plan(2).fits(JobShape("edit", side * side, references=3))
    assert not plan(2).fits(JobShape("edit", (side + 16) ** 2, references=3))


def test_shape_follows_the_pipelines_sizes():
    edit = parse_request({"image_base64": "x", "prompt": "p", "width": 2048, "height": 1024})
    assert shape_for(edit, [(640, 480)]) == JobShape("edit", 2048 * 1024, references=1)
    default = parse_request({"image_base64": "x", "images_base64": ["y"], "prompt": "p"})
    assert shape_for(default, [(640, 480), (300, 600)]).output_pixels == pytest.approx(1024 * 1024, rel=0.01)
    kept = parse_request({"image_base64": "x", "prompt": "p", "auto_resize": False})
    assert shape_for(kept, [(4000, 3000)]).output_pixels == 2048 * 2048  # clamped to the schema's sides
    decompose = parse_request({"operation": "decompose", "image_base64": "x", "layers": 7, "resolution": 1024,
                               "edits": [{"layer": 1, "prompt": "red"}]})
    assert shape_for(decompose, [(800, 600)]) == JobShape("decompose", 1024 * 1024, layers=7, layer_edits=1)


def test_a_split_counts_as_a_decomposition_into_its_sub_layers_after_the_first():
    split = parse_request({"operation": "decompose", "image_base64": "x", "layers": 3, "resolution": 1024,
                           "split": [{"layer": 0, "layers": 4}, {"layer": 2, "layers": 9}]})
    shape = shape_for(split, [(800, 600)])
    assert shape == JobShape("decompose", 1024 * 1024, layers=3, sub_layers=9)  # splits run one at a time
    # Its peak is the larger of the two decompositions, with the same levers.
    for levers in memory_plan.lever_choices("decompose"):
        assert need_bytes(shape, "none", levers) == need_bytes(JobShape("decompose", 1024 * 1024, layers=9), "none",
                                                               levers)
    assert need_bytes(JobShape("decompose", 1024 * 1024, layers=9, sub_layers=2), "none") == need_bytes(
        JobShape("decompose", 1024 * 1024, layers=9), "none")


def test_a_split_that_cannot_fit_is_refused_with_what_would():
    with pytest.raises(ValueError) as refused:
        plan(4.9).levers_for(JobShape("decompose", 1024 * 1024, layers=3, sub_layers=10), "split")
    assert str(refused.value) == (
        "split: 3 layers at resolution 1024 and a split into 10 need about 6 GiB of GPU memory beyond the weights; "
        "this worker has 5 GiB (test GPU, 48 GiB; memory mode text_offload, one transformer on the GPU at a time); "
        "split into at most 8 layers, or resolution 640")
    assert plan(4.9).fits(JobShape("decompose", 1024 * 1024, layers=3, sub_layers=8))


def test_streamed_models_count_in_their_stage():
    shape = JobShape("edit", 1024 * 1024)
    streamed = {"text_encoder": 4 * GIB}
    assert need_bytes(shape, "none", streamed=streamed) > need_bytes(shape, "none")
    assert need_bytes(shape, "none", streamed={"transformer": 0}) == need_bytes(shape, "none")


# --- the worker --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gpu_worker(worker_env):
    """A worker planning for a 6.5 GiB GPU (GPU_MEMORY_GIB) on the CPU: 2048x2048 edits
    need tiling, decompositions at 1024 fit only with fewer layers."""
    worker = start_worker(Settings.from_env({**worker_env, "GPU_MEMORY_GIB": "6.5", "WARMUP": "false"}))
    assert worker.host.plan is not None
    return worker


def run(worker: Worker, **job_input) -> dict:
    return worker.handle({"id": "plan", "input": job_input})


def test_a_job_that_needs_a_lever_runs_with_it_and_says_so(small_gpu_worker):
    source = sample_image()
    out = run(small_gpu_worker, image_base64=png_b64(source), prompt="x", seed=5, num_inference_steps=2,
              width=2048, height=2048)
    assert out["memory_levers"] == ["vae_tiling"]
    assert any(w.startswith("memory: the VAE decoded in overlapping tiles") for w in out["warnings"])
    # The image is the pipeline's own with diffusers' VAE tiling on.
    reference = reference_edit_pipeline(small_gpu_worker.host.edit_ref.path)
    reference.vae.enable_tiling()
    expected = reference(image=[source], prompt="x", negative_prompt=" ", true_cfg_scale=4.0, guidance_scale=1.0,
                         num_inference_steps=2, width=2048, height=2048,
                         generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert same_pixels(fetch(out["output_url"]).convert("RGB"), expected)
    # The levers are off again for the next job.
    assert not small_gpu_worker.host.edit.vae.use_tiling
    small = run(small_gpu_worker, image_base64=png_b64(source), prompt="x", seed=5, num_inference_steps=2,
                width=256, height=256)
    assert "memory_levers" not in small and "warnings" not in small


def test_a_job_that_cannot_fit_is_refused_before_any_gpu_work(small_gpu_worker):
    out = run(small_gpu_worker, operation="decompose", image_base64=png_b64(sample_image()), layers=10,
              resolution=1024, num_inference_steps=2)
    assert re.fullmatch(r"layers: 10 layers at resolution 1024 need about 6 GiB of GPU memory beyond the weights; "
                        r"this worker has \d GiB \(cpu, \d GiB; memory mode resident, [^)]+\); "
                        r"use at most 9 layers, or resolution 640", out["error"]), out
    assert not small_gpu_worker.host.layered_loaded  # refused before Layered was even loaded


def test_a_split_that_cannot_fit_is_refused_naming_split_before_any_gpu_work(small_gpu_worker):
    out = run(small_gpu_worker, operation="decompose", image_base64=png_b64(sample_image()), layers=3,
              resolution=1024, num_inference_steps=2, split=[{"layer": 1, "layers": 10}])
    assert re.fullmatch(r"split: 3 layers at resolution 1024 and a split into 10 need about 6 GiB of GPU memory "
                        r"beyond the weights; this worker has \d GiB \(cpu, \d GiB; memory mode resident, [^)]+\); "
                        r"split into at most 9 layers, or resolution 640", out["error"]), out
    assert not small_gpu_worker.host.layered_loaded  # refused before Layered was even loaded


def test_an_out_of_memory_error_is_retried_once_with_every_lever(worker):
    """A CUDA out-of-memory error raised in the transformer's first pass (the CPU cannot run
    out for real): the edit runs again with every lever an edit has (VAE tiling; decoding
    layers one at a time is a decomposition's), and says so."""
    raised = []

    def out_of_memory_once(module, args, kwargs):
        if not raised:
            raised.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = worker.host.edit.transformer.register_forward_pre_hook(out_of_memory_once, with_kwargs=True)
    try:
        out = run(worker, image_base64=png_b64(sample_image()), prompt="x", seed=2, num_inference_steps=2,
                  width=256, height=256)
    finally:
        handle.remove()
    assert out["success"] is True and out["memory_levers"] == ["vae_tiling"]
    assert all("the first attempt ran out of GPU memory" in warning for warning in out["warnings"])
    again = run(worker, image_base64=png_b64(sample_image()), prompt="x", seed=2, num_inference_steps=2,
                width=256, height=256)
    assert "memory_levers" not in again


def test_a_second_out_of_memory_error_asks_for_a_fresh_worker(worker):
    def always_out_of_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = worker.host.edit.transformer.register_forward_pre_hook(always_out_of_memory, with_kwargs=True)
    try:
        out = run(worker, image_base64=png_b64(sample_image()), prompt="x", num_inference_steps=2,
                  width=256, height=256)
    finally:
        handle.remove()
    assert out["refresh_worker"] is True and out["error"].startswith("inference: CUDA out of memory")
