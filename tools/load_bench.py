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
(src/models/files/tensors.py: the read-ahead thread running while it loads); and
`device_map="cuda"` (tensors straight to the GPU). `--runs` picks some of them.

QUANTIZE=fp8's start, two ways (`--runs read,fp8_quantize,fp8_cache --label load-fp8-cache`):
`fp8_quantize` is today's without a cache (the read-ahead thread, from_pretrained, then
fp8.quantize_blocks onto the GPU with the default FP8_KEEP_BF16); `fp8_cache` loads through the
FP8 cache (src/models/fp8/cache.py), which the bench first writes from the saved shards the way
tools/download_models.py --fp8 does (on the CPU; `build_s`). Each run records the bytes this
process read from disk (/proc/self/io read_bytes). After both, every tensor of the two
transformers is compared bit for bit (`identical`): the CPU-written cache against the GPU's
own quantization. Needs about 55 GB of free disk (41 GB of shards, 14 GB of cache).
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
from src.models.fp8 import linear as fp8# noqa: E402
from src.models.fp8 import cache as fp8_cache# noqa: E402
from src.models.files.tensors import prefetch, read_ahead, read_through, weight_files  # noqa: E402
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


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) has had read from storage: page-cache hits do not count."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def timed(label: str, folder: Path, action, kept: dict | None = None) -> dict:
    """`action` timed from a cold page cache; its result dropped, or kept in `kept` under `label`."""
    drop_from_page_cache(folder)
    cached_before = cached_gib()
    torch.cuda.synchronize()
    read_before = disk_read_bytes()
    start = time.perf_counter()
    result = action()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    read = disk_read_bytes() - read_before
    if kept is not None:
        kept[label] = result
    del result
    torch.cuda.empty_cache()
    record = {"how": label, "seconds": round(seconds, 2), "page_cache_gib_before": round(cached_before, 1),
              "disk_read_gb": round(read / 1e9, 2)}
    print(json.dumps(record), flush=True)
    return record


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> dict:
    """Every parameter and buffer of `a` and `b` compared bit for bit (names, dtypes, shapes, bits)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    differ = sorted(state_a.keys() ^ state_b.keys())
    for name in state_a.keys() & state_b.keys():
        x, y = state_a[name], state_b[name].to(state_a[name].device)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(bits(x), bits(y)):
            differ.append(name)
    return {"identical": not differ, "tensors": len(state_a), "differing": sorted(differ)[:10]}


def main() -> None:
    from diffusers import QwenImageTransformer2DModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/load-bench")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--runs", default="read,mmap,no_mmap,prefetch,read_ahead,device_map",
                        help="comma list of: read, mmap, no_mmap, prefetch, read_ahead, device_map, "
                             "fp8_quantize, fp8_cache")
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

    keep = frozenset(fp8.DEFAULT_FP8_KEEP_BF16)  # FP8_KEEP_BF16's default

    def quantizing_load():  # the worker's QUANTIZE=fp8 start without a cache (src/models/host.py prepare)
        reading = read_ahead(weight_files(folder))
        model = load()
        fp8.quantize_blocks(model, torch.device("cuda"), keep=keep)
        model = model.to("cuda")
        reading.result()
        return model

    cache_root = Path(args.dir) / "fp8-cache"

    def cached_load():  # the worker's start with a matching FP8 cache
        skeleton = fp8_cache.empty_transformer(folder, torch.bfloat16, keep)
        cache = fp8_cache.find(cache_root, "bench/random", "0" * 40, fp8_cache.recipe(keep, torch.bfloat16),
                               fp8_cache.cached_tensor_specs(skeleton))
        model, report = fp8_cache.load_transformer(cache, folder, torch.bfloat16, torch.device("cuda"), keep)
        results["fp8_cache_bytes_read"] = {"cache": report.cache_bytes, "snapshot": report.snapshot_bytes}
        return model.to("cuda")

    keys = args.runs.split(",")
    if "fp8_cache" in keys:
        free = shutil.disk_usage(folder).free
        specs = fp8_cache.cached_tensor_specs(fp8_cache.empty_transformer(folder, torch.bfloat16, keep))
        needed = sum(torch.Size(shape).numel() * dtype.itemsize for dtype, shape in specs.values())
        print(json.dumps({"free_disk_gb_before_fp8_build": round(free / 1e9, 1), "fp8_cache_gb": round(needed / 1e9, 1)}),
              flush=True)
        if free < needed + 1e9:
            sys.exit(f"not enough disk for the FP8 cache: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)
        start = time.perf_counter()
        written = fp8_cache.build(folder, cache_root, "bench/random", "0" * 40, keep, torch.bfloat16, print)
        torch.set_num_threads(threads)
        results["fp8_build_s"] = round(time.perf_counter() - start, 1)
        results["fp8_cache_file_bytes"] = sum(path.stat().st_size for path in written.glob("*.safetensors"))
        print(json.dumps({"fp8_build_s": results["fp8_build_s"], "bytes": results["fp8_cache_file_bytes"]}),
              flush=True)

    kept: dict = {}
    runs = {  # key (for --runs): (label, action)
        "read": ("plain sequential read", lambda: sum(read_through(path) for path in weight_files(folder))),
        "mmap": ("from_pretrained (mmap) + .to(cuda), no read-ahead", lambda: load().to("cuda")),
        "no_mmap": ("from_pretrained(disable_mmap=True) + .to(cuda)", lambda: load(disable_mmap=True).to("cuda")),
        "prefetch": ("prefetch first, then from_pretrained (mmap) + .to(cuda)", prefetched_load),
        "read_ahead": ("WEIGHTS_PREFETCH: read-ahead thread during from_pretrained (mmap) + .to(cuda)",
                       read_ahead_load),
        "device_map": ('from_pretrained(device_map="cuda")', lambda: load(device_map="cuda")),
        "fp8_quantize": ("QUANTIZE=fp8 without a cache: read-ahead, from_pretrained (mmap), quantize_blocks onto "
                         "cuda, .to(cuda)", quantizing_load),
        "fp8_cache": ("QUANTIZE=fp8 with the FP8 cache: FP8 linears from the cache, the rest from the shards by key, "
                      ".to(cuda)", cached_load),
    }
    for key in keys:
        label, action = runs[key]
        # Both FP8 transformers (27 GB each) are kept on the GPU to be compared.
        record = timed(label, Path(args.dir), action, kept if key.startswith("fp8_") else None)
        record["gb_per_s"] = round(size / record["seconds"] / 1e9, 2)  # of the bf16 shards' size, for comparison
        results["runs"].append(record)
        write_results(results, Path(args.out))
    if len([key for key in keys if key.startswith("fp8_")]) == 2:
        results["fp8_cache_vs_quantize"] = same_tensors(*kept.values())
        print(json.dumps(results["fp8_cache_vs_quantize"]), flush=True)
        write_results(results, Path(args.out))
    kept.clear()
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
