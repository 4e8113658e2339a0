"""How far `COMPILE=true` moves an edit's output: the same pipeline call eager, then with
the transformer's blocks compiled as the worker compiles them, on any device.

    python tools/compile_deviation.py --hf-home .cache/hf --dtype float32   # tiny models, CPU
    python tools/compile_deviation.py --hf-home $HF_HOME --device cuda --dtype bfloat16 --size 1024

Prints the relative L2 difference of the decoded images (floats in [0, 1]), the largest
absolute difference and the largest difference in 8-bit pixel values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.models.acceleration import regional_compile  # noqa: E402
from src.models.vl_processor import load_processor  # noqa: E402
from src.models.files.tensors import locate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-home", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    from diffusers import QwenImageEditPlusPipeline

    model = locate("Qwen/Qwen-Image-Edit-2511", Path(args.hf_home))
    pipeline = QwenImageEditPlusPipeline.from_pretrained(
        model.path, processor=load_processor(str(model.path)), dtype=getattr(torch, args.dtype)).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    image = Image.linear_gradient("L").resize((args.size, args.size)).convert("RGB")

    def run() -> np.ndarray:
        return pipeline(image=[image], prompt="make it blue", negative_prompt=" ", true_cfg_scale=4.0,
                        num_inference_steps=args.steps, width=args.size, height=args.size,
                        generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    eager = run()
    regional_compile(pipeline.transformer)  # as the worker compiles them
    started = time.perf_counter()
    compiled = run()
    print(f"{args.dtype} on {args.device}, {args.size}x{args.size}, {args.steps} steps, true CFG 4 "
          f"(compiled run {time.perf_counter() - started:.1f} s, compile included)")
    print(f"relative L2 {np.linalg.norm(compiled - eager) / np.linalg.norm(eager):.3g}, "
          f"max abs {np.abs(compiled - eager).max():.3g}, "
          f"max 8-bit difference {np.abs(np.round(compiled * 255) - np.round(eager * 255)).max():.0f}")


if __name__ == "__main__":
    main()
