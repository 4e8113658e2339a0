"""The layers and their composite in one file (`archive`), stored next to the images.

Three formats, each with the layers back to front, named as in the job output
(`layer_0`, `edited_layer_2`...), full-canvas, 8-bit RGBA. A group (a split layer's
sub-layers, named after the layer) stands in the stack where the layer would:

* `zip`: `layers/<name>.png` for each layer (`layers/<group>/<name>.png` in a group),
  `composite.png`, and `manifest.json` giving the canvas size and every layer, back to
  front, with its name, file and group: stacking its list gives the composite. For scripts.
* `psd`: a layered Photoshop file (psd-tools): one named pixel layer per layer, in
  order, with its transparency, groups as layer groups, and the composite as the merged image.
* `ora`: OpenRaster (GIMP, Krita, MyPaint): `stack.xml` (a group is a nested stack),
  `data/<name>.png`, `mergedimage.png` and `Thumbnails/thumbnail.png`, written to the
  spec by hand: the format is a ZIP with a fixed layout and needs no library.
"""

from __future__ import annotations

import io
import json
import zipfile
from xml.etree import ElementTree

from PIL import Image
from psd_tools import PSDImage
from psd_tools.constants import Tag

from src.job.codec import PNG_COMPRESS_LEVEL, to_base64
from src.plumbing.storage import Bucket
from src.serving.results import OutputTooLarge, encode_all

ARCHIVE_NAME = "layers"
CONTENT_TYPES = {"zip": "application/zip", "psd": "image/vnd.adobe.photoshop", "ora": "image/openraster"}
MANIFEST_FORMAT = "qwen-image-layers"
MANIFEST_VERSION = 1
ORA_MIMETYPE = b"image/openraster"
ORA_VERSION = "0.0.6"
ORA_THUMBNAIL_MAX_SIDE = 256  # the spec's limit for Thumbnails/thumbnail.png

NamedLayers = list[tuple[str, Image.Image]]
# Back to front: (name, image) for a layer, (name, its layers back to front) for a group.
ArchiveStack = list[tuple[str, "Image.Image | NamedLayers"]]


def build(fmt: str, layers: ArchiveStack, composite: Image.Image, png_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """The archive's bytes. `layers` are (name, RGBA image) back to front, all the size of
    `composite`, or (name, such layers) for a group; `composite` is their alpha-over."""
    writers = {"zip": _zip, "psd": _psd, "ora": _ora}
    rgba = [(name, [(sub, layer.convert("RGBA")) for sub, layer in content] if isinstance(content, list)
             else content.convert("RGBA")) for name, content in layers]
    return writers[fmt](rgba, composite.convert("RGBA"), png_level)


def _leaves(layers: ArchiveStack) -> list[tuple[str | None, str, Image.Image]]:
    """Every layer back to front as (its group or None, name, image)."""
    leaves = []
    for name, content in layers:
        if isinstance(content, list):
            leaves += [(name, sub_name, layer) for sub_name, layer in content]
        else:
            leaves.append((None, name, content))
    return leaves


def _pngs(images: list[Image.Image], png_level: int) -> list[bytes]:
    """PNG files of `images`, encoded in parallel (quality applies to jpeg and webp only)."""
    return [data for _, _, data in encode_all([("", image) for image in images], "png", 100, png_level)]


def _zip(layers: ArchiveStack, composite: Image.Image, png_level: int) -> bytes:
    leaves = _leaves(layers)
    entries = []
    for i, (group, name, _) in enumerate(leaves):
        entry = {"index": i, "name": name, "file": f"layers/{group}/{name}.png" if group else f"layers/{name}.png"}
        entries.append(entry | {"group": group} if group else entry)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "order": "back to front",
        "width": composite.width,
        "height": composite.height,
        "layers": entries,
        "composite": "composite.png",
    }
    buffer = io.BytesIO()
    # PNGs are compressed already: stored as they are, they cost no second compression.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2), compress_type=zipfile.ZIP_DEFLATED)
        *layer_pngs, composite_png = _pngs([layer for _, _, layer in leaves] + [composite], png_level)
        for entry, data in zip(entries, layer_pngs):
            archive.writestr(entry["file"], data)
        archive.writestr("composite.png", composite_png)
    return buffer.getvalue()


