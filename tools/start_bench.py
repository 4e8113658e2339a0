"""A worker's start, from process start to ready for the first job, cold and warm
compile cache (COMPILE_CACHE_DIR, src/models/compile_cache.py), split by stage.

    QUANTIZE=fp8 COMPILE=true python tools/start_bench.py --preload edit,lightning --out bench/results \\
        --label start-fp8-edit-lightning
    python tools/disk_weights.py --hf-home /tmp/hf-disk --precision fp8
    QUANTIZE=fp8 COMPILE=true python tools/start_bench.py --from-disk /tmp/hf-disk --preload edit,lightning \\
        --label start-disk-fp8-edit-lightning

Each start is a new process, first with an empty compile cache folder (cold), then with
what that start saved (warm); without COMPILE=true one start (compile cache "off"). Each
gets its own empty Inductor and Triton cache folders, as a new worker on another machine
has: what a warm start finds is only what the volume's compile cache gave it.

Without --from-disk the process is `tools/bench.py --start-only`: the full-size models built
in memory with random weights, then prepared, warmed up and their LoRA set held ready
exactly as the worker does; nothing is read, so `stages_s.read` is null.

With --from-disk HF_HOME (a layout tools/disk_weights.py wrote: full-size random weights in
the HF cache, on local disk) the process is `tools/handler_start.py`: handler.py's own
start with HF_HOME there, stopped where it would start serving. Before each start the
layout's files and the compile cache's are dropped from the page cache (fsync, then
posix_fadvise DONTNEED per file): the weights come off the disk. `stages_s.read` is the
span the weight files were being read in: from handler.py's early read-ahead, during the
imports, to the load's last read (overlapping `imports`, `load` and `quantize_move`).

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

SETTINGS = ("QUANTIZE", "COMPILE", "ATTENTION_BACKEND", "FP8_KEEP_BF16", "LIGHTNING_RESIDENT_STEPS",
            "WEIGHTS_PREFETCH", "FP8_CACHE", "MEMORY_MODE", "DEVICE")


def drop_from_page_cache(*folders: Path) -> int:
    """Every file under `folders` written out and dropped from the page cache; returns their bytes."""
    os.sync()
    total = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                total += path.stat().st_size
    return total


def start_from_disk(label: str, env: dict[str, str], work: Path, hf_home: Path) -> dict:
    """One new process through handler.py's start, reading the weights from `hf_home` cold."""
    out = work / f"{label}.json"
    dropped = drop_from_page_cache(hf_home, Path(env["COMPILE_CACHE_DIR"]))
    started = time.time()
    process = subprocess.run([sys.executable, str(Path(__file__).parent / "handler_start.py"), "--out", str(out)],
                             env={**env, "HF_HOME": str(hf_home), "START_BENCH_T0": str(started)}, check=False)
    if process.returncode != 0:
        return {"label": label, "error": f"exit status {process.returncode}"}
    result = json.loads(out.read_text())
    settings = {key: env[key] for key in SETTINGS if key in env}
    return {"label": label, **result, "settings": {**settings, "PRELOAD": ",".join(result.pop("preload"))},
            "page_cache_dropped_gb": round(dropped / 1e9, 1)}


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
            "memory_mode": result["memory_mode"], "swap_transformers": result["swap_transformers"],
            "warm_passes": result["warm_passes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preload", default="edit,lightning")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="start")
    parser.add_argument("--gpu-memory-gib", default=None)
    parser.add_argument("--from-disk", type=Path, default=None, metavar="HF_HOME",
                        help="start through handler.py, reading the weights tools/disk_weights.py wrote there")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="start-bench-"))
    env = {**os.environ, "PRELOAD": args.preload, "COMPILE_CACHE_DIR": str(work / "volume-compile-cache")}
    (work / "volume-compile-cache").mkdir()
    if args.gpu_memory_gib:
        env["GPU_MEMORY_GIB"] = args.gpu_memory_gib
    bench_args = ["--gpu-memory-gib", args.gpu_memory_gib] if args.gpu_memory_gib else []
    states = ("cold", "warm") if env.get("COMPILE", "").lower() in ("true", "1", "yes", "on") else ("off",)
    results = {"gpu": "unknown", "label": args.label, "date": datetime.date.today().isoformat(), "starts": []}
    if args.from_disk:
        layout = args.from_disk / "disk-layout.json"
        results["disk_layout"] = json.loads(layout.read_text()) if layout.exists() else None
    for state in states:
        # A machine of its own: empty local compile caches (the volume's folder is shared).
        local = work / f"local-{state}"
        start_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(local / "inductor"),
                     "TRITON_CACHE_DIR": str(local / "triton")}
        label = f"{args.label}-{state}"
        start = (start_from_disk(label, start_env, work, args.from_disk) if args.from_disk
                 else one_start(label, start_env, work, bench_args))
        results["starts"].append(start)
        results["gpu"] = start.get("gpu", results["gpu"])
        print(json.dumps(start), flush=True)
        write_results(results, Path(args.out))  # after each start: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
