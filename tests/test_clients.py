"""The clients in tools/ reach every key of the job schema, send only what they are given,
and work against the real local stack (handler.py behind the runpod SDK's local API, the
tiny models, the loopback S3)."""

from __future__ import annotations

import base64
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from PIL import Image
from pydantic import BaseModel

from src.job.schema import JobRequest, Operation
from tests.conftest import REPO_ROOT, sample_image
from tests.layer_checks import alpha_over, layer_pile, read_archive, same_pixels
from tools import test_layers, test_qwen_edit

CLIENTS = {"edit": test_qwen_edit, "layers": test_layers}
IMAGE = "{image}"  # replaced by a real file's path
URL = "https://images.example/in.png"
# The arguments every example starts from, per client and job shape.
BASE = {"edit": ["--url", "http://127.0.0.1:1", "--image", IMAGE, "--prompt", "p"],
        "decompose": ["--url", "http://127.0.0.1:1", "--image", IMAGE],
        "composite": ["--url", "http://127.0.0.1:1", "--composite", IMAGE, IMAGE]}
R2 = ["--r2-endpoint-url", "https://s3.example", "--r2-access-key-id", "id", "--r2-secret-access-key", "secret",
      "--r2-bucket-name", "b", "--r2-region", "auto"]

# Every key path of the schema: the client arguments that set it, and the value it gets.
# (shape, arguments after BASE[shape] or, for a full command line, None and the arguments).
EXAMPLES: dict[str, tuple[str, list[str], object]] = {
    "operation": ("edit", [], "edit"),
    "image_base64": ("edit", [], "{b64}"),
    "images_base64": ("edit", ["--image", IMAGE], ["{b64}"]),
    "image_url": ("edit!", ["--url", "http://127.0.0.1:1", "--image", URL, "--prompt", "p"], URL),
    "image_urls": ("edit!", ["--url", "http://127.0.0.1:1", "--image", URL, "--image", URL, "--prompt", "p"],
                   [URL, URL]),
    "prompt": ("edit", ["--prompt", "q"], ["p", "q"]),
    "num_images": ("edit", ["--num-images", "3"], 3),
    "negative_prompt": ("decompose", ["--negative-prompt", "blurry"], "blurry"),
    "num_inference_steps": ("edit", ["--steps", "12"], 12),
    "true_cfg_scale": ("decompose", ["--cfg", "2.5"], 2.5),
    "guidance_scale": ("edit", ["--guidance-scale", "1.5"], 1.5),
    "seed": ("decompose", ["--seed", "7"], 7),
    "width": ("edit", ["--width", "512"], 512),
    "height": ("edit", ["--height", "384"], 384),
    "layers": ("decompose", ["--layers", "6"], 6),
    "resolution": ("decompose", ["--resolution", "1024"], 1024),
    "output_format": ("edit", ["--format", "jpeg"], "jpeg"),
    "output_quality": ("composite", ["--quality", "80"], 80),
    "return_base64": ("edit", ["--no-return-base64"], False),
    "r2.endpoint_url": ("composite", R2, "https://s3.example"),
    "r2.access_key_id": ("edit", R2, "id"),
    "r2.secret_access_key": ("decompose", R2, "secret"),
    "r2.bucket_name": ("edit", R2, "b"),
    "r2.region": ("edit", R2, "auto"),
    "lightning": ("edit", ["--lightning", "8"], 8),
    "loras[].source": ("edit", ["--lora", "owner/style"], "owner/style"),
    "loras[].scale": ("edit", ["--lora", "https://loras.example/a.safetensors", "0.5"], 0.5),
    "loras[].weight_name": ("edit", ["--lora", "owner/style", "1", "b.safetensors"], "b.safetensors"),
    "snap": ("edit", ["--snap", "32"], 32),
    "use_fp8": ("edit", ["--use-fp8"], True),
    "auto_resize": ("edit", ["--no-auto-resize"], False),
    "split[].layer": ("decompose", ["--split", "1:3"], 1),
    "split[].layers": ("decompose", ["--split", "1:3"], 3),
    "split[].prompt": ("decompose", ["--split", "1:3:a red car"], "a red car"),
    "edits[].layer": ("decompose", ["--edit", "2:make it red"], 2),
    "edits[].prompt": ("decompose", ["--edit", "2:make it red"], "make it red"),
    "edits[].negative_prompt": ("decompose", ["--edit", "2:x", "--edit-negative-prompt", "dull"], "dull"),
    "edits[].num_inference_steps": ("decompose", ["--edit", "2:x", "--edit-steps", "2:30"], 30),
    "edits[].true_cfg_scale": ("decompose", ["--edit", "2:x", "--edit-cfg", "3"], 3.0),
    "edits[].seed": ("decompose", ["--edit", "2:x", "--edit-seed", "2:9"], 9),
    "resize_to_input": ("decompose", ["--resize-to-input"], True),
    "cfg_normalize": ("decompose", ["--no-cfg-normalize"], False),
    "matte": ("edit", ["--matte", "#112233"], "#112233"),
    "archive": ("composite", ["--archive", "ora"], "ora"),
    "layers_base64": ("composite", [], ["{b64}", "{b64}"]),
}


