"""Decompose an image into RGBA layers through the worker, optionally edit some of
them in the same job; or stack layers you have into one image (composite). Save and
print the result.

    # local worker: python handler.py --rp_serve_api --rp_api_port 8000
    python tools/test_layers.py --url http://127.0.0.1:8000 --image poster.png --layers 4
    # deployed endpoint: edit layers 0 and 2 (layer 0 with its own seed and steps), layers at
    # the input's size, a PSD of the result
    RUNPOD_API_KEY=... python tools/test_layers.py --endpoint-id abc123 --image poster.png \\
        --edit "2:make the car red" --edit "0:a night sky" --edit-seed 0:7 --edit-steps 0:30 \\
        --resize-to-input --archive psd
    # composite: stack layers (back to front) into one image, and an OpenRaster file of them
    python tools/test_layers.py --url http://127.0.0.1:8000 --composite back.png front.png --archive ora

--image sends operation "decompose"; --composite sends operation "composite". An empty
--prompt lets the model caption the image itself. Every key of these jobs has a flag
(`--help` names the key each sets); a flag left out is left out of the job, so the
worker's default applies (4 layers at 640, 50 steps, true CFG 4.0, png). The --edit-*
flags take VALUE for every layer edit or LAYER:VALUE for one layer's edit (which wins).

Saves to --out: <job id>_layer<i>.<format> for each layer and <job id>_composite.<format>;
with --edit, <job id>_edited_layer<i> and <job id>_composite_edited; with --archive,
<job id>_layers.<zip|psd|ora>; and <job id>_contact_sheet.png, every layer on a
checkerboard with its name (the edited ones under the layers they replace). A composite
job saves <job id>_composite and the archive.
Needs requests and Pillow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

try:  # imported as tools.test_layers
    from tools import client, job_flags
    from tools.contact_sheet import DEFAULT_TILE_SIDE, Cell, contact_sheet
except ImportError:  # run as a script: tools/ is on sys.path
    import client
    import job_flags
    from contact_sheet import DEFAULT_TILE_SIDE, Cell, contact_sheet

RESOLUTIONS = (640, 1024)
ARCHIVES = ("zip", "psd", "ora")
# --edit-* flags (by dest): the layer edit key each sets.
EDIT_OPTIONS = {"edit_steps": "num_inference_steps", "edit_cfg": "true_cfg_scale", "edit_seed": "seed",
                "edit_negative_prompt": "negative_prompt"}


def layer_edit(text: str) -> dict:
    """`--edit LAYER:PROMPT` as the job's edit entry."""
    layer, _, prompt = text.partition(":")
    if not layer.strip().isdigit() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"expected LAYER:PROMPT, e.g. '2:make it red'; got {text!r}")
    return {"layer": int(layer), "prompt": prompt.strip()}


