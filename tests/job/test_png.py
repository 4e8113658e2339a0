"""The parallel PNG encoder (src/job/png.py): any decoder gives back exactly the image's
pixels, at every level, for every mode it takes, across stripe seams; images carrying more
than pixels go to Pillow with it kept; job results come back as the same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from src.job import png
from src.job.codec import encode_image


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    values = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(values[:, :, 0] if channels == 1 else values, mode)


def gradient(width: int, height: int) -> Image.Image:
    """Smooth, as photographs mostly are."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) // 8 % 256], -1).astype(np.uint8))


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_every_mode_and_level_decodes_to_the_same_pixels(mode, level):
    image = random_image(mode, 517, 333, seed=level)
    back = decoded(png.encode(image, level))
    assert back.mode == mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("size", [(1, 1), (5, 1), (1, 300), (1024, 1024), (130, 1000)])
def test_sizes_from_one_pixel_to_many_stripes(size, monkeypatch):
    monkeypatch.setattr(png, "MIN_ROWS_PER_STRIPE", 7)  # many seams even on a 2-core machine
    monkeypatch.setattr(png, "available_cores", lambda: 12)
    for image in (gradient(*size), random_image("RGB", *size)):
        assert np.array_equal(np.asarray(decoded(png.encode(image, 1))), np.asarray(image))


def test_smooth_images_compress_about_as_well_as_pillow():
    image = gradient(1024, 768)
    ours = png.encode(image, 1)
    pillow = io.BytesIO()
    image.save(pillow, format="PNG", compress_level=1)
    assert len(ours) < 1.1 * len(pillow.getvalue()), (len(ours), len(pillow.getvalue()))


def test_what_png_would_carry_besides_pixels_goes_to_pillow_and_is_kept():
    image = gradient(64, 64)
    image.info["icc_profile"] = b"an icc profile"
    assert not png.supports(image) and not png.supports(gradient(8, 8).convert("P"))
    assert decoded(encode_image(image, "png", 100, 1)).info["icc_profile"] == b"an icc profile"
    assert png.supports(gradient(8, 8))
