"""A worker's start, from process start to ready for the first job, cold and warm
compile cache (COMPILE_CACHE_DIR, src/models/compile_cache.py), split by stage.

    QUANTIZE=fp8 COMPILE=true python tools/start_bench.py --preload edit,lightning --out bench/results \\
        --label start-fp8-edit-lightning

Each start is a new process running `tools/bench.py --start-only` (the full-size models
built in memory with random weights, then prepared, warmed up and their LoRA set held
ready exactly as the worker does), first with an empty compile cache folder (cold), then
with what that start saved (warm). Each gets its own empty Inductor and Triton cache
folders, as a new worker on another machine has: what a warm start finds is only what
the volume's compile cache gave it. The weights are not read from disk here (nothing can
be downloaded on the GPU machine, and the device disk holds one FP8 edit set at most):
`stages_s.read` is null, and docs/performance.md gives the reading measured apart.

Writes `<out>/<gpu>-<date>-<label>.json` with a list `starts` of {label, settings,
compile_cache, ready_s, stages_s}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_results import write_results  # noqa: E402

SETTINGS = ("QUANTIZE", "COMPILE", "ATTENTION_BACKEND", "FP8_KEEP_BF16", "LIGHTNING_RESIDENT_STEPS")


def one_start(label: str, env: dict[str, str], work: Path, bench_args: list[str]) -> dict:
    """One new process to ready; its stages from the results it writes."""
    out = work / label
    started = time.time()
    process = subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--start-only", "--out",
                              str(out), "--label", label, *bench_args],
                             env={**env, "START_BENCH_T0": str(started)}, check=False)
    if process.returncode != 0:
        return {"label": label, "error": f"exit status {process.returncode}"}
    result = json.loads(next(out.glob("*.json")).read_text())
    stages = {"imports": result["imported_at"] - started, "read": None,
              "build_quantize_move": result["build_s"], "compile_and_warm_up": result["warmup_s"],
              "lora_preparation": result["loras_prepare_s"], "compile_cache_save": result["compile_cache_save_s"]}
    return {"label": label, "gpu": result["gpu"], "torch": result["torch"],
            "settings": {**{key: env[key] for key in SETTINGS if key in env}, "PRELOAD": ",".join(result["preload"])},
            "compile_cache": result["compile_cache"], "ready_s": round(result["ready_at"] - started, 1),
            "stages_s": {name: None if value is None else round(value, 1) for name, value in stages.items()},
            "memory_mode": result["memory_mode"], "swap_transformers": result["swap_transformers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preload", default="edit,lightning")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="start")
    parser.add_argument("--gpu-memory-gib", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="start-bench-"))
    env = {**os.environ, "PRELOAD": args.preload, "COMPILE_CACHE_DIR": str(work / "volume-compile-cache")}
    bench_args = ["--gpu-memory-gib", args.gpu_memory_gib] if args.gpu_memory_gib else []
    starts = []
    for state in ("cold", "warm"):
        # A machine of its own: empty local compile caches (the volume's folder is shared).
        local = work / f"local-{state}"
        start_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(local / "inductor"),
                     "TRITON_CACHE_DIR": str(local / "triton")}
        start = one_start(f"{args.label}-{state}", start_env, work, bench_args)
        starts.append(start)
        print(json.dumps(start), flush=True)
    results = {"gpu": next((s["gpu"] for s in starts if "gpu" in s), "unknown"), "label": args.label,
               "date": datetime.date.today().isoformat(), "starts": starts}
    write_results(results, Path(args.out))


if __name__ == "__main__":
    main()
