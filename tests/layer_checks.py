"""For the layer tests: the jobs they send, expected pixels computed with Pillow, and
archives fetched and read back with readers other than the code that wrote them
(zipfile, psd-tools and Pillow, pyora). Shared by tests/serving/test_archives.py,
tests/serving/test_layer_workflow.py and tests/test_local_api.py."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image
from psd_tools import PSDImage
from pyora import Project

from tests.conftest import fetch_bytes, png_b64, sample_image

# PSD's merged image is 8-bit colour matted on white: a step of rounding from ours.
PSD_MERGED_TOLERANCE = 2

# Not a multiple of 16, and another aspect than the model's buckets: resize_to_input
# has real work to do.
SOURCE_SIZE = (100, 60)
SEED = 21
EDITS = [
    {"layer": 0, "prompt": "paint it red", "num_inference_steps": 2},
    {"layer": 2, "prompt": "make it glow", "negative_prompt": "dull", "num_inference_steps": 2,
     "true_cfg_scale": 2.0, "seed": 99},
]
CONTENT_TYPES = {"zip": "application/zip", "psd": "image/vnd.adobe.photoshop", "ora": "image/openraster"}


def decompose_job(**extra) -> dict:
    """A decomposition into 3 layers, 2 steps, of a small RGBA image."""
    return {"operation": "decompose", "image_base64": png_b64(sample_image(size=SOURCE_SIZE, mode="RGBA")),
            "prompt": "a scene", "layers": 3, "num_inference_steps": 2, "seed": SEED, **extra}


def layer_pile(size=(48, 32)) -> list[Image.Image]:
    """Layers to stack: an opaque back, a half-transparent gradient, a layer with holes
    and soft edges, and an opaque patch over a quarter of the canvas."""
    rng = np.random.default_rng(3)
    width, height = size
    colours = lambda: rng.integers(0, 256, (height, width, 3))  # noqa: E731
    back = np.dstack([colours(), np.full((height, width), 255)])
    gradient = np.dstack([colours(), np.tile(np.linspace(0, 255, width), (height, 1))])
    partial_alpha = rng.integers(1, 256, (height, width))
    holes = np.dstack([colours(), np.where(rng.random((height, width)) < 0.5, 0, partial_alpha)])
    layers = [Image.fromarray(array.astype(np.uint8), "RGBA") for array in (back, gradient, holes)]
    patch = Image.new("RGBA", size, (0, 0, 0, 0))
    patch.paste((20, 200, 90, 255), (0, 0, width // 2, height // 2))
    return layers + [patch]


def alpha_over(layers: list[Image.Image]) -> Image.Image:
    """The expected composite of RGBA layers, back to front."""
    canvas = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        canvas = Image.alpha_composite(canvas, layer.convert("RGBA"))
    return canvas


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGBA").tobytes() == b.convert("RGBA").tobytes()


def visible_pixels(image: Image.Image) -> np.ndarray:
    """RGBA with the colour of fully transparent pixels zeroed: that colour is not part of
    the picture, and readers may store or rebuild it differently."""
    array = np.array(image.convert("RGBA"))
    array[array[..., 3] == 0] = 0
    return array


def assert_psd_merged_is(merged: Image.Image, composite: Image.Image) -> None:
    """A PSD's merged image (Pillow's frame 0) against the composite. With transparency,
    Photoshop stores the merged colour matted on white; the alpha as it is. Where alpha is
    0 the colour is not part of the picture."""
    alpha = np.array(composite.getchannel("A"), int)
    assert np.abs(np.array(merged.getchannel("A"), int) - alpha).max() <= 1
    on_white = Image.alpha_composite(Image.new("RGBA", composite.size, "white"), composite.convert("RGBA"))
    shown = alpha > 0
    difference = np.abs(np.array(merged.convert("RGB"), int) - np.array(on_white.convert("RGB"), int))[shown]
    assert difference.size == 0 or difference.max() <= PSD_MERGED_TOLERANCE


@dataclass
class ArchiveContents:
    names: list[str]           # back to front; a layer in a group as `<group>/<name>`
    layers: list[Image.Image]  # full canvas, back to front
    composite: Image.Image     # for psd: the merged image as stored (colour matted on white)


def read_archive(fmt: str, data: bytes) -> ArchiveContents:
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert archive.testzip() is None
            manifest = json.loads(archive.read("manifest.json"))
            assert manifest["order"] == "back to front"
            layers = [Image.open(io.BytesIO(archive.read(entry["file"]))) for entry in manifest["layers"]]
            composite = Image.open(io.BytesIO(archive.read(manifest["composite"])))
            names = [f"{entry['group']}/{entry['name']}" if "group" in entry else entry["name"]
                     for entry in manifest["layers"]]
            return ArchiveContents(names, layers, composite)
    if fmt == "psd":
        psd = PSDImage.open(io.BytesIO(data))
        layers, names = [], []
        for stored in psd.descendants():  # bottom first, a group before its layers
            if stored.kind == "group":
                continue
            canvas = Image.new("RGBA", psd.size, (0, 0, 0, 0))
            if stored.width and stored.height:  # psd-tools reads an empty layer as no pixels at all
                canvas.paste(stored.topil().convert("RGBA"), (stored.left, stored.top))
            layers.append(canvas)
            names.append(f"{stored.parent.name}/{stored.name}" if stored.parent.kind == "group" else stored.name)
        return ArchiveContents(names, layers, Image.open(io.BytesIO(data)))
    if fmt == "ora":
        project = Project.load(io.BytesIO(data))
        stored = list(project.iter_layers)  # a property in pyora 0.3; bottom first, groups' layers in place
        names = [layer.name if layer.parent.uuid == project.root.uuid else f"{layer.parent.name}/{layer.name}"
                 for layer in stored]
        return ArchiveContents(names, [layer.get_image_data(raw=True) for layer in stored],
                               project.get_image_data(use_original=True))
    raise ValueError(f"unknown archive format {fmt!r}")


def assert_archive_holds(fmt: str, contents: ArchiveContents, names: list[str], layers: list[Image.Image],
                         composite: Image.Image) -> None:
    """The archive holds exactly these layers, in this order, and their composite."""
    assert contents.names == names
    assert len(contents.layers) == len(layers)
    if fmt == "psd":
        for stored, layer in zip(contents.layers, layers):
            assert (visible_pixels(stored) == visible_pixels(layer)).all()
        assert_psd_merged_is(contents.composite, composite)
        return
    for stored, layer in zip(contents.layers, layers):
        assert stored.mode == "RGBA" and same_pixels(stored, layer)
    assert same_pixels(contents.composite, composite)


def fetch_archive(out: dict, fmt: str) -> bytes:
    """The job's archive, from its presigned URL, checked against its entry."""
    entry = out["archive"]
    folder = out["images"][0]["key"].rsplit("/", 1)[0]
    assert entry["key"] == f"{folder}/layers.{fmt}"  # stored next to the images
    assert entry["format"] == fmt and entry["content_type"] == CONTENT_TYPES[fmt]
    response = fetch_bytes(entry["url"])
    assert response.headers["Content-Type"] == CONTENT_TYPES[fmt]
    assert len(response.content) == entry["bytes"]
    return response.content
