"""One worker across several ranks (src/serving/parallel.py): start-up, jobs, a refused job, shutdown.

    python tools/parallel_check.py --hf-home .cache/hf --ranks 2 --device cpu --out /tmp/cp2
    python tools/parallel_check.py --hf-home /tmp/tiny-hf --ranks 2 --out /tmp/cp2    # 2 GPUs
    python tools/parallel_check.py --hf-home /tmp/tiny-hf --ranks 1 --out /tmp/cp1    # the baseline

Runs, in this order: an edit with a fixed seed (saved as edit.png), a job with a bad
input (refused on rank 0, the other ranks never see it), the jobs of `--extra-jobs` (a
JSON object of name to job input; their answers go into the report), the same edit
again (it must give the same bytes), then shuts the ranks down. `--ranks 1` runs the same jobs on a
plain worker, for the single-GPU image to compare with. Writes report.json (times,
errors, how many image tokens rank 0's attention got against the whole sequence, the
exit codes of the other ranks) and the input image. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.job.codec import png_base64  # noqa: E402
from src.plumbing.config import Settings  # noqa: E402

PROMPT = "a red hat"
SEED = 1234


def input_image() -> Image.Image:
    """A gradient with a block: structure for the edit to work on."""
    image = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    image.paste((0, 200, 60), (24, 16, 48, 32))
    return image


def watch_tokens(transformer, seen: dict) -> None:
    """Record the image tokens the first block's attention gets on this rank, and the
    whole sequence the transformer returns (gathered back from all ranks)."""
    def before_attention(module, args, kwargs):
        seen["local_image_tokens"] = int(kwargs["hidden_states"].shape[1])

    def after_transformer(module, args, output):
        seen["image_tokens"] = int(output[0].shape[1])

    transformer.transformer_blocks[0].attn.register_forward_pre_hook(before_attention, with_kwargs=True)
    transformer.register_forward_hook(after_transformer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-home", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=256, help="output width and height")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--extra-jobs", default=None, help="JSON file: {name: job input}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank0 %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"HF_HOME": args.hf_home, "DEVICE": args.device, "PARALLEL": str(args.ranks),
           "LORA_CACHE_DIR": str(out / "lora-cache"),
           "ALLOW_PRIVATE_URLS": "true"}  # its jobs' buckets are on loopback
    settings = Settings.from_env(env)
    from src.models.files.early_read import read_at_start

    early_read = read_at_start(settings)  # as handler.py: begun before the imports, read by rank 0 alone
    import diffusers
    import torch
    import transformers

    from src.serving.parallel import Leader, ParallelPlan, StartFailed
    from src.serving.startup import start_worker

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    plan = ParallelPlan.for_settings(settings, torch.cuda.device_count())
    report: dict = {"ranks": plan.world_size, "device_type": plan.device_type, "jobs": {}}

    start = time.perf_counter()
    try:
        leader = Leader.launch(settings, plan, early_read) if plan.enabled else None
    except StartFailed as exc:
        print(f"start failed: {exc}", file=sys.stderr)
        return 2
    worker = leader.worker if leader else start_worker(settings, early_read)
    handle = leader.handle if leader else worker.handle
    report["start_s"] = round(time.perf_counter() - start, 2)
    report["startup_s"] = {stage: round(seconds, 2) for stage, seconds in worker.startup_s.items()}
    report["rank0_prefetched"] = worker.host.prefetched
    seen: dict = {}
    watch_tokens(worker.host.edit.transformer, seen)

    source = input_image()
    source.save(out / "input.png")
    edit = {"operation": "edit", "image_base64": png_base64(source), "prompt": PROMPT, "seed": SEED,
            "num_inference_steps": args.steps, "width": args.size, "height": args.size, "return_base64": True}
    extra = json.loads(Path(args.extra_jobs).read_text()) if args.extra_jobs else {}
    jobs = {"edit": edit, "bad_input": {**edit, "num_inference_steps": 0}, **extra, "edit_again": edit}
    images: dict[str, bytes] = {}
    for name, job_input in jobs.items():
        start = time.perf_counter()
        result = handle({"id": name, "input": job_input})
        entry = {"wall_s": round(time.perf_counter() - start, 2)}
        if "error" in result:
            entry["error"] = result["error"]
        else:
            images[name] = base64.b64decode(result["edited_image_base64"])
            entry.update(sha256=hashlib.sha256(images[name]).hexdigest(), timings_ms=result["timings_ms"])
        report["jobs"][name] = entry
    report["tokens"] = seen
    if "edit" in images:
        (out / "edit.png").write_bytes(images["edit"])

    start = time.perf_counter()
    report["follower_pids"] = [process.pid for process in leader.followers] if leader else []
    report["follower_exit_codes"] = leader.shutdown() if leader else []
    report["shutdown_s"] = round(time.perf_counter() - start, 2)

    checks = {
        "edit ran": "edit" in images,
        "bad input refused": "num_inference_steps" in report["jobs"]["bad_input"].get("error", ""),
        "the next job ran, with the same bytes": images.get("edit_again") == images.get("edit") is not None,
        "other ranks exited with 0": all(code == 0 for code in report["follower_exit_codes"]),
        # WEIGHTS_PREFETCH (on by default): one read, the early one, which rank 0's load took over.
        "rank 0's load took the early read over": len(worker.host.prefetched) == (early_read is not None),
    }
    if plan.enabled and seen:
        # Ulysses: each rank's attention gets its share of the tokens (the first ranks
        # one more when the count does not divide).
        checks["rank 0 got its share of the image tokens"] = (
            seen["local_image_tokens"] == -(-seen["image_tokens"] // plan.world_size))
    report["checks"] = checks
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
