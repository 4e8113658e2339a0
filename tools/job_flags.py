"""Command-line flags that become job keys, shared by the clients.

A flag the user did not give stays out of the payload, so the worker's own default
applies (README's input table): no flag here has a default of its own. Each flag's help
names the job key it sets. `given(args, {key: dest})` collects the given ones.

Payload values (image base64) and secrets (`--r2-secret-access-key`) are never printed.
"""

from __future__ import annotations

import argparse
import re

OUTPUT_FORMATS = ("png", "jpeg", "webp")
# RGBA outputs (layers, composites) need a format with alpha.
ALPHA_FORMATS = ("png", "webp")
R2_FLAGS = {"endpoint_url": "r2_endpoint_url", "access_key_id": "r2_access_key_id",
            "secret_access_key": "r2_secret_access_key", "bucket_name": "r2_bucket_name", "region": "r2_region"}
_LAYER_VALUE = re.compile(r"^\s*(\d+)\s*:(.*)$", re.S)


def given(args: argparse.Namespace, keys: dict[str, str]) -> dict:
    """{job key: value} for each `dest` the user gave (not None)."""
    return {key: getattr(args, dest) for key, dest in keys.items() if getattr(args, dest) is not None}


def add_sampling_flags(parser: argparse.ArgumentParser, steps_default: str) -> None:
    """--steps, --cfg, --guidance-scale, --seed, --negative-prompt."""
    parser.add_argument("--steps", type=int, metavar="N",
                        help=f"num_inference_steps, 1 to 100; default: the worker's ({steps_default})")
    parser.add_argument("--cfg", type=float, metavar="SCALE",
                        help="true_cfg_scale, 1.0 to 20.0 (1.0: no true CFG); default: the worker's (4.0)")
    parser.add_argument("--guidance-scale", type=float, metavar="SCALE",
                        help="guidance_scale, passed to the pipeline; default: the worker's (1.0)")
    parser.add_argument("--seed", type=int, help="seed; default: the worker picks one and returns it")
    parser.add_argument("--negative-prompt", metavar="TEXT", help="negative_prompt; default: the worker's (' ')")


SAMPLING_KEYS = {"num_inference_steps": "steps", "true_cfg_scale": "cfg", "guidance_scale": "guidance_scale",
                 "seed": "seed", "negative_prompt": "negative_prompt"}


def add_output_flags(parser: argparse.ArgumentParser, formats: tuple[str, ...] = OUTPUT_FORMATS) -> None:
    """--format, --quality, --return-base64, and the job's own bucket (--r2-*)."""
    parser.add_argument("--format", choices=formats, help="output_format; default: the worker's (png)")
    parser.add_argument("--quality", type=int, metavar="Q",
                        help="output_quality for jpeg and webp, 1 to 100; default: the worker's (95)")
    parser.add_argument("--return-base64", action=argparse.BooleanOptionalAction,
                        help="return_base64: also return the images inline (the worker always does without a "
                             "bucket)")
    bucket = parser.add_argument_group(
        "the job's own bucket (r2), instead of the worker's BUCKET_* settings; a secret on the command line "
        "stays in the shell's history")
    bucket.add_argument("--r2-endpoint-url", metavar="URL", help="r2.endpoint_url, e.g. https://<account>.r2."
                        "cloudflarestorage.com")
    bucket.add_argument("--r2-access-key-id", metavar="ID", help="r2.access_key_id")
    bucket.add_argument("--r2-secret-access-key", metavar="SECRET", help="r2.secret_access_key")
    bucket.add_argument("--r2-bucket-name", metavar="NAME", help="r2.bucket_name")
    bucket.add_argument("--r2-region", metavar="REGION", help="r2.region (optional)")


def output_keys(args: argparse.Namespace) -> dict:
    """output_format, output_quality, return_base64 and r2, as given."""
    payload = given(args, {"output_format": "format", "output_quality": "quality", "return_base64": "return_base64"})
    r2 = given(args, R2_FLAGS)
    if r2:  # only what was given: the worker names a missing part (r2.bucket_name: required)
        payload["r2"] = r2
    return payload


def colour(text: str) -> str:
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        raise argparse.ArgumentTypeError(f"expected a colour as '#rrggbb', e.g. '#ffffff'; got {text!r}")
    return text


def layer_value(convert):
    """An argparse type for `VALUE` (every layer edit) or `LAYER:VALUE` (that layer's edit):
    returns (layer or None, value)."""
    def parse(text: str):
        match = _LAYER_VALUE.match(text)
        layer, raw = (int(match.group(1)), match.group(2)) if match else (None, text)
        try:
            return layer, convert(raw.strip() if convert is not str else raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected VALUE or LAYER:VALUE with a {convert.__name__} value; "
                                             f"got {text!r}") from None
    parse.__name__ = convert.__name__  # argparse names the type in its errors
    return parse


def lora(values: list[str]) -> dict:
    """`--lora SOURCE [SCALE [WEIGHT_NAME]]` as a `loras` entry."""
    if not 1 <= len(values) <= 3:
        raise argparse.ArgumentTypeError(f"--lora takes SOURCE [SCALE [WEIGHT_NAME]]; got {len(values)} values")
    entry: dict = {"source": values[0]}
    if len(values) > 1:
        try:
            entry["scale"] = float(values[1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lora {values[0]}: SCALE must be a number, got {values[1]!r}") \
                from None
    if len(values) > 2:
        entry["weight_name"] = values[2]
    return entry


class LoraAction(argparse.Action):
    """Appends each --lora as a `loras` entry, checked as it is parsed."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            entry = lora(values)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), entry])
