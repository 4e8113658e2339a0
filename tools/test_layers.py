"""Decompose an image into RGBA layers through the worker, optionally edit some of
them in the same job; save and print the result.

    # local worker: python handler.py --rp_serve_api --rp_api_port 8000
    python tools/test_layers.py --url http://127.0.0.1:8000 --image poster.png --layers 4
    # deployed endpoint: edit layer 2, layers at the input's size, a PSD of the result
    RUNPOD_API_KEY=... python tools/test_layers.py --endpoint-id abc123 --image poster.png \\
        --edit "2:make the car red" --resize-to-input --archive psd

Sends operation "decompose". An empty --prompt lets the model caption the image itself.
Saves to --out: <job id>_layer<i>.png for each layer and <job id>_composite.png; with
--edit, <job id>_edited_layer<i>.png and <job id>_composite_edited.png; with --archive,
<job id>_layers.<zip|psd|ora>; and <job id>_contact_sheet.png, every layer on a
checkerboard with its name (the edited ones under the layers they replace).
Needs requests and Pillow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

try:  # imported as tools.test_layers
    from tools import client
    from tools.contact_sheet import DEFAULT_TILE_SIDE, Cell, contact_sheet
except ImportError:  # run as a script: tools/ is on sys.path
    import client
    from contact_sheet import DEFAULT_TILE_SIDE, Cell, contact_sheet

DEFAULT_LAYERS = 4
DEFAULT_STEPS = 50
DEFAULT_CFG = 4.0
RESOLUTIONS = (640, 1024)
ARCHIVES = ("zip", "psd", "ora")


def layer_edit(text: str) -> dict:
    """`--edit LAYER:PROMPT` as the job's edit entry."""
    layer, _, prompt = text.partition(":")
    if not layer.strip().isdigit() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"expected LAYER:PROMPT, e.g. '2:make it red'; got {text!r}")
    return {"layer": int(layer), "prompt": prompt.strip()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, metavar="PATH_OR_URL",
                        help="the image to decompose: a file, or an http(s) URL the worker fetches (image_url)")
    parser.add_argument("--prompt", default="", help="what the image shows; empty: the model captions it")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                        help=f"number of layers; default {DEFAULT_LAYERS}")
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=RESOLUTIONS[0],
                        help=f"working resolution; default {RESOLUTIONS[0]}")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"num_inference_steps; default {DEFAULT_STEPS}")
    parser.add_argument("--seed", type=int, help="default: the worker picks one and returns it")
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"true_cfg_scale; default {DEFAULT_CFG}")
    parser.add_argument("--edit", type=layer_edit, action="append", default=[], metavar="LAYER:PROMPT",
                        help="edit layer LAYER (0 at the back) with the edit model; repeatable, one per layer")
    parser.add_argument("--edit-steps", type=int, metavar="N",
                        help="num_inference_steps of each edit; default: the worker's (40)")
    parser.add_argument("--archive", choices=ARCHIVES, help="also get the layers and the composite in one file")
    parser.add_argument("--resize-to-input", action="store_true",
                        help="layers at the input image's size instead of the model's resolution bucket")
    parser.add_argument("--sheet-tile", type=int, default=DEFAULT_TILE_SIDE, metavar="PIXELS",
                        help=f"side of the square each image fits in on the contact sheet; default {DEFAULT_TILE_SIDE}")
    parser.add_argument("--return-base64", action="store_true",
                        help="ask for base64 in the answer too (the worker always sends it when it has no bucket)")
    client.add_target_args(parser)
    return parser.parse_args(argv)


def build_payload(args: argparse.Namespace) -> dict:
    """The job input for these arguments, in the worker's key names."""
    payload: dict = {
        "operation": "decompose",
        "layers": args.layers,
        "resolution": args.resolution,
        "num_inference_steps": args.steps,
        "true_cfg_scale": args.cfg,
        "output_format": "png",
    }
    if args.image.startswith(("http://", "https://")):
        payload["image_url"] = args.image
    else:
        payload["image_base64"] = client.encode_file(args.image)
    if args.prompt:
        payload["prompt"] = args.prompt
    if args.seed is not None:
        payload["seed"] = args.seed
    if args.return_base64:
        payload["return_base64"] = True
    if args.edit:
        steps = {} if args.edit_steps is None else {"num_inference_steps": args.edit_steps}
        payload["edits"] = [{**edit, **steps} for edit in args.edit]
    if args.archive:
        payload["archive"] = args.archive
    if args.resize_to_input:
        payload["resize_to_input"] = True
    return payload


def save_outputs(result: client.JobResult, out_dir: Path, tile_side: int = DEFAULT_TILE_SIDE) -> Path:
    """Save every image and the archive; returns the contact sheet's path."""
    output = result.output
    stem = client.file_stem(result.job_id)
    layers = output.get("layers")
    if not layers:
        raise client.JobError(f"job {result.job_id}: the output has no layers (keys: {', '.join(output)})")
    originals: list[Cell] = []
    edited: list[Cell] = [None] * len(layers)
    for position, entry in enumerate(layers):
        index = entry.get("index", position)
        originals.append(_save(entry, out_dir, f"{stem}_layer{index}", f"layer {index}"))
    for entry in output.get("edited_layers", []):
        index = entry["index"]
        if 0 <= index < len(layers):  # under the layer it replaces
            edited[index] = _save(entry, out_dir, f"{stem}_edited_layer{index}", f"edited layer {index}")
    if output.get("composite"):
        originals.append(_save(output["composite"], out_dir, f"{stem}_composite", "composite"))
    if output.get("composite_edited"):
        edited.append(_save(output["composite_edited"], out_dir, f"{stem}_composite_edited", "composite edited"))
    rows = [originals, edited] if any(edited) else [originals]
    archive = output.get("archive")
    if archive:
        path = client.save_image(archive, out_dir, f"{stem}_layers")
        client.print_saved(f"{archive.get('format')} archive", path, archive)
    sheet_path = out_dir / f"{stem}_contact_sheet.png"
    sheet = contact_sheet(rows, tile_side)
    sheet.save(sheet_path)
    client.print_saved("sheet", sheet_path, {"width": sheet.width, "height": sheet.height, "format": "png",
                                             "bytes": sheet_path.stat().st_size})
    return sheet_path


def _save(entry: dict, out_dir: Path, name: str, label: str) -> Cell:
    """Save one image entry, print where, and return it as a contact sheet cell."""
    path = client.save_image(entry, out_dir, name)
    client.print_saved(label, path, entry)
    with Image.open(path) as image:
        return entry.get("name", name), image.copy()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = client.target_from_args(args)
    payload = build_payload(args)
    edits = f", {len(args.edit)} layer edit(s)" if args.edit else ""
    print(f"decompose: {args.layers} layers at {args.resolution}, {args.steps} steps, cfg {args.cfg}{edits} "
          f"-> {target.label}")
    result = client.run_job(payload, target)
    client.print_header(result)
    save_outputs(result, Path(args.out), args.sheet_tile)
    client.print_footer(result)
    return 0


if __name__ == "__main__":
    client.run_cli(main)