def _psd(layers: ArchiveStack, composite: Image.Image, png_level: int) -> bytes:  # PSD holds no PNG
    psd = PSDImage.new("RGBA", composite.size)
    for name, content in layers:  # each new layer or group goes on top: back to front
        if isinstance(content, list):
            group = psd.create_group(name=name)  # pass-through: its layers blend as if ungrouped
            for sub_name, layer in content:
                group.create_pixel_layer(layer, name=sub_name)
        else:
            psd.create_pixel_layer(content, name=name)
    # Photoshop marks a merged image with transparency with this block. Without it,
    # psd-tools (1.26) writes the merged image's alpha as 0, and viewers that show the
    # merged image (previews, thumbnails) would show nothing.
    psd.tagged_blocks.set_data(Tag.SAVING_MERGED_TRANSPARENCY)
    buffer = io.BytesIO()
    psd.save(buffer)  # renders the merged image from the layers: the same alpha-over
    return buffer.getvalue()


def _ora(layers: ArchiveStack, composite: Image.Image, png_level: int) -> bytes:
    image = ElementTree.Element("image", version=ORA_VERSION, w=str(composite.width), h=str(composite.height))
    _ora_stack(ElementTree.SubElement(image, "stack"), layers)
    thumbnail = composite.copy()
    thumbnail.thumbnail((ORA_THUMBNAIL_MAX_SIDE, ORA_THUMBNAIL_MAX_SIDE))
    leaves = _leaves(layers)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        # The spec: `mimetype` first and uncompressed, so the type can be read at a fixed offset.
        archive.writestr("mimetype", ORA_MIMETYPE)
        archive.writestr("stack.xml", ElementTree.tostring(image, encoding="UTF-8", xml_declaration=True),
                         compress_type=zipfile.ZIP_DEFLATED)
        *layer_pngs, composite_png, thumbnail_png = _pngs([layer for _, _, layer in leaves] + [composite, thumbnail],
                                                          png_level)
        for (_, name, _), data in zip(leaves, layer_pngs):
            archive.writestr(f"data/{name}.png", data)
        archive.writestr("mergedimage.png", composite_png)
        archive.writestr("Thumbnails/thumbnail.png", thumbnail_png)
    return buffer.getvalue()


def _ora_stack(stack: ElementTree.Element, layers: ArchiveStack) -> None:
    """`layers` into `stack.xml`'s element `stack`, topmost first as the spec lists them; a
    group as a nested stack."""
    placement = {"x": "0", "y": "0", "opacity": "1.0", "visibility": "visible", "composite-op": "svg:src-over"}
    for name, content in reversed(layers):
        if isinstance(content, list):
            _ora_stack(ElementTree.SubElement(stack, "stack", name=name, **placement), content)
        else:
            ElementTree.SubElement(stack, "layer", name=name, src=f"data/{name}.png", **placement)


def store_archive(data: bytes, fmt: str, *, layer_count: int, size: tuple[int, int], bucket: Bucket | None,
             image_entries: list[dict], inline: bool, max_inline_bytes: int) -> tuple[dict, list[str]]:
    """Store the archive next to the job's images (same folder, named `layers.<fmt>`) and
    describe it; inline as base64 when asked and it fits with the images already inline.
    Returns (entry, warnings)."""
    entry: dict = {"name": ARCHIVE_NAME, "url": None, "key": None, "format": fmt,
                   "content_type": CONTENT_TYPES[fmt], "bytes": len(data), "layers": layer_count,
                   "width": size[0], "height": size[1]}
    warnings: list[str] = []
    if bucket is not None:
        folder = image_entries[0]["key"].rsplit("/", 1)[0]
        stored = bucket.put(f"{folder}/{ARCHIVE_NAME}.{fmt}", data, CONTENT_TYPES[fmt])
        entry.update(url=stored.url, key=stored.key)
    if inline:
        inline_bytes = sum(len(image.get("base64", "")) for image in image_entries)
        if inline_bytes + (len(data) + 2) // 3 * 4 <= max_inline_bytes:
            entry["base64"] = to_base64(data)
        elif bucket is None:
            raise OutputTooLarge(
                f"output: the {len(data)}-byte {fmt} archive and the images do not fit in RunPod's result limit "
                f"({max_inline_bytes} bytes of base64); configure a bucket (BUCKET_* env or the job's r2) "
                "to receive URLs instead, or leave out archive")
        else:
            warnings.append(f"return_base64: the archive left out of the output, over the {max_inline_bytes}-byte "
                            "inline limit; fetch it from its url")
    return entry, warnings
