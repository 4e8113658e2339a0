"""Layered files, read back with readers other than the code that wrote them:
zipfile and Pillow for the ZIP, psd-tools and Pillow's PSD reader for the PSD, pyora
for the OpenRaster file. No models: layers with every kind of alpha, made here."""

from __future__ import annotations

import io
import json
import re
import zipfile
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from pyora import Project

from src.serving import archives
from src.serving.operations import composite
from tests.layer_checks import assert_archive_holds, assert_psd_merged_is, read_archive, same_pixels, visible_pixels

SIZE = (48, 32)


def sample_layers() -> list[tuple[str, Image.Image]]:
    """An opaque background, a half-transparent gradient, a layer with holes and soft
    edges, and a fully transparent one: alpha 0, partial and 255 all occur."""
    rng = np.random.default_rng(7)
    back = np.dstack([rng.integers(0, 256, (SIZE[1], SIZE[0], 3)), np.full((SIZE[1], SIZE[0]), 255)])
    gradient = np.dstack([rng.integers(0, 256, (SIZE[1], SIZE[0], 3)),
                          np.tile(np.linspace(0, 255, SIZE[0]), (SIZE[1], 1))])
    holes = np.dstack([rng.integers(0, 256, (SIZE[1], SIZE[0], 3)),
                       np.where(rng.random((SIZE[1], SIZE[0])) < 0.5, 0, rng.integers(1, 256, (SIZE[1], SIZE[0])))])
    empty = np.zeros((SIZE[1], SIZE[0], 4))
    arrays = [back, gradient, holes, empty]
    names = ["layer_0", "edited_layer_1", "layer_2", "layer_3"]
    return [(name, Image.fromarray(array.astype(np.uint8), "RGBA")) for name, array in zip(names, arrays)]


@pytest.fixture(scope="module")
def layers():
    return sample_layers()


@pytest.fixture(scope="module")
def stacked(layers):
    return composite([layer for _, layer in layers])


def test_zip_holds_each_layer_as_a_png_the_composite_and_a_manifest(layers, stacked):
    data = archives.build("zip", layers, stacked)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["order"] == "back to front" and (manifest["width"], manifest["height"]) == SIZE
        assert [entry["name"] for entry in manifest["layers"]] == [name for name, _ in layers]
        assert [entry["index"] for entry in manifest["layers"]] == [0, 1, 2, 3]
        for entry, (_, layer) in zip(manifest["layers"], layers):
            stored = Image.open(io.BytesIO(archive.read(entry["file"])))
            assert stored.format == "PNG" and stored.mode == "RGBA" and same_pixels(stored, layer)
        assert same_pixels(Image.open(io.BytesIO(archive.read(manifest["composite"]))), stacked)


def test_psd_has_named_layers_in_order_with_their_transparency(layers, stacked):
    data = archives.build("psd", layers, stacked)
    psd = PSDImage.open(io.BytesIO(data))
    assert psd.size == SIZE and [layer.name for layer in psd] == [name for name, _ in layers]  # bottom first
    for stored, (_, layer) in zip(psd, layers):
        assert stored.kind == "pixel" and stored.visible and stored.opacity == 255
        assert stored.blend_mode.name == "NORMAL"
        if layer.getextrema()[3] == (0, 0):
            continue  # psd-tools reads an empty layer as no pixels at all (its bbox is empty)
        assert stored.bbox == (0, 0, *SIZE)
        assert (visible_pixels(stored.topil()) == visible_pixels(layer)).all()


@pytest.mark.parametrize("back", ["opaque", "transparent"])
def test_psd_merged_image_is_the_composite(layers, back):
    """The merged image is what viewers without layer support show. PSD stores its colour
    matted on white in 8 bits: checked where the composite is partly transparent too
    (without the opaque back layer), where the matte shows."""
    kept = layers if back == "opaque" else layers[1:]
    stacked = composite([layer for _, layer in kept])
    merged = Image.open(io.BytesIO(archives.build("psd", kept, stacked)))  # Pillow's reader: frame 0
    assert merged.mode == "RGBA" and merged.size == SIZE
    assert_psd_merged_is(merged, stacked)


def test_psd_layers_read_by_pillow_too(layers, stacked):
    psd = Image.open(io.BytesIO(archives.build("psd", layers, stacked)))
    assert [name for name, *_ in psd.layers] == [name for name, _ in layers]


