"""How LoRA sets switch (src/models/lora/switch.py): unfused branches equal diffusers' own unfused
LoRA loading, fused equals diffusers' fuse, the two differ by rounding only (the figure
docs/loras.md quotes); a set fuses after LORA_FUSE_AFTER jobs in a row; the PRELOAD Lightning
set is held ready (beside the weights where the memory plan has room, else in CPU memory)
and switched in; the base model stays bit-identical through all of it;
the padded layout (COMPILE=true) swaps sets without recompiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.models.acceleration import regional_compile
from src.models.memory import plan as memory_plan
from src.models.lora.branches import LoraBranches
from src.plumbing.config import ConfigError, Settings
from src.serving.startup import start_worker
from tests.conftest import edit_hat, edited_pixels, reference_edit_pipeline, sample_image

CUSTOM = "tiny_lora_diffusers.safetensors"


@pytest.fixture(scope="module")
def switching_worker(worker_env):
    """Fuses a set on its third job in a row; Lightning 4 held ready from the start."""
    return start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,lightning", "LORA_FUSE_AFTER": "3"}))


def edit(worker, **extra) -> dict:
    return edit_hat(worker, "switch", **extra)


pixels = edited_pixels


def direct(pipeline, steps=2, cfg=4.0) -> np.ndarray:
    image = pipeline(image=[sample_image()], prompt="a hat", negative_prompt=" ", true_cfg_scale=cfg,
                     guidance_scale=1.0, num_inference_steps=steps, width=256, height=256,
                     generator=torch.Generator("cpu").manual_seed(5)).images[0]
    return np.asarray(image.convert("RGB")).astype(int)


def state(transformer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in transformer.state_dict().items()}


def test_a_set_runs_unfused_then_fuses_on_its_third_job_and_the_base_comes_back_exact(
        switching_worker, lora_dir, guarantee_figures):
    worker, switch = switching_worker, switching_worker.host.loras
    base_job = edit(worker)
    base_state = state(worker.host.edit.transformer)
    lora = {"source": str(lora_dir / CUSTOM), "scale": 0.8}

    first = edit(worker, loras=[lora])
    assert switch.mode == "unfused" and first["timings_ms"]["lora"] >= 0
    reference = reference_edit_pipeline(worker.host.edit_ref.path)  # diffusers' own unfused LoRA
    reference.load_lora_weights(str(lora_dir / CUSTOM), adapter_name="check")
    reference.set_adapters(["check"], adapter_weights=[0.8])
    assert np.array_equal(pixels(first), direct(reference))

    second = edit(worker, loras=[lora])
    assert switch.mode == "unfused" and "lora" not in second["timings_ms"]
    assert np.array_equal(pixels(second), pixels(first))

    third = edit(worker, loras=[lora])
    assert switch.mode == "fused" and third["timings_ms"]["lora"] > 0
    reference.fuse_lora(adapter_names=["check"], lora_scale=1.0)  # diffusers' own fuse
    assert np.array_equal(pixels(third), direct(reference))
    difference = np.abs(pixels(third) - pixels(first))
    assert difference.max() <= 2, difference.max()  # float32: fused and unfused differ by rounding
    guarantee_figures["lora_unfused_vs_fused_float32_mean_abs_8bit"] = round(float(difference.mean()), 4)
    guarantee_figures["lora_unfused_vs_fused_float32_max_abs_8bit"] = int(difference.max())

    fourth = edit(worker, loras=[lora])
    assert switch.mode == "fused" and "lora" not in fourth["timings_ms"]  # stays fused while it keeps coming
    back = edit(worker)
    assert switch.mode == "base" and np.array_equal(pixels(back), pixels(base_job))
    after = state(worker.host.edit.transformer)
    assert all(torch.equal(after[k], base_state[k]) for k in base_state)


def test_another_set_or_a_base_job_between_restarts_the_count(switching_worker, lora_dir):
    worker, switch = switching_worker, switching_worker.host.loras
    lora = {"source": str(lora_dir / CUSTOM), "scale": 0.5}
    for extra in ({"loras": [lora]}, {"loras": [lora]}, {}, {"loras": [lora]}, {"loras": [{**lora, "scale": 0.6}]},
                  {"loras": [lora]}, {"loras": [lora]}):
        edit(worker, **extra)
        assert switch.mode == ("base" if not extra else "unfused")
    edit(worker, loras=[lora])
    assert switch.mode == "fused"
    edit(worker)


def test_the_preloaded_lightning_set_is_held_ready_and_equals_the_fused_one(switching_worker, hf_home):
    """No memory plan (the CPU without GPU_MEMORY_GIB): held in CPU memory, copied in."""
    assert switching_worker.host.loras.resident.where == "host"
    check_the_held_ready_set(switching_worker, hf_home)


def test_with_room_in_the_plan_the_set_is_held_beside_the_weights_and_switched_by_pointing(worker_env, hf_home):
    """A plan with room (GPU_MEMORY_GIB, tiny weights): the fused copy stays on the device
    and a switch points the layers at it and back; the base weights never move."""
    worker = start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,lightning", "GPU_MEMORY_GIB": "400",
                                             "WARMUP": "false"}))
    switch = worker.host.loras
    assert switch.resident.where == "device"
    assert switch.device_copy_bytes() == switch.resident.held_bytes > 0
    addresses = {name: p.data_ptr() for name, p in worker.host.edit.transformer.named_parameters()}
    check_the_held_ready_set(worker, hf_home)
    assert {name: p.data_ptr() for name, p in worker.host.edit.transformer.named_parameters()} == addresses


def test_a_job_that_needs_the_room_has_the_device_copy_released_first_and_the_set_comes_back(worker_env):
    """A budget where the largest decomposition fits only without the held copy beside it:
    that job runs as it is (no lever) after the copy is released, edits never release it,
    and the next Lightning job stages it again, with the same image."""
    probe = start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,lightning", "GPU_MEMORY_GIB": "400",
                                            "WARMUP": "false"}))
    held, plan = probe.host.loras.device_copy_bytes(), probe.host.plan
    fixed = 400 * memory_plan.GIB - plan.budget_bytes  # the weights and the reserve
    capacity = fixed + plan.job_bytes(memory_plan.LARGEST_DECOMPOSE) + held // 2
    worker = start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,lightning", "WARMUP": "false",
                                             "GPU_MEMORY_GIB": repr(capacity / memory_plan.GIB)}))
    switch, host = worker.host.loras, worker.host
    assert switch.device_copy_bytes() == held
    lightning = edit(worker, lightning=4, num_inference_steps=None)
    assert switch.mode == "resident"
    assert host.levers_for(memory_plan.LARGEST_EDIT, "width") == () and switch.device_copy_bytes() == held
    assert host.levers_for(memory_plan.LARGEST_DECOMPOSE, "layers") == ()  # as it is, out of the whole budget
    assert switch.device_copy_bytes() == 0 and switch.mode == "base"  # released, the base weights back first
    base = edit(worker)
    again = edit(worker, lightning=4, num_inference_steps=None)
    assert switch.device_copy_bytes() == held and again["timings_ms"]["lora"] >= 0
    assert np.array_equal(pixels(again), pixels(lightning))
    assert np.array_equal(pixels(edit(worker)), pixels(base))


def test_without_room_for_every_edit_the_set_stays_in_cpu_memory(worker_env):
    """A plan the extra copy would squeeze (the largest edit would need a lever): CPU memory."""
    worker = start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,lightning", "GPU_MEMORY_GIB": "6.5",
                                             "WARMUP": "false"}))
    assert worker.host.loras.resident.where == "host"


def check_the_held_ready_set(worker, hf_home) -> None:
    switch = worker.host.loras
    assert switch.resident is not None and switch.resident.linears > 0
    assert worker.startup_s["loras"] > 0
    base_state = state(worker.host.edit.transformer)
    base_job = edit(worker)
    lightning = edit(worker, lightning=4, num_inference_steps=None)
    assert switch.mode == "resident" and lightning["timings_ms"]["lora"] >= 0
    # The same weights as diffusers' own fuse of the file, with the authors' scheduler.
    from diffusers import FlowMatchEulerDiscreteScheduler

    from src.models.lora.adapters import LIGHTNING_SCHEDULER_CONFIG

    reference = reference_edit_pipeline(worker.host.edit_ref.path)
    path = next(hf_home.glob(f"hub/models--lightx2v--*/snapshots/*/{worker.settings.lightning_files[4]}"))
    reference.load_lora_weights(str(path), adapter_name="lightning")
    reference.fuse_lora(adapter_names=["lightning"], lora_scale=1.0)
    reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    assert np.array_equal(pixels(lightning), direct(reference, steps=4, cfg=1.0))
    eight = edit(worker, lightning=8, num_inference_steps=None)  # not held ready: unfused
    assert switch.mode == "unfused" and eight["lightning"]["steps"] == 8
    again = edit(worker, lightning=4, num_inference_steps=None)
    assert np.array_equal(pixels(again), pixels(lightning))
    assert np.array_equal(pixels(edit(worker)), pixels(base_job))
    after = state(worker.host.edit.transformer)
    assert all(torch.equal(after[k], base_state[k]) for k in base_state)


def lightning_and_custom(pipeline, lora_dir, hf_home, settings) -> list:
    import hashlib

    from src.models.lora.sources import LoraFile
    from src.models.lora.adapters import LoraLibrary

    library = LoraLibrary(type(pipeline), pipeline.transformer, settings.edit_model)
    path = next(hf_home.glob(f"hub/models--lightx2v--*/snapshots/*/{settings.lightning_files[4]}"))
    files = [(path, 1.0), (lora_dir / CUSTOM, -0.7)]
    return [library.adapter(LoraFile(str(p), p, hashlib.sha256(p.read_bytes()).hexdigest()), scale, "loras")
            for p, scale in files]


def latents(pipeline) -> torch.Tensor:
    return pipeline(image=[sample_image()], prompt="a hat", negative_prompt=" ", true_cfg_scale=4.0,
                    guidance_scale=1.0, num_inference_steps=2, width=256, height=256, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(5)).images


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_unfused_layouts_and_the_fuse_give_the_same_latents_up_to_rounding(worker, lora_dir, hf_home,
                                                                            guarantee_figures):
    """Lightning and a custom LoRA together on a fresh float32 pipeline: the exact branches,
    COMPILE=true's padded ones (zeros padding the rank, scales folded into B) and diffusers'
    fuse, compared on the final latents; a set of higher rank than the padding does not fit."""
    pipeline = reference_edit_pipeline(worker.host.edit_ref.path)
    base = latents(pipeline)
    chosen = lightning_and_custom(pipeline, lora_dir, hf_home, worker.settings)
    exact = LoraBranches(pipeline.transformer, torch.float32, padded_rank=None)
    exact.activate(chosen)
    exact_latents = latents(pipeline)
    exact.deactivate()
    rank = sum(a.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] for a in chosen)
    assert not LoraBranches(pipeline.transformer, torch.float32, padded_rank=rank - 1).fits(chosen)
    padded = LoraBranches(pipeline.transformer, torch.float32, padded_rank=rank + 3)
    assert padded.fits(chosen)
    padded.activate(chosen)
    padded_latents = latents(pipeline)
    padded.activate_empty()  # zeros: the base model's output, exactly
    assert torch.equal(latents(pipeline), base)
    padded.deactivate()
    for adapter in chosen:
        pipeline.load_lora_weights(dict(adapter.state_dict), adapter_name=adapter.name)
    pipeline.set_adapters([a.name for a in chosen], adapter_weights=[a.scale for a in chosen])
    pipeline.fuse_lora(adapter_names=[a.name for a in chosen], lora_scale=1.0)
    pipeline.unload_lora_weights()
    fused = latents(pipeline)
    effect = relative(fused, base)  # what the LoRAs change, for scale
    figures = {"exact_vs_fused": relative(exact_latents, fused), "padded_vs_fused": relative(padded_latents, fused),
               "padded_vs_exact": relative(padded_latents, exact_latents)}
    assert effect > 1e-3 and all(value < 1e-5 for value in figures.values()), (effect, figures)
    guarantee_figures["lora_effect_float32_latents_rel_l2"] = f"{effect:.2e}"
    for name, value in figures.items():
        guarantee_figures[f"lora_{name}_float32_latents_rel_l2"] = f"{value:.1e}"


def test_the_padded_layout_switches_sets_without_recompiling(worker, lora_dir, hf_home):
    """Regional compile (dynamo only, its eager backend: the guards are what matter) of
    the tiny transformer's blocks: the base and the branched structure compile once each;
    switching sets or back to the base compiles nothing more."""
    from torch._dynamo.utils import counters

    pipeline = reference_edit_pipeline(worker.host.edit_ref.path)
    chosen = lightning_and_custom(pipeline, lora_dir, hf_home, worker.settings)
    branches = LoraBranches(pipeline.transformer, torch.float32, padded_rank=64)
    torch._dynamo.reset()
    regional_compile(pipeline.transformer, backend="eager")
    try:
        direct(pipeline, steps=2)
        base_graphs = counters["stats"]["unique_graphs"]
        branches.activate_empty()
        direct(pipeline, steps=2)
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > base_graphs > 0  # the guards see the branches: the warm-up must compile them
        for step in (chosen[:1], chosen[1:], chosen, None, chosen[:1]):
            if step is None:
                branches.deactivate()
            else:
                branches.activate(step)
            direct(pipeline, steps=2)
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        torch._dynamo.reset()


def test_lora_settings_are_checked():
    settings = Settings.from_env({})
    assert (settings.lora_fuse_after, settings.lora_branch_rank, settings.lightning_resident_steps) == (16, 64, 4)
    chosen = Settings.from_env({"LORA_FUSE_AFTER": "0", "LORA_BRANCH_RANK": "128", "LIGHTNING_RESIDENT_STEPS": "8"})
    assert (chosen.lora_fuse_after, chosen.lora_branch_rank, chosen.lightning_resident_steps) == (0, 128, 8)
    with pytest.raises(ConfigError, match="LORA_FUSE_AFTER: -1 is out of range"):
        Settings.from_env({"LORA_FUSE_AFTER": "-1"})
    with pytest.raises(ConfigError, match="LIGHTNING_RESIDENT_STEPS: '6' is not allowed; allowed: 0, 4, 8"):
        Settings.from_env({"LIGHTNING_RESIDENT_STEPS": "6"})
