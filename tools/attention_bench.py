"""Which SDPA kernel is fastest for the Qwen transformers' attention on this GPU.

    python tools/attention_bench.py --out bench/results

Times `torch.nn.functional.scaled_dot_product_attention` in bf16 (24 heads of 128, batch 1,
no mask: the shape of every Qwen-Image pass) under each of torch's kernels, at the token
counts of the bench's cases, and checks each against the math kernel in float32. Writes
`<out>/<gpu>-<date>-attention.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_results import write_results  # noqa: E402

HEADS, HEAD_DIM = 24, 128
# Image + text tokens per pass (tools/bench.py's cases): a 1024x1024 edit with one and with
# two references, and a 640 decomposition into 4 layers.
LENGTHS = {"edit_1ref": 8192 + 497, "edit_2ref": 12288 + 706, "decompose_640_4layers": 9600 + 497}
KERNELS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(call, repeats: int = 20, busy_cycles: int = 0) -> float:
    """Median GPU milliseconds of `call` after one warm-up. `busy_cycles`: the GPU kept busy that
    long before each timed call (`torch.cuda._sleep`), so a call's own host overhead is not timed."""
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        if busy_cycles:
            torch.cuda._sleep(busy_cycles)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "date": datetime.date.today().isoformat(),
               "label": "attention", "cases": []}
    for case, length in LENGTHS.items():
        q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.MATH):
            reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * length * length * HEAD_DIM * HEADS
        for name, kernel in KERNELS.items():
            def call():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            try:
                with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
                    ms, out = time_ms(call), call()
            except RuntimeError as exc:
                results["cases"].append({"case": case, "kernel": name, "error": str(exc)[:200]})
                continue
            rel = float((out.float() - reference).norm() / reference.norm())
            results["cases"].append({"case": case, "tokens": length, "kernel": name, "ms": round(ms, 3),
                                     "tflops": round(flops / ms / 1e9, 1), "per_pass_60_blocks_s": round(60 * ms / 1e3, 4),
                                     "rel_l2_vs_fp32": rel})
            print(json.dumps(results["cases"][-1]), flush=True)
    write_results(results, Path(args.out))

if __name__ == "__main__":
    main()