def test_ora_follows_openraster_and_reads_back_in_pyora(layers, stacked):
    data = archives.build("ora", layers, stacked)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        first = archive.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert archive.read("mimetype") == b"image/openraster"
        thumbnail = Image.open(io.BytesIO(archive.read("Thumbnails/thumbnail.png")))
        assert max(thumbnail.size) <= 256
        # The spec: the first layer element in a stack is the topmost.
        stack_names = re.findall(r'<layer[^>]* name="([^"]+)"', archive.read("stack.xml").decode())
        assert stack_names == [name for name, _ in reversed(layers)]
    project = Project.load(io.BytesIO(data))
    assert tuple(project.dimensions) == SIZE
    stored = list(project.iter_layers)  # a property in pyora 0.3
    names = [layer.name for layer in stored]
    # pyora lists layers from the bottom up, as the job does: back to front.
    assert names == [name for name, _ in layers]
    for layer, (_, expected) in zip(stored, layers):
        assert layer.visible and layer.opacity == 1.0 and tuple(layer.offsets) == (0, 0)
        assert same_pixels(layer.get_image_data(raw=True), expected)
    assert same_pixels(project.get_image_data(use_original=True), stacked)


@pytest.mark.parametrize("fmt", ["zip", "psd", "ora"])
def test_rgb_layers_go_in_as_opaque(fmt):
    opaque = Image.new("RGB", SIZE, (10, 20, 30))
    data = archives.build(fmt, [("layer_0", opaque)], opaque.convert("RGBA"))
    [stored] = read_archive(fmt, data).layers
    assert stored.getchannel("A").getextrema() == (255, 255)


# --- groups: a split layer's sub-layers in its place ------------------------------

GROUPED_NAMES = ["layer_0", "layer_1/layer_1_0", "layer_1/layer_1_1", "layer_3"]


def grouped(layers) -> list:
    """The sample layers with the middle two as the group `layer_1`, as a split layer's
    sub-layers stand in an archive."""
    return [layers[0], ("layer_1", [("layer_1_0", layers[1][1]), ("layer_1_1", layers[2][1])]), layers[3]]


@pytest.mark.parametrize("fmt", ["zip", "psd", "ora"])
def test_a_group_holds_its_layers_in_its_place_and_the_composite_stacks_them_all(layers, stacked, fmt):
    contents = read_archive(fmt, archives.build(fmt, grouped(layers), stacked))
    assert_archive_holds(fmt, contents, GROUPED_NAMES, [layer for _, layer in layers], stacked)


def test_zip_puts_a_group_in_a_folder_and_names_it_in_the_manifest(layers, stacked):
    with zipfile.ZipFile(io.BytesIO(archives.build("zip", grouped(layers), stacked))) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["version"] == 1  # a reader of the flat list still stacks every layer in order
        assert [(entry["index"], entry["name"], entry["file"], entry.get("group")) for entry in manifest["layers"]] == [
            (0, "layer_0", "layers/layer_0.png", None),
            (1, "layer_1_0", "layers/layer_1/layer_1_0.png", "layer_1"),
            (2, "layer_1_1", "layers/layer_1/layer_1_1.png", "layer_1"),
            (3, "layer_3", "layers/layer_3.png", None)]
        assert "layers/layer_1.png" not in archive.namelist()


def test_psd_makes_a_pass_through_layer_group(layers, stacked):
    psd = PSDImage.open(io.BytesIO(archives.build("psd", grouped(layers), stacked)))
    assert [(layer.kind, layer.name) for layer in psd] == [("pixel", "layer_0"), ("group", "layer_1"),
                                                           ("pixel", "layer_3")]
    group = psd[1]
    # Pass-through: its layers blend with those below as if ungrouped, so the stack's composite holds.
    assert group.visible and group.blend_mode.name == "PASS_THROUGH" and group.opacity == 255
    assert [(layer.kind, layer.name) for layer in group] == [("pixel", "layer_1_0"), ("pixel", "layer_1_1")]
    assert_psd_merged_is(Image.open(io.BytesIO(archives.build("psd", grouped(layers), stacked))), stacked)


def test_ora_makes_a_nested_stack_listed_topmost_first(layers, stacked):
    data = archives.build("ora", grouped(layers), stacked)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        root = ElementTree.fromstring(archive.read("stack.xml")).find("stack")
    assert [(child.tag, child.get("name")) for child in root] == [("layer", "layer_3"), ("stack", "layer_1"),
                                                                  ("layer", "layer_0")]
    group = root.find("stack")
    assert group.get("composite-op") == "svg:src-over" and group.get("visibility") == "visible"
    assert [child.get("name") for child in group] == ["layer_1_1", "layer_1_0"]
    assert [group.name for group in Project.load(io.BytesIO(data)).iter_groups if group.name] == ["layer_1"]
