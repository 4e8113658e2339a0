"""Image decoding limits and encoding, on real image bytes."""

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from src.job.codec import decode_image, encode_image
from src.job.schema import InputError
from tests.conftest import png_b64, sample_image

LIMITS = {"max_bytes": 1024 * 1024, "max_pixels": 1024 * 1024}


def encoded(image: Image.Image, fmt: str, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_error(data: str, **limits) -> str:
    with pytest.raises(InputError) as caught:
        decode_image(data, "image_base64", **{**LIMITS, **limits})
    return str(caught.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(encoded(sample_image(), fmt), "image_base64", **LIMITS)
    assert (image.mode, image.size) == ("RGB", (96, 64))


def test_png_pixels_are_exact_and_alpha_is_kept():
    original = sample_image(mode="RGBA")
    decoded = decode_image(png_b64(original), "image_base64", **LIMITS)
    assert decoded.mode == "RGBA"
    assert decoded.tobytes() == original.tobytes()


def test_data_uri_and_line_breaks_are_accepted():
    data = png_b64(sample_image())
    wrapped = "\n".join(data[i:i + 76] for i in range(0, len(data), 76))
    assert decode_image("data:image/png;base64," + wrapped, "image_base64", **LIMITS).size == (96, 64)


def test_exif_orientation_is_applied():
    image = sample_image(size=(80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encoded(image, "JPEG", exif=exif.tobytes())
    assert decode_image(data, "image_base64", **LIMITS).size == (40, 80)


def test_sixteen_bit_and_cmyk_images_become_rgb():
    grey16 = Image.new("I;16", (32, 32), 40000)
    assert decode_image(encoded(grey16, "PNG"), "k", **LIMITS).getpixel((0, 0)) == (155, 155, 155)
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    assert decode_image(encoded(cmyk, "JPEG"), "k", **LIMITS).mode == "RGB"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but carries one tiny IDAT: a decompression bomb's shape."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_declared_size_is_checked_before_decoding():
    bomb = base64.b64encode(_png_header_only(100_000, 100_000)).decode()
    assert "more pixels than allowed" in decode_error(bomb)
    big = base64.b64encode(_png_header_only(2000, 2000)).decode()
    assert decode_error(big) == "image_base64: image is 2000x2000 = 4000000 pixels; at most 1048576 allowed (MAX_IMAGE_PIXELS)"


def test_byte_limit_is_checked_before_base64_decoding():
    assert "larger than 1000 bytes" in decode_error("A" * 4000, max_bytes=1000)


@pytest.mark.parametrize("data, expected", [
    ("not base64 at all!", "image_base64: not valid base64"),
    ("", "image_base64: empty image"),
    (base64.b64encode(b"GIF89a not really").decode(), "image_base64: not a readable image; PNG, JPEG or WEBP expected"),
    ("data:text/plain;base64,aGVsbG8=", "image_base64: data URI of type 'text/plain'"),
    (encoded(Image.new("RGB", (8, 8)), "GIF"), "image_base64: not a readable image"),
    (encoded(Image.new("RGB", (8, 8)), "BMP"), "image_base64: not a readable image"),
])
def test_bad_data_is_refused_with_a_clear_reason(data, expected):
    assert decode_error(data).startswith(expected)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt):
    raw = base64.b64decode(encoded(sample_image(size=(256, 256)), fmt))
    truncated = base64.b64encode(raw[: len(raw) // 2]).decode()
    assert decode_error(truncated) == f"image_base64: the {fmt} data is truncated or corrupt"


def test_animated_images_are_refused():
    frames = [sample_image(seed=s) for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:])
    assert "animated images are not accepted" in decode_error(base64.b64encode(buffer.getvalue()).decode())


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trips(fmt):
    image = sample_image(size=(64, 48))
    decoded = Image.open(io.BytesIO(encode_image(image, fmt, 95)))
    assert decoded.format == fmt.upper() and decoded.size == (64, 48)
    if fmt == "png":
        assert decoded.convert("RGB").tobytes() == image.tobytes()


def test_png_levels_keep_the_pixels_and_trade_bytes():
    """PNG_COMPRESS_LEVEL changes only the time and the file's size."""
    image = Image.linear_gradient("L").resize((256, 256)).convert("RGB")
    files = {level: encode_image(image, "png", 100, level) for level in (0, 1, 9)}
    for data in files.values():
        assert Image.open(io.BytesIO(data)).convert("RGB").tobytes() == image.tobytes()
    assert len(files[0]) > len(files[1]) > len(files[9])


def test_every_base64_spelling_decodes_to_the_same_image():
    """Canonical base64 takes a fast path; whitespace, URL-safe letters and missing
    padding take the checked one: the same pixels either way."""
    canonical = png_b64(sample_image(size=(40, 30)))
    unpadded = canonical.rstrip("=")
    spellings = [canonical, canonical[:20] + "\n" + canonical[20:],
                 unpadded.replace("+", "-").replace("/", "_"), unpadded]
    images = [decode_image(text, "image_base64", 10 * 2**20, 2**24).tobytes() for text in spellings]
    assert images == [images[0]] * len(spellings)


def padded_png_b64() -> str:
    """A PNG's base64 that ends in '=' padding (its byte count not a multiple of 3)."""
    for width in range(40, 60):
        text = png_b64(sample_image(size=(width, 30)))
        if text.endswith("="):
            return text
    raise AssertionError("no padded encoding found")


@pytest.mark.parametrize("spoil, expected", [
    # One character lost in the middle: the '=' is where it belongs; the length is the fault.
    (lambda t: t[:100] + t[101:], lambda t: f"image_base64: not valid base64: {len(t) - 1} characters with its '=' "
     f"padding, but padded base64 comes in groups of 4 ({len(t) - 4} or {len(t)} here): cut short or with extra "
     "characters?"),
    (lambda t: t[:50] + "=" + t[50:], lambda t: f"image_base64: not valid base64: '=' at character 50 of "
     f"{len(t) + 1}; '=' may only pad the end"),
    (lambda t: t.rstrip("=") + "===", lambda t: "image_base64: not valid base64: ends in 3 '='; padding is at most 2"),
])
def test_base64_errors_say_what_is_wrong_with_it(spoil, expected):
    text = padded_png_b64()
    assert decode_error(spoil(text)) == expected(text)
