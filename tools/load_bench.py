"""Start-up from disk on a GPU: how long the full-size edit transformer (random bf16
weights, 41 GB) takes to come off local disk onto the GPU, against the time it takes
just to read those bytes.

    python tools/load_bench.py --dir /tmp/load-bench --out bench/results

Saves the transformer as diffusers does (safetensors shards), drops the files from the
page cache before every read (posix_fadvise DONTNEED: each read is cold), then times:
a plain sequential read of the files; diffusers' from_pretrained on the CPU followed by
`.to("cuda")` (safetensors memory-mapped, as the worker loads); the same with
`disable_mmap=True` (whole shards read sequentially); the same after a prefetch has
read the files into the page cache first; the worker's way with WEIGHTS_PREFETCH
(src/weights.py: the read-ahead thread running while it loads); and
`device_map="cuda"` (tensors straight to the GPU). `--runs` picks some of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.weights import prefetch, read_ahead, read_through, weight_files  # noqa: E402
from tools.bench_results import write_results  # noqa: E402


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cached_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def timed(label: str, folder: Path, action) -> dict:
    drop_from_page_cache(folder)
    cached_before = cached_gib()
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = action()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del result
    torch.cuda.empty_cache()
    record = {"how": label, "seconds": round(seconds, 2), "page_cache_gib_before": round(cached_before, 1)}
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    from diffusers import QwenImageTransformer2DModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/load-bench")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--runs", default="read,mmap,no_mmap,prefetch,read_ahead,device_map",
                        help="comma list of: read, mmap, no_mmap, prefetch, read_ahead, device_map")
    parser.add_argument("--label", default="load", help="names the results file")
    args = parser.parse_args()
    folder = Path(args.dir) / "transformer"

    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = QwenImageTransformer2DModel(zero_cond_t=True)
    torch.set_default_dtype(previous)
    model.save_pretrained(folder, max_shard_size="10GB")
    del model
    torch.cuda.empty_cache()
    drop_from_page_cache(folder)
    size = sum(path.stat().st_size for path in folder.rglob("*.safetensors"))
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "label": args.label,
               "bytes": size, "save_s": round(time.perf_counter() - start, 1), "runs": []}
    print(json.dumps(results), flush=True)

    def load(**kwargs):
        return QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, **kwargs)

    def prefetched_load():
        prefetch(weight_files(folder))
        return load().to("cuda")

    def read_ahead_load():
        reading = read_ahead(weight_files(folder))
        model = load().to("cuda")
        reading.result()
        return model

    runs = {  # key (for --runs): (label, action)
        "read": ("plain sequential read", lambda: sum(read_through(path) for path in weight_files(folder))),
        "mmap": ("from_pretrained (mmap) + .to(cuda), no read-ahead", lambda: load().to("cuda")),
        "no_mmap": ("from_pretrained(disable_mmap=True) + .to(cuda)", lambda: load(disable_mmap=True).to("cuda")),
        "prefetch": ("prefetch first, then from_pretrained (mmap) + .to(cuda)", prefetched_load),
        "read_ahead": ("WEIGHTS_PREFETCH: read-ahead thread during from_pretrained (mmap) + .to(cuda)",
                       read_ahead_load),
        "device_map": ('from_pretrained(device_map="cuda")', lambda: load(device_map="cuda")),
    }
    for label, action in (runs[key] for key in args.runs.split(",")):
        record = timed(label, folder, action)
        record["gb_per_s"] = round(size / record["seconds"] / 1e9, 2)
        results["runs"].append(record)
        write_results(results, Path(args.out))
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
