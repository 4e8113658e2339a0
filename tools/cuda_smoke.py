"""The worker's job path on a CUDA GPU with the tiny models: bf16 loading, the edit,
multi-image and decompose jobs, several results per job (each equal to its single job),
transformer swapping, fidelity to direct calls, the
streamed memory modes (same images as resident), the PRELOAD Lightning set held on the
GPU (the same image as fused on the spot; the base model's after) and QUANTIZE=fp8 (runs;
its pixel difference from bf16 is reported).

    python tools/cuda_smoke.py --hf-home /tmp/tiny-hf [--report smoke.json]

Exits non-zero on the first failed check. Complements the CPU suite, which cannot
see CUDA placement or bf16.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.job.codec import png_base64  # noqa: E402
from src.plumbing.config import Settings  # noqa: E402
from src.serving.worker import Worker  # noqa: E402
from src.serving.startup import start_worker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-home", required=True)
    parser.add_argument("--report", default=None)
    args = parser.parse_args()
    subprocess.run([sys.executable, "tools/make_tiny_models.py", "--hf-home", args.hf_home], check=True)
    subprocess.run([sys.executable, "tools/make_tiny_loras.py", "--out", str(Path(args.hf_home) / "loras"),
                    "--hf-home", args.hf_home], check=True)  # the Lightning files, in the HF cache

    worker = start_worker(Settings.from_env({"HF_HOME": args.hf_home, "DEVICE": "cuda",
                                             "PRELOAD": "edit,layered", "TRANSFORMER_SWAP": "always"}))
    host = worker.host
    source = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    report: dict = {"device": torch.cuda.get_device_name(), "startup_s": worker.startup_s, "jobs": []}

    def job(name: str, **job_input) -> dict:
        out = worker.handle({"id": name, "input": job_input})
        assert "error" not in out, out
        placement = {"edit": str(host.edit.transformer.device), "layered": str(host.layered().transformer.device)}
        report["jobs"].append({"job": name, "timings_ms": out["timings_ms"], "transformers": placement})
        return out

    edit_input = dict(operation="edit", image_base64=png_base64(source), prompt="x", seed=3, return_base64=True,
                      num_inference_steps=2, width=256, height=256)
    decompose_input = dict(operation="decompose", image_base64=png_base64(source), prompt="a scene", layers=2,
                           num_inference_steps=2, seed=3, return_base64=True)
    edit = job("edit", **edit_input)
    assert host.edit.transformer.device.type == "cuda" and host.layered().transformer.device.type == "cpu"
    decompose = job("decompose", **decompose_input)
    assert host.layered().transformer.device.type == "cuda" and host.edit.transformer.device.type == "cpu"
    again = job("edit-again", operation="edit", image_base64=png_base64(source), prompt="x", seed=3,
                return_base64=True, num_inference_steps=2, width=256, height=256)
    assert host.edit.transformer.device.type == "cuda"
    several_input = {**edit_input, "prompt": ["x", "y"], "num_images": 2}
    several = job("several", **several_input)
    singles = [job(f"single-{k}", **{**edit_input, "prompt": several_input["prompt"][entry["prompt_index"]],
                                     "seed": entry["seed"]})
               for k, entry in enumerate(several["images"])]
    report["several_results_equal_singles"] = all(
        entry["base64"] == single["images"][0]["base64"] for entry, single in zip(several["images"], singles))
    job("edit-multi", operation="edit_multi", image_base64=png_base64(source), images_base64=[png_base64(source)],
        prompt="x", seed=3, num_inference_steps=2, width=256, height=256)

    direct = host.edit(image=[source], prompt="x", negative_prompt=" ", true_cfg_scale=4.0, guidance_scale=1.0,
                        num_inference_steps=2, width=256, height=256,
                        generator=torch.Generator("cpu").manual_seed(3)).images[0]
    got = Image.open(io.BytesIO(base64.b64decode(edit["edited_image_base64"]))).convert("RGB")
    report["fidelity_equal"] = got.tobytes() == direct.tobytes()
    report["repeat_equal"] = edit["edited_image_base64"] == again["edited_image_base64"]
    report["dtype"] = str(host.edit.transformer.dtype)

    def images(out: dict) -> list[str]:
        assert "error" not in out, out
        return [entry["base64"] for entry in out["images"]]

    def fresh_worker(**env) -> Worker:  # the tiny models: the earlier workers may stay
        torch.cuda.reset_peak_memory_stats()
        return start_worker(Settings.from_env({"HF_HOME": args.hf_home, "DEVICE": "cuda", **env}))

    report["memory_modes"] = {}
    for mode in ("text_offload", "offload"):
        other = fresh_worker(MEMORY_MODE=mode, PRELOAD="edit,layered")
        report["memory_modes"][mode] = {
            "edit_equal": images(other.handle({"id": f"{mode}-edit", "input": edit_input})) == images(edit),
            "decompose_equal": images(other.handle({"id": f"{mode}-dec", "input": decompose_input})) == images(decompose),
            "several_equal": images(other.handle({"id": f"{mode}-several", "input": several_input})) == images(several),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    # The PRELOAD Lightning set held on the GPU (the plan has room for the tiny models): a
    # switch points the layers at the fused copy and back. Its image must equal the same set
    # fused on the spot, and the base model's the one before.
    held = fresh_worker(PRELOAD="edit,lightning")
    lightning_input = {**{k: v for k, v in edit_input.items() if k != "num_inference_steps"}, "lightning": 4}
    base_before = images(held.handle({"id": "held-base", "input": edit_input}))
    lightning = images(held.handle({"id": "held-lightning", "input": lightning_input}))
    base_after = images(held.handle({"id": "held-base-again", "input": edit_input}))
    fused = fresh_worker(LIGHTNING_RESIDENT_STEPS="0", LORA_FUSE_AFTER="1")
    report["lightning_held_ready"] = {
        "held_on": held.host.loras.resident.where,
        "lightning_equal_fused_on_the_spot": lightning == images(fused.handle({"id": "fused", "input": lightning_input})),
        "base_equal_after_switching_back": base_after == base_before,
        "base_equal_bf16_edit": base_before == images(edit)}
    if torch.cuda.get_device_capability() >= (8, 9):
        fp8 = fresh_worker(QUANTIZE="fp8").handle({"id": "fp8-edit", "input": edit_input})
        fp8_pixels = Image.open(io.BytesIO(base64.b64decode(images(fp8)[0]))).convert("RGB")
        difference = [abs(a - b) for a, b in zip(fp8_pixels.tobytes(), got.tobytes())]
        report["fp8_vs_bf16"] = {"max_abs_8bit": max(difference), "mean_abs_8bit": sum(difference) / len(difference)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    assert report["fidelity_equal"] and report["repeat_equal"] and report["several_results_equal_singles"], \
        "outputs differ"
    assert all(all(v for k, v in checks.items() if k.endswith("_equal")) for checks in report["memory_modes"].values()), \
        "a memory mode changed the images"
    held_ready = report["lightning_held_ready"]
    assert held_ready.pop("held_on") == "device" and all(held_ready.values()), "the held-ready Lightning set changed images"
    print("cuda smoke: all checks passed")


if __name__ == "__main__":
    main()