def layer_split(text: str) -> dict:
    """`--split LAYER:N[:PROMPT]` as the job's split entry."""
    layer, _, rest = text.partition(":")
    layers, _, prompt = rest.partition(":")
    if not layer.strip().isdigit() or not layers.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected LAYER:N or LAYER:N:PROMPT, e.g. '1:3'; got {text!r}")
    entry = {"layer": int(layer), "layers": int(layers)}
    if prompt.strip():
        entry["prompt"] = prompt.strip()
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="PATH_OR_URL",
                        help="decompose this image: a file (image_base64), or an http(s) URL the worker fetches "
                             "(image_url)")
    source.add_argument("--composite", nargs="+", metavar="LAYER",
                        help="composite: stack these image files (layers_base64), back to front, all one size")
    parser.add_argument("--prompt", help="prompt: what the image shows; default: the model captions it")
    parser.add_argument("--layers", type=int, help="layers: how many, 2 to 10; default: the worker's (4)")
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS,
                        help="resolution: the working resolution; default: the worker's (640)")
    job_flags.add_sampling_flags(parser, steps_default="50")
    parser.add_argument("--cfg-normalize", action=argparse.BooleanOptionalAction,
                        help="cfg_normalize: --no-cfg-normalize gives diffusers' CFG instead of the authors' "
                             "normalized one (the worker's default)")
    parser.add_argument("--resize-to-input", action=argparse.BooleanOptionalAction,
                        help="resize_to_input: layers at the input image's size instead of the model's resolution "
                             "bucket")
    edits = parser.add_argument_group("layer edits (edits): each --edit-* takes VALUE for every edit or "
                                      "LAYER:VALUE for that layer's edit; repeatable")
    edits.add_argument("--edit", type=layer_edit, action="append", metavar="LAYER:PROMPT",
                       help="edits[].layer and .prompt: edit layer LAYER (0 at the back) with the edit model; "
                            "repeatable, one per layer")
    edits.add_argument("--edit-steps", type=job_flags.layer_value(int), action="append", metavar="[LAYER:]N",
                       help="edits[].num_inference_steps; default: the worker's (40)")
    edits.add_argument("--edit-cfg", type=job_flags.layer_value(float), action="append", metavar="[LAYER:]SCALE",
                       help="edits[].true_cfg_scale; default: the worker's (4.0)")
    edits.add_argument("--edit-seed", type=job_flags.layer_value(int), action="append", metavar="[LAYER:]SEED",
                       help="edits[].seed; default: the job's seed")
    edits.add_argument("--edit-negative-prompt", type=job_flags.layer_value(str), action="append",
                       metavar="[LAYER:]TEXT", help="edits[].negative_prompt; default: the worker's (' ')")
    parser.add_argument("--split", type=layer_split, action="append", metavar="LAYER:N[:PROMPT]",
                        help="split[].layer, .layers and .prompt: decompose layer LAYER again into N sub-layers "
                             "(PROMPT describes that layer; default: the model captions it); repeatable")
    parser.add_argument("--matte", type=job_flags.colour, metavar="#RRGGBB",
                        help="matte: the colour layers are flattened onto for their edits; default: the worker's "
                             "(the authors' green)")
    parser.add_argument("--archive", choices=ARCHIVES, help="archive: also get the layers and the composite in "
                        "one file")
    job_flags.add_output_flags(parser, job_flags.ALPHA_FORMATS)
    parser.add_argument("--sheet-tile", type=int, default=DEFAULT_TILE_SIDE, metavar="PIXELS",
                        help=f"side of the square each image fits in on the contact sheet; default {DEFAULT_TILE_SIDE}")
    client.add_target_args(parser)
    args = parser.parse_args(argv)
    edited = {edit["layer"] for edit in args.edit or []}
    for dest in EDIT_OPTIONS:
        for layer, _ in getattr(args, dest) or []:
            if layer is None and not edited:
                parser.error(f"--{dest.replace('_', '-')}: there is no --edit to apply it to")
            if layer is not None and layer not in edited:
                parser.error(f"--{dest.replace('_', '-')}: no --edit of layer {layer} "
                             f"(edited: {', '.join(map(str, sorted(edited))) or 'none'})")
    return args


def edit_entries(args: argparse.Namespace) -> list[dict]:
    """Each --edit with the --edit-* values that apply to it: a LAYER:VALUE one wins over
    a VALUE for every edit."""
    entries = []
    for edit in args.edit or []:
        entry = dict(edit)
        for dest, key in EDIT_OPTIONS.items():
            values = getattr(args, dest) or []
            for layer, value in sorted(values, key=lambda item: item[0] is not None):
                if layer is None or layer == edit["layer"]:
                    entry[key] = value
        entries.append(entry)
    return entries


