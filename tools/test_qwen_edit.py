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

Every key of an edit job has a flag (`--help` names the key each sets); a flag left out
is left out of the job, so the worker's default applies (40 steps with true CFG 4.0, or
Lightning's own with --lightning):

    python tools/test_qwen_edit.py --url ... --image in.png --prompt "..." --lightning 4 \\
        --lora owner/style-lora 0.8 --format webp --quality 90 --matte "#ffffff"
"""

from __future__ import annotations

import argparse
from pathlib import Path

try:  # imported as tools.test_qwen_edit
    from tools import client, job_flags
except ImportError:  # run as a script: tools/ is on sys.path
    import client
    import job_flags

MIN_IMAGES, MAX_IMAGES = 1, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", required=True, metavar="PATH_OR_URL",
                        help=f"input image file or http(s) URL; repeat for multi-image edit "
                             f"({MIN_IMAGES} to {MAX_IMAGES})")
    parser.add_argument("--prompt", action="append", required=True,
                        help="the edit instruction; repeat for one result per prompt")
    parser.add_argument("--num-images", type=int, help="num_images: results per prompt (1 to 4), seeds seed, "
                        "seed+1, ...; default: the worker's (1)")
    job_flags.add_sampling_flags(parser, steps_default="40; lightning: its 4 or 8")
    parser.add_argument("--width", type=int, help="output width (the worker rounds down to a multiple of --snap)")
    parser.add_argument("--height", type=int, help="output height (the worker rounds down to a multiple of --snap)")
    parser.add_argument("--snap", type=int, choices=(16, 32),
                        help="snap: width/height round down to this multiple; default: the worker's (16)")
    parser.add_argument("--auto-resize", action=argparse.BooleanOptionalAction,
                        help="auto_resize: --no-auto-resize keeps the input's size when no width/height is given")
    parser.add_argument("--lightning", type=int, choices=(4, 8),
                        help="lightning: the 4- or 8-step Lightning LoRA (its steps, no true CFG)")
    parser.add_argument("--lora", nargs="+", action=job_flags.LoraAction, dest="loras",
                        metavar=("SOURCE", "SCALE [WEIGHT_NAME]"),
                        help="loras: a LoRA by path on the volume, repo id in the HF cache, https:// or s3:// URL, "
                             "with an optional scale (default 1.0) and weight_name; repeatable")
    parser.add_argument("--matte", type=job_flags.colour, metavar="#RRGGBB",
                        help="matte: the colour RGBA inputs are flattened onto; default: the worker's (green for "
                             "one image, white for several)")
    parser.add_argument("--use-fp8", action=argparse.BooleanOptionalAction,
                        help="use_fp8: accepted for compatibility (the worker's QUANTIZE decides)")
    job_flags.add_output_flags(parser)
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
    """The job input for these arguments, in the worker's key names; what was not given
    is left out, so the worker's defaults apply."""
    payload: dict = {
        "operation": "edit" if len(args.image) == 1 else "edit_multi",
        "prompt": args.prompt[0] if len(args.prompt) == 1 else args.prompt,
    }
    if is_url(args.image[0]):
        payload.update({"image_url": args.image[0]} if len(args.image) == 1 else {"image_urls": args.image})
    else:
        images = [client.encode_file(path) for path in args.image]
        payload["image_base64"] = images[0]
        if len(images) > 1:
            payload["images_base64"] = images[1:]
    payload.update(job_flags.given(args, {
        **job_flags.SAMPLING_KEYS, "num_images": "num_images", "width": "width", "height": "height",
        "snap": "snap", "auto_resize": "auto_resize", "lightning": "lightning", "loras": "loras",
        "matte": "matte", "use_fp8": "use_fp8"}))
    payload.update(job_flags.output_keys(args))
    return payload


def describe(args: argparse.Namespace) -> str:
    """One line on what is sent; settings left to the worker are not named."""
    parts = [f"{len(args.image)} image(s)", f"{len(args.prompt)} prompt(s)"]
    parts += [f"{args.steps} steps"] if args.steps is not None else []
    parts += [f"cfg {args.cfg}"] if args.cfg is not None else []
    parts += [f"lightning {args.lightning}"] if args.lightning else []
    parts += [f"{len(args.loras)} LoRA(s)"] if args.loras else []
    return ", ".join(parts)


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
    return client.send_and_save(args, build_payload, describe, lambda result: save_outputs(result, Path(args.out)))


if __name__ == "__main__":
    client.run_cli(main)
