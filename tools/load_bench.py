"""Start-up from disk on a GPU: how long the full-size edit transformer (random bf16
weights, 41 GB) takes to come off local disk onto the GPU, against the time it takes
just to read those bytes.

    python tools/load_bench.py --dir /tmp/load-bench --out bench/results

Saves the transformer as diffusers does (safetensors shards), drops the files from the
page cache before every read (posix_fadvise DONTNEED: each read is cold), then times:
a plain sequential read of the files; diffusers' from_pretrained on the CPU followed by
`.to("cuda")` (what the worker does: safetensors memory-mapped); the same with
`disable_mmap=True` (whole shards read sequentially); the worker's way after
WEIGHTS_PREFETCH (src/weights.py) has read the files into the page cache; and
`device_map="cuda"` (tensors straight to the GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.weights import prefetch, read_through, weight_files  # noqa: E402


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
               "date": datetime.date.today().isoformat(), "label": "load",
               "bytes": size, "save_s": round(time.perf_counter() - start, 1), "runs": []}
    print(json.dumps(results), flush=True)

    def load(**kwargs):
        return QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, **kwargs)

    def prefetched_load():
        prefetch(weight_files(folder))
        return load().to("cuda")

    runs = [
        ("plain sequential read", lambda: sum(read_through(path) for path in weight_files(folder))),
        ("from_pretrained (mmap) + .to(cuda): the worker", lambda: load().to("cuda")),
        ("from_pretrained(disable_mmap=True) + .to(cuda)", lambda: load(disable_mmap=True).to("cuda")),
        ("WEIGHTS_PREFETCH, then from_pretrained (mmap) + .to(cuda)", prefetched_load),
        ('from_pretrained(device_map="cuda")', lambda: load(device_map="cuda")),
    ]
    for label, action in runs:
        record = timed(label, folder, action)
        record["gb_per_s"] = round(size / record["seconds"] / 1e9, 2)
        results["runs"].append(record)
        write(results, Path(args.out))
    shutil.rmtree(args.dir)


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", results["gpu"]).strip("-").lower()
    (out_dir / f"{gpu}-{results['date']}-load.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
