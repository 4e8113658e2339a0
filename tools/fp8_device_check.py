"""Whether FP8 quantization gives the same bits on the CPU and the GPU: the FP8 cache is
written by tools/download_models.py --fp8 on either, and must equal quantizing at start.

    python tools/fp8_device_check.py

Prints one JSON line: per weight shape of the edit transformer, whether the e4m3 values
and the row scales of fp8.rowwise_fp8 are bit-identical between the two devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.models.fp8.linear import rowwise_fp8  # noqa: E402

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072)]  # q/k/v, MLP in, out, modulation


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    report = {}
    for rows, cols in SHAPES:
        weight = (torch.randn(rows, cols, generator=generator) *
                  torch.logspace(-3, 1, rows)[:, None]).bfloat16()
        cpu_values, cpu_scale = rowwise_fp8(weight)
        gpu_values, gpu_scale = (tensor.cpu() for tensor in rowwise_fp8(weight.cuda()))
        report[f"{rows}x{cols}"] = {
            "values_identical": torch.equal(cpu_values.view(torch.uint8), gpu_values.view(torch.uint8)),
            "scales_identical": torch.equal(cpu_scale, gpu_scale)}
    print(json.dumps({"identical": all(all(r.values()) for r in report.values()), "shapes": report}))


if __name__ == "__main__":
    main()
