"""Edit one image, or combine 2-3 images, through the worker; save and print the result.

    # local worker: python handler.py --rp_serve_api --rp_api_port 8000
    python tools/test_qwen_edit.py --url http://127.0.0.1:8000 --image cat.png --prompt "make it a watercolor"
    # deployed endpoint
    RUNPOD_API_KEY=... python tools/test_qwen_edit.py --endpoint-id abc123 \\
        --image person.png --image hat.png --prompt "the person wears the hat" --seed 7

One --image sends operation "edit"; two or three send "edit_multi" (the first image is
`image_base64`, the others `images_base64`). An --image that is an http(s) URL is sent as
`image_url` / `image_urls` for the worker to fetch (all images one way or the other).
Repeat --prompt for one result per prompt; --num-images gives several per prompt. Images
are saved to --out as <job id>_<n>.<format>.
"""

from __future__ import annotations

import argparse
from pathlib import Path

try:  # imported as tools.test_qwen_edit
    from tools import client
except ImportError:  # run as a script: tools/ is on sys.path
    import client

MIN_IMAGES, MAX_IMAGES = 1, 3
DEFAULT_STEPS = 8
DEFAULT_CFG = 4.0
FORMATS = ("png", "jpeg", "webp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", required=True, metavar="PATH_OR_URL",
                        help=f"input image file or http(s) URL; repeat for multi-image edit "
                             f"({MIN_IMAGES} to {MAX_IMAGES})")
    parser.add_argument("--prompt", action="append", required=True,
                        help="the edit instruction; repeat for one result per prompt")
    parser.add_argument("--num-images", type=int, help="results per prompt (1 to 4), seeds seed, seed+1, ...")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"num_inference_steps; default {DEFAULT_STEPS}")
    parser.add_argument("--seed", type=int, help="default: the worker picks one and returns it")
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"true_cfg_scale; default {DEFAULT_CFG}")
    parser.add_argument("--negative-prompt", help="default: the worker's")
    parser.add_argument("--width", type=int, help="output width (the worker rounds down to a multiple of 16)")
    parser.add_argument("--height", type=int, help="output height (the worker rounds down to a multiple of 16)")
    parser.add_argument("--format", choices=FORMATS, default="png", help="output format; default png")
    parser.add_argument("--return-base64", action="store_true",
                        help="ask for base64 in the answer too (the worker always sends it when it has no bucket)")
    client.add_target_args(parser)
    args = parser.parse_args(argv)
    if not MIN_IMAGES <= len(args.image) <= MAX_IMAGES:
        parser.error(f"--image: give {MIN_IMAGES} to {MAX_IMAGES} images, got {len(args.image)}")
    if len({is_url(image) for image in args.image}) > 1:
        parser.error("--image: give all images as files or all as URLs (the worker takes one style per job)")
    return args


def is_url(image: str) -> bool:
    return image.startswith(("http://", "https://"))


def build_payload(args: argparse.Namespace) -> dict:
    """The job input for these arguments, in the worker's key names."""
    payload: dict = {
        "operation": "edit" if len(args.image) == 1 else "edit_multi",
        "prompt": args.prompt[0] if len(args.prompt) == 1 else args.prompt,
        "num_inference_steps": args.steps,
        "true_cfg_scale": args.cfg,
        "output_format": args.format,
    }
    if is_url(args.image[0]):
        payload.update({"image_url": args.image[0]} if len(args.image) == 1 else {"image_urls": args.image})
    else:
        images = [client.encode_file(path) for path in args.image]
        payload["image_base64"] = images[0]
        if len(images) > 1:
            payload["images_base64"] = images[1:]
    optional = {"seed": args.seed, "negative_prompt": args.negative_prompt, "num_images": args.num_images,
                "width": args.width, "height": args.height}
    payload.update({key: value for key, value in optional.items() if value is not None})
    if args.return_base64:
        payload["return_base64"] = True
    return payload


def save_outputs(result: client.JobResult, out_dir: Path) -> None:
    output = result.output
    stem = client.file_stem(result.job_id)
    entries = output.get("images")
    if not entries and output.get("edited_image_base64"):  # a worker that only sends the legacy field
        entries = [{"base64": output["edited_image_base64"], "format": "png"}]
    if not entries:
        raise client.JobError(f"job {result.job_id}: the output has no images (keys: {', '.join(output)})")
    for n, entry in enumerate(entries):
        path = client.save_image(entry, out_dir, f"{stem}_{n}")
        client.print_saved("saved", path, entry)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = client.target_from_args(args)
    payload = build_payload(args)
    print(f"{payload['operation']}: {len(args.image)} image(s), {len(args.prompt)} prompt(s), {args.steps} steps, "
          f"cfg {args.cfg} -> {target.label}")
    result = client.run_job(payload, target)
    client.print_header(result)
    save_outputs(result, Path(args.out))
    client.print_footer(result)
    return 0


if __name__ == "__main__":
    client.run_cli(main)