def schema_paths(model: type[BaseModel] = JobRequest, prefix: str = "") -> set[str]:
    """Every key a job may carry, nested models' keys included: `r2.region`, `loras[].scale`."""
    paths = set()
    for name, field in model.model_fields.items():
        nested = [(model_type, is_list) for model_type, is_list in _models_in(field.annotation)]
        if not nested:
            paths.add(prefix + name)
        for model_type, is_list in nested:
            paths |= schema_paths(model_type, f"{prefix}{name}{'[]' if is_list else ''}.")
    return paths


def _models_in(annotation, in_list: bool = False):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, in_list
        return
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        yield from _models_in(arg, in_list or origin is list)


def value_at(payload: dict, path: str):
    """The value a key path holds in a payload (the first item's, through a list)."""
    value = payload
    for part in path.split("."):
        key = part.removesuffix("[]")
        assert isinstance(value, dict) and key in value, f"{path}: no {key!r} in {sorted(value)}"
        value = value[key]
        if part.endswith("[]"):
            assert isinstance(value, list) and value, f"{path}: {key} is not a non-empty list"
            value = value[0]
    return value


def payload_for(shape: str, arguments: list[str], image: Path) -> dict:
    argv = arguments if shape.endswith("!") else BASE[shape] + arguments
    client = CLIENTS["edit" if shape.startswith("edit") else "layers"]
    return client.build_payload(client.parse_args([a.replace(IMAGE, str(image)) for a in argv]))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("client-input") / "in.png"
    sample_image().save(path)
    return path


def test_every_schema_key_has_a_client_flag():
    assert schema_paths() == set(EXAMPLES), "a schema key without a client flag (or an example for a key that " \
        "no longer exists); add the flag to tools/test_qwen_edit.py or tools/test_layers.py and its example here"


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_the_flag_sets_its_key(path, image):
    shape, arguments, expected = EXAMPLES[path]
    b64 = base64.b64encode(image.read_bytes()).decode()
    expected = [b64 if item == "{b64}" else item for item in expected] if isinstance(expected, list) else \
        b64 if expected == "{b64}" else expected
    assert value_at(payload_for(shape, arguments, image), path) == expected


def test_the_clients_send_every_operation(image):
    sent = {payload_for(shape, arguments, image)["operation"] for shape, arguments, _ in EXAMPLES.values()}
    sent.add(payload_for("edit", ["--image", IMAGE], image)["operation"])
    assert sent == set(typing.get_args(Operation))


@pytest.mark.parametrize("shape, keys", [
    ("edit", {"operation", "image_base64", "prompt"}),
    ("decompose", {"operation", "image_base64"}),
    ("composite", {"operation", "layers_base64"}),
])
def test_what_is_not_given_is_left_to_the_worker(shape, keys, image):
    """No client default shadows the worker's: e.g. no 8 steps with true CFG 4."""
    assert set(payload_for(shape, [], image)) == keys


def test_a_setting_for_one_layer_edit_wins_over_the_one_for_all(image):
    payload = payload_for("decompose", ["--edit", "0:sky", "--edit", "2:car", "--edit-steps", "20",
                                        "--edit-steps", "2:30", "--edit-seed", "0:5"], image)
    assert payload["edits"] == [{"layer": 0, "prompt": "sky", "num_inference_steps": 20, "seed": 5},
                                {"layer": 2, "prompt": "car", "num_inference_steps": 30}]


@pytest.mark.parametrize("arguments, message", [
    (["--edit-seed", "5"], "--edit-seed: there is no --edit to apply it to"),
    (["--edit", "0:sky", "--edit-seed", "3:5"], "--edit-seed: no --edit of layer 3 (edited: 0)"),
])
def test_an_edit_setting_without_its_edit_is_refused(arguments, message, image, capsys):
    with pytest.raises(SystemExit):
        payload_for("decompose", arguments, image)
    assert message in capsys.readouterr().err


def test_a_lora_scale_that_is_not_a_number_is_refused(image, capsys):
    with pytest.raises(SystemExit):
        payload_for("edit", ["--lora", "owner/style", "strong"], image)
    assert "--lora owner/style: SCALE must be a number, got 'strong'" in capsys.readouterr().err


