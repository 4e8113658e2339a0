"""Decompose an image into RGBA layers through the worker; save and print the result.

    # local worker: python handler.py --rp_serve_api --rp_api_port 8000
    python tools/test_layers.py --url http://127.0.0.1:8000 --image poster.png --layers 4
    # deployed endpoint
    RUNPOD_API_KEY=... python tools/test_layers.py --endpoint-id abc123 --image poster.png --resolution 1024

Sends operation "decompose". An empty --prompt lets the model caption the image itself.
Saves <job id>_layer<i>.png for each layer and <job id>_composite.png to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

try:  # imported as tools.test_layers
    from tools import client
except ImportError:  # run as a script: tools/ is on sys.path
    import client

DEFAULT_LAYERS = 4
DEFAULT_STEPS = 50
DEFAULT_CFG = 4.0
RESOLUTIONS = (640, 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, metavar="PATH", help="the image to decompose")
    parser.add_argument("--prompt", default="", help="what the image shows; empty: the model captions it")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                        help=f"number of layers; default {DEFAULT_LAYERS}")
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=RESOLUTIONS[0],
                        help=f"working resolution; default {RESOLUTIONS[0]}")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"num_inference_steps; default {DEFAULT_STEPS}")
    parser.add_argument("--seed", type=int, help="default: the worker picks one and returns it")
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"true_cfg_scale; default {DEFAULT_CFG}")
    parser.add_argument("--return-base64", action="store_true",
                        help="ask for base64 in the answer too (the worker always sends it when it has no bucket)")
    client.add_target_args(parser)
    return parser.parse_args(argv)


def build_payload(args: argparse.Namespace) -> dict:
    """The job input for these arguments, in the worker's key names."""
    payload: dict = {
        "operation": "decompose",
        "image_base64": client.encode_file(args.image),
        "layers": args.layers,
        "resolution": args.resolution,
        "num_inference_steps": args.steps,
        "true_cfg_scale": args.cfg,
        "output_format": "png",
    }
    if args.prompt:
        payload["prompt"] = args.prompt
    if args.seed is not None:
        payload["seed"] = args.seed
    if args.return_base64:
        payload["return_base64"] = True
    return payload


def save_outputs(result: client.JobResult, out_dir: Path) -> None:
    output = result.output
    stem = client.file_stem(result.job_id)
    layers = output.get("layers")
    if not layers:
        raise client.JobError(f"job {result.job_id}: the output has no layers (keys: {', '.join(output)})")
    for position, entry in enumerate(layers):
        index = entry.get("index", position)
        path = client.save_image(entry, out_dir, f"{stem}_layer{index}")
        client.print_saved(f"layer {index}", path, entry)
    composite = output.get("composite")
    if composite:
        path = client.save_image(composite, out_dir, f"{stem}_composite")
        client.print_saved("composite", path, composite)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = client.target_from_args(args)
    payload = build_payload(args)
    print(f"decompose: {args.layers} layers at {args.resolution}, {args.steps} steps, cfg {args.cfg} -> {target.label}")
    result = client.run_job(payload, target)
    client.print_header(result)
    save_outputs(result, Path(args.out))
    client.print_footer(result)
    return 0


if __name__ == "__main__":
    client.run_cli(main)