def build_payload(args: argparse.Namespace) -> dict:
    """The job input for these arguments, in the worker's key names; what was not given
    is left out, so the worker's defaults apply."""
    if args.composite:
        payload: dict = {"operation": "composite",
                         "layers_base64": [client.encode_file(path) for path in args.composite]}
    else:
        payload = {"operation": "decompose"}
        if args.image.startswith(("http://", "https://")):
            payload["image_url"] = args.image
        else:
            payload["image_base64"] = client.encode_file(args.image)
    payload.update(job_flags.given(args, {
        "prompt": "prompt", "layers": "layers", "resolution": "resolution", **job_flags.SAMPLING_KEYS,
        "cfg_normalize": "cfg_normalize", "resize_to_input": "resize_to_input", "matte": "matte",
        "archive": "archive"}))
    if args.edit:
        payload["edits"] = edit_entries(args)
    if args.split:
        payload["split"] = args.split
    payload.update(job_flags.output_keys(args))
    return payload


def describe(args: argparse.Namespace) -> str:
    """One line on what is sent; settings left to the worker are not named."""
    if args.composite:
        return f"{len(args.composite)} layer(s)"
    parts = [f"{args.layers} layers" if args.layers else "the worker's layer count"]
    parts += [f"at {args.resolution}"] if args.resolution else []
    parts += [f"{args.steps} steps"] if args.steps is not None else []
    parts += [f"cfg {args.cfg}"] if args.cfg is not None else []
    parts += [f"{len(args.edit)} layer edit(s)"] if args.edit else []
    parts += [f"{len(args.split)} split(s)"] if args.split else []
    return ", ".join(parts)


def save_outputs(result: client.JobResult, out_dir: Path, tile_side: int = DEFAULT_TILE_SIDE) -> Path | None:
    """Save every image and the archive; returns the contact sheet's path (None for a composite job)."""
    output = result.output
    stem = client.file_stem(result.job_id)
    if output.get("operation") == "composite":
        _save_archive(output, out_dir, stem)
        if not output.get("composite"):
            raise client.JobError(f"job {result.job_id}: the output has no composite (keys: {', '.join(output)})")
        _save(output["composite"], out_dir, f"{stem}_composite", "composite")
        return None
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
            print(f"{'':<{client.LABEL_WIDTH}}seed {entry.get('seed')}, {entry.get('num_inference_steps')} steps, "
                  f"cfg {entry.get('true_cfg_scale')}")
    for split in output.get("splits", []):
        for entry in split["layers"]:
            name = f"layer{split['layer']}_{entry['index']}"
            _save(entry, out_dir, f"{stem}_{name}", f"sub-layer {split['layer']}.{entry['index']}")
    if output.get("composite"):
        originals.append(_save(output["composite"], out_dir, f"{stem}_composite", "composite"))
    if output.get("composite_edited"):
        edited.append(_save(output["composite_edited"], out_dir, f"{stem}_composite_edited", "composite edited"))
    rows = [originals, edited] if any(edited) else [originals]
    _save_archive(output, out_dir, stem)
    sheet_path = out_dir / f"{stem}_contact_sheet.png"
    sheet = contact_sheet(rows, tile_side)
    sheet.save(sheet_path)
    client.print_saved("sheet", sheet_path, {"width": sheet.width, "height": sheet.height, "format": "png",
                                             "bytes": sheet_path.stat().st_size})
    return sheet_path


def _save_archive(output: dict, out_dir: Path, stem: str) -> None:
    archive = output.get("archive")
    if archive:
        path = client.save_image(archive, out_dir, f"{stem}_layers")
        client.print_saved(f"{archive.get('format')} archive", path, archive)


def _save(entry: dict, out_dir: Path, name: str, label: str) -> Cell:
    """Save one image entry, print where, and return it as a contact sheet cell."""
    path = client.save_image(entry, out_dir, name)
    client.print_saved(label, path, entry)
    with Image.open(path) as image:
        return entry.get("name", name), image.copy()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return client.send_and_save(args, build_payload, describe,
                                lambda result: save_outputs(result, Path(args.out), args.sheet_tile))


if __name__ == "__main__":
    client.run_cli(main)