# --- for real, against the local stack -------------------------------------------------------

def run_client(script: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{script}", *arguments], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


def test_an_edit_with_lightning_a_lora_a_matte_and_its_own_bucket(api, s3, lora_dir, tmp_path):
    """Lightning, a custom LoRA, webp at a quality, snap 32 and the job's own bucket, from flags."""
    source = tmp_path / "in.png"
    sample_image(mode="RGBA").save(source)
    bucket = "client-job-bucket"
    s3.client().create_bucket(Bucket=bucket)
    done = run_client("test_qwen_edit.py", "--url", api.url, "--image", str(source), "--prompt", "a hat",
                      "--lightning", "4", "--lora", "tiny_lora_diffusers.safetensors", "0.5", "--matte", "#ffffff",
                      "--format", "webp", "--quality", "80", "--snap", "32", "--width", "300", "--height", "280",
                      "--guidance-scale", "1.0", "--seed", "3",
                      "--r2-endpoint-url", s3.endpoint_url, "--r2-access-key-id", s3.access_key_id,
                      "--r2-secret-access-key", s3.secret_access_key, "--r2-bucket-name", bucket,
                      "--r2-region", s3.region, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 steps, cfg 1.0, lightning 4, lora tiny_lora_diffusers.safetensors x0.5, matte #ffffff" in done.stdout
    assert s3.secret_access_key not in done.stdout + done.stderr
    [saved] = (tmp_path / "out").glob("*.webp")
    image = Image.open(saved)
    assert image.format == "WEBP" and image.size == (288, 256) and image.mode == "RGBA"
    stored = s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"].rsplit("/", 1)[1] for item in stored] == ["output.webp"]
    assert stored[0]["Size"] == saved.stat().st_size


def test_a_decomposition_with_a_layer_edit_of_its_own_settings(api, tmp_path):
    source = tmp_path / "in.png"
    sample_image().save(source)
    out_dir = tmp_path / "out"
    done = run_client("test_layers.py", "--url", api.url, "--image", str(source), "--prompt", "scene",
                      "--layers", "2", "--steps", "2", "--seed", "4", "--no-cfg-normalize",
                      "--negative-prompt", "blurry", "--edit", "1:make it red", "--edit-steps", "2",
                      "--edit-seed", "1:9", "--edit-cfg", "1:1.0", "--split", "0:2:the back",
                      "--format", "webp", "--archive", "ora", "--out", str(out_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 steps, cfg 4.0, cfg_normalize false" in done.stdout
    assert "seed 9, 2 steps, cfg 1.0" in done.stdout  # what the worker reports the edit ran with
    [archive] = out_dir.glob("*_layers.ora")
    stem = archive.name.removesuffix("_layers.ora")
    layers = [Image.open(out_dir / f"{stem}_{name}.webp") for name in ("layer0", "edited_layer1")]
    assert all(layer.format == "WEBP" and layer.mode == "RGBA" for layer in layers)
    sub_layers = [Image.open(out_dir / f"{stem}_layer0_{j}.webp") for j in range(2)]  # the split of layer 0
    assert all(sub.mode == "RGBA" and sub.size == layers[0].size for sub in sub_layers)
    contents = read_archive("ora", archive.read_bytes())
    assert contents.names == ["layer_0/layer_0_0", "layer_0/layer_0_1", "edited_layer_1"]
    assert [layer.size for layer in contents.layers] == [layer.size for layer in [*sub_layers, layers[1]]]


def test_a_composite_of_layer_files(api, tmp_path):
    layers = layer_pile()
    paths = []
    for i, layer in enumerate(layers):
        paths.append(tmp_path / f"layer{i}.png")
        layer.save(paths[-1])
    out_dir = tmp_path / "out"
    done = run_client("test_layers.py", "--url", api.url, "--composite", *map(str, paths), "--archive", "zip",
                      "--out", str(out_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    [composite] = out_dir.glob("*_composite.png")
    assert same_pixels(Image.open(composite), alpha_over(layers))
    assert len(list(out_dir.glob("*_layers.zip"))) == 1


def test_a_worker_error_reaches_the_terminal_as_one_line(api, tmp_path):
    source = tmp_path / "in.png"
    sample_image().save(source)
    done = run_client("test_qwen_edit.py", "--url", api.url, "--image", str(source), "--prompt", "x",
                      "--lightning", "4", "--steps", "8", "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert done.stderr.strip().endswith("num_inference_steps: lightning 4 runs 4 steps; got 8 (leave it out)")
