"""Images in and out: base64 to a checked PIL image, PIL image to encoded bytes.

Limits are checked in order of cost: the base64 length before decoding it, the
declared pixel count from the header before decoding pixels, then the full decode.
Base64 may use the standard or the URL-safe alphabet, with or without its '='
padding; anything else is refused with the key named, never guessed at.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps

from src.job import png
from src.job.schema import MAX_ASPECT_RATIO, InputError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_DATA_URI = re.compile(r"^data:([^;,]*)(;[^,]*)?,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_OUTSIDE_ALPHABETS = re.compile(r"[^A-Za-z0-9+/_=-]")
_STANDARD_ONLY = re.compile(r"[+/]")
_URL_SAFE_ONLY = re.compile(r"[-_]")
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
# PNG compression level (PNG_COMPRESS_LEVEL): the worker pays for encoding in GPU
# seconds, and PNG is lossless at every level, so the fastest level measured wins over a
# few percent of bytes (docs/performance.md, "Levers for the 4-step job").
PNG_COMPRESS_LEVEL = 1


def decode_image(data: str, key: str, max_bytes: int, max_pixels: int, operation: str | None = None) -> Image.Image:
    """Base64 (raw or data URI) to an RGB or RGBA image with EXIF orientation applied;
    `operation`: the job's, whose pipeline must be able to take the image's shape."""
    payload = _strip_data_uri(data, key)
    # 3 bytes per 4 characters: reject oversize input before spending memory on it.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InputError(f"{key}: image is larger than {max_bytes} bytes (MAX_IMAGE_BYTES)")
    raw = _decode_base64(payload, key)
    if len(raw) > max_bytes:
        raise InputError(f"{key}: image is {len(raw)} bytes; at most {max_bytes} allowed (MAX_IMAGE_BYTES)")
    return open_image(raw, key, max_pixels, operation)


def open_image(raw: bytes, key: str, max_pixels: int, operation: str | None = None) -> Image.Image:
    """Image bytes (a decoded payload or a download, already within MAX_IMAGE_BYTES) to a
    checked RGB or RGBA image; the format is sniffed from the bytes, never trusted from a
    name or a Content-Type."""
    if not raw:
        raise InputError(f"{key}: empty image")
    return _open_checked(raw, key, max_pixels, operation)


def _decode_base64(payload: str, key: str) -> bytes:
    """RFC 4648 base64 in the standard or the URL-safe alphabet (JavaScript's base64url
    encoders are common clients), whitespace ignored, '=' padding optional since
    base64url usually leaves it out. A mix of the two alphabets, padding anywhere but
    at the end, or a length no byte string encodes to is refused."""
    try:  # most clients send canonical standard base64: one C pass, far faster than the checks below
        raw = binascii.a2b_base64(payload, strict_mode=True)
        # strict_mode still takes '=' padding after a whole group ("aGVs===="): the length tells.
        if len(raw) == len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip("="))):
            return raw
    except (binascii.Error, ValueError):
        pass  # anything else is checked step by step, for an error that says what is wrong
    text = _WHITESPACE.sub("", payload)
    if _OUTSIDE_ALPHABETS.search(text):
        raise InputError(f"{key}: not valid base64: characters outside the base64 alphabet")
    if _URL_SAFE_ONLY.search(text):
        if _STANDARD_ONLY.search(text):
            raise InputError(f"{key}: not valid base64: mixes the standard (+/) and URL-safe (-_) alphabets")
        text = text.translate(_URL_SAFE_TO_STANDARD)
    data = text.rstrip("=")
    padding = len(text) - len(data)
    if "=" in data:
        raise InputError(f"{key}: not valid base64: '=' at character {data.index('=')} of {len(text)}; "
                         "'=' may only pad the end")
    if padding > 2:
        raise InputError(f"{key}: not valid base64: ends in {padding} '='; padding is at most 2")
    if padding and len(text) % 4:
        # A padded string cut short (or with extra characters): the fault is its length, not the '='.
        whole = len(text) // 4 * 4
        raise InputError(f"{key}: not valid base64: {len(text)} characters with its '=' padding, but padded base64 "
                         f"comes in groups of 4 ({whole} or {whole + 4} here): cut short or with extra characters?")
    if len(data) % 4 == 1:
        raise InputError(f"{key}: not valid base64: {len(data)} characters cannot encode whole bytes (truncated?)")
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except binascii.Error:  # not expected after the checks above; refused all the same
        raise InputError(f"{key}: not valid base64") from None


def _strip_data_uri(data: str, key: str) -> str:
    match = _DATA_URI.match(data[:200])
    if not match:
        return data
    media_type, params = match.group(1).lower(), (match.group(2) or "").lower()
    if not media_type.startswith("image/"):
        raise InputError(f"{key}: data URI of type {media_type or 'unknown'!r}; only image/png, "
                         "image/jpeg and image/webp are accepted")
    if "base64" not in params:
        raise InputError(f"{key}: data URI must be base64-encoded (';base64,')")
    return data[match.end():]


def _open_checked(raw: bytes, key: str, max_pixels: int, operation: str | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{key}: image declares more pixels than allowed ({max_pixels}, MAX_IMAGE_PIXELS)") from None
    except Exception:  # PIL raises several types for unreadable data
        raise InputError(f"{key}: not a readable image; PNG, JPEG or WEBP expected") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(f"{key}: image is {width}x{height} = {width * height} pixels; "
                         f"at most {max_pixels} allowed (MAX_IMAGE_PIXELS)")
    _check_aspect_ratio(width, height, key, operation)
    # A multi-picture JPEG (MPO) is one photo plus extras such as the HDR gain map that
    # iPhone and Android cameras embed: its first frame is the photo. Other formats with
    # several frames are animations.
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        raise InputError(f"{key}: animated images are not accepted; send a single frame")
    try:
        image.load()
    except Exception:
        raise InputError(f"{key}: the {image.format} data is truncated or corrupt") from None
    image = ImageOps.exif_transpose(image)
    return _normalise_mode(image)


def _check_aspect_ratio(width: int, height: int, key: str, operation: str | None) -> None:
    """The shape, from the header (EXIF rotation keeps the ratio), against what the
    operation's pipeline can take (schema.MAX_ASPECT_RATIO)."""
    limit = MAX_ASPECT_RATIO.get(operation)
    if limit is None:
        return
    ratio = max(width, height) / min(width, height)  # PIL opens no image with a side of 0
    if ratio > limit:
        raise InputError(f"{key}: image is {width}x{height}, {ratio:.1f}:1 between its sides; {operation} takes "
                         f"at most {limit}:1 (its pipeline cannot resize a longer shape for the vision-language "
                         "encoder); crop or pad it")


def _normalise_mode(image: Image.Image) -> Image.Image:
    """RGBA where the image carries transparency, RGB otherwise."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip.
        image = image.point(lambda v: v / 257).convert("L")
    return image.convert("RGBA" if has_alpha else "RGB")


def encode_image(image: Image.Image, fmt: str, quality: int, png_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        if png.supports(image):  # the same pixels, encoded on every core (src/job/png.py)
            return png.encode(image, png_level)
        image.save(buffer, format="PNG", compress_level=png_level)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_base64(image: Image.Image) -> str:
    """An image as a job sends it: lossless PNG in base64 (the tools' inputs)."""
    return to_base64(encode_image(image, "png", quality=100))  # quality: jpeg and webp only
