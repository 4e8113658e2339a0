"""A corpus of hostile job inputs: what broken clients and attackers send to a public
endpoint. Each case names the key its error must start with.

Inputs are built when a test asks for them (`case.job_input()`), so the 50 MB ones
exist one at a time.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from tests.conftest import FAST, png_b64, sample_image
from tests.job.test_codec import _png_header_only

FIFTY_MB = 50 * 1024 * 1024
DEEP = 100_000  # nesting levels: far past Python's recursion limit


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[], Any]  # builds job["input"]
    key: str  # the error starts with f"{key}: "
    hidden: str | None = None  # a secret the error must not repeat

    def job_input(self) -> Any:
        return self.make()


# --- image payloads -------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A valid small PNG with one extra chunk right after IHDR."""
    raw = encoded(sample_image(size=(16, 16)), "PNG")
    ihdr_end = 8 + 25
    return raw[:ihdr_end] + _chunk(kind, body) + raw[ihdr_end:]


def png_16bit_bomb() -> bytes:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 16, 6, 0, 0, 0)  # 16-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b"")


def png_bad_crc() -> bytes:
    raw = bytearray(encoded(sample_image(), "PNG"))
    raw[29] ^= 0xFF  # IHDR's CRC
    return bytes(raw)


def jpeg_declaring(width: int, height: int) -> bytes:
    raw = encoded(Image.new("RGB", (8, 8)), "JPEG")
    frame = raw.find(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    return raw[:frame + 5] + struct.pack(">HH", height, width) + raw[frame + 9:]


def webp_declaring(width: int, height: int) -> bytes:
    """A WEBP whose VP8X header declares a canvas, with no image data."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def one_character_over(data: str) -> str:
    """Cut to a length of 4n + 1 characters: no byte string encodes to that."""
    data = data.rstrip("=")
    return data[: len(data) - (len(data) - 1) % 4]


def truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def animated(fmt: str) -> bytes:
    frames = [sample_image(seed=s) for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def valid_png() -> str:
    return png_b64(sample_image())


def with_image(make_data: Callable[[], str]) -> Callable[[], dict]:
    return lambda: {"image_base64": make_data(), "prompt": "x"}


def edit(**fields) -> Callable[[], dict]:
    """A valid small edit job with some fields replaced (built lazily)."""
    def make() -> dict:
        values = {key: value() if callable(value) else value for key, value in fields.items()}
        return {"image_base64": valid_png(), "prompt": "make it blue", **FAST, **values}
    return make


def nested_list(depth: int) -> list:
    outer: list = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


def nested_dict(depth: int) -> dict:
    outer: dict = {}
    inner = outer
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return outer


R2 = {"endpoint_url": "https://account.r2.cloudflarestorage.com", "access_key_id": "AKIAHOSTILE",
      "secret_access_key": "hostile-secret-value", "bucket_name": "results"}
# A presigned URL's secret parts: neither may reach an error, whatever carries the URL.
SIGNATURE = "a81f3c9e5d7b20461e"
PRESIGNED = ("https://bucket.example/loras/style.safetensors?X-Amz-Credential=AKIAPRESIGNED%2F20260101"
             f"&X-Amz-Signature={SIGNATURE}")
LIGHTNING_REPO = "lightx2v/Qwen-Image-Edit-2511-Lightning"


def lora(**entry) -> Callable[[], dict]:
    """A valid small edit with one LoRA entry."""
    return edit(loras=[entry])


def shaped_png(width: int, height: int) -> Callable[[], str]:
    return lambda: b64(encoded(Image.new("RGB", (width, height), (90, 120, 30)), "PNG"))

IMAGE = "image_base64"
CASES: list[Hostile] = [
    # Decompression bombs: the declared size is refused before any pixel is decoded.
    Hostile("png declaring 100000x100000", with_image(lambda: b64(_png_header_only(100_000, 100_000))), IMAGE),
    Hostile("16-bit png declaring 100000x100000", with_image(lambda: b64(png_16bit_bomb())), IMAGE),
    Hostile("jpeg declaring 65000x65000", with_image(lambda: b64(jpeg_declaring(65_000, 65_000))), IMAGE),
    Hostile("webp declaring 16383x16383", with_image(lambda: b64(webp_declaring(16_383, 16_383))), IMAGE),
    Hostile("png with a 50 MB zTXt bomb", with_image(lambda: b64(png_with_chunk(
        b"zTXt", b"comment\0\0" + zlib.compress(b"a" * FIFTY_MB)))), IMAGE),
    Hostile("png with a 50 MB iCCP bomb", with_image(lambda: b64(png_with_chunk(
        b"iCCP", b"icc\0\0" + zlib.compress(b"a" * FIFTY_MB)))), IMAGE),
    # Truncated, corrupt and wrong-format data.
    Hostile("truncated png", with_image(lambda: b64(truncated(encoded(sample_image(size=(256, 256)), "PNG")))), IMAGE),
    Hostile("truncated jpeg", with_image(lambda: b64(truncated(encoded(sample_image(size=(256, 256)), "JPEG")))), IMAGE),
    Hostile("truncated cmyk jpeg", with_image(lambda: b64(truncated(encoded(
        sample_image(size=(256, 256)).convert("CMYK"), "JPEG")))), IMAGE),
    Hostile("png signature only", with_image(lambda: b64(b"\x89PNG\r\n\x1a\n")), IMAGE),
    Hostile("jpeg start marker only", with_image(lambda: b64(b"\xff\xd8\xff")), IMAGE),
    Hostile("png with a bad IHDR checksum", with_image(lambda: b64(png_bad_crc())), IMAGE),
    Hostile("gif magic", with_image(lambda: b64(encoded(Image.new("RGB", (8, 8)), "GIF"))), IMAGE),
    Hostile("bmp magic", with_image(lambda: b64(encoded(Image.new("RGB", (8, 8)), "BMP"))), IMAGE),
    Hostile("tiff magic", with_image(lambda: b64(encoded(Image.new("RGB", (8, 8)), "TIFF"))), IMAGE),
    Hostile("pdf magic", with_image(lambda: b64(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")), IMAGE),
    Hostile("svg text", with_image(lambda: b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')), IMAGE),
    Hostile("animated png", with_image(lambda: b64(animated("PNG"))), IMAGE),
    Hostile("animated webp", with_image(lambda: b64(animated("WEBP"))), IMAGE),
    # Base64 and data URIs.
    Hostile("characters outside base64", with_image(lambda: "iVBORw0KGgo!!!!"), IMAGE),
    Hostile("standard and url-safe alphabets mixed", with_image(lambda: "ab+/cd-_" * 4), IMAGE),
    Hostile("padding inside the data", with_image(lambda: valid_png()[:40] + "=" + valid_png()[40:]), IMAGE),
    Hostile("too much padding", with_image(lambda: valid_png().rstrip("=") + "===="), IMAGE),
    Hostile("length no bytes encode to", with_image(lambda: one_character_over(valid_png())), IMAGE),
    Hostile("data uri of text/plain", with_image(lambda: "data:text/plain;base64,aGVsbG8="), IMAGE),
    Hostile("data uri of application/pdf", with_image(lambda: "data:application/pdf;base64,JVBERi0xLjQ="), IMAGE),
    Hostile("data uri of image/svg+xml", with_image(lambda: "data:image/svg+xml;base64," + b64(b"<svg/>")), IMAGE),
    Hostile("data uri without base64", with_image(lambda: "data:image/png," + valid_png()), IMAGE),
    Hostile("empty image", with_image(lambda: ""), IMAGE),
    Hostile("50 MB image_base64", lambda: {"image_base64": "A" * FIFTY_MB, "prompt": "x"}, IMAGE),
    Hostile("50 MB second image", lambda: {"image_base64": valid_png(), "images_base64": ["A" * FIFTY_MB],
                                           "prompt": "x"}, "images_base64[0]"),
    # Wrong types, NaN and infinity, booleans where integers go, out-of-range numbers.
    Hostile("image_base64 a number", edit(image_base64=12345), IMAGE),
    Hostile("image_base64 a list", edit(image_base64=[valid_png()]), IMAGE),
    Hostile("image_base64 null", edit(image_base64=None), IMAGE),
    Hostile("prompt an object", edit(prompt={"text": "x"}), "prompt"),
    Hostile("prompt bytes-like list", edit(prompt=[104, 105]), "prompt[0]"),
    Hostile("50 MB prompt", edit(prompt=lambda: "a" * FIFTY_MB), "prompt"),
    Hostile("50 MB negative_prompt", edit(negative_prompt=lambda: "a" * FIFTY_MB), "negative_prompt"),
    Hostile("50 MB operation", edit(operation=lambda: "e" * FIFTY_MB), "operation"),
    Hostile("steps true", edit(num_inference_steps=True), "num_inference_steps"),
    Hostile("steps a string", edit(num_inference_steps="8"), "num_inference_steps"),
    Hostile("steps a million", edit(num_inference_steps=1_000_000), "num_inference_steps"),
    Hostile("width false", edit(width=False), "width"),
    Hostile("width a float", edit(width=512.0), "width"),
    Hostile("seed negative", edit(seed=-1), "seed"),
    Hostile("seed 2**64", edit(seed=2**64), "seed"),
    Hostile("seed a 5000-digit integer", edit(seed=10**5000), "seed"),
    Hostile("seed a float", edit(seed=1.5), "seed"),
    Hostile("true_cfg_scale NaN", edit(true_cfg_scale=float("nan")), "true_cfg_scale"),
    Hostile("guidance_scale infinity", edit(guidance_scale=float("inf")), "guidance_scale"),
    Hostile("guidance_scale -infinity", edit(guidance_scale=float("-inf")), "guidance_scale"),
    Hostile("output_quality 0", edit(output_format="jpeg", output_quality=0), "output_quality"),
    Hostile("return_base64 a string", edit(return_base64="yes"), "return_base64"),
    # Prompts with NUL and control characters.
    Hostile("prompt with NUL", edit(prompt="make it\x00 blue"), "prompt"),
    Hostile("prompt of control characters", edit(prompt="\x01\x02\x1b[2J"), "prompt"),
    Hostile("prompt with a lone surrogate", edit(prompt="blue \ud800"), "prompt"),
    Hostile("prompt only whitespace", edit(prompt=" \t\n "), "prompt"),
    # Deeply nested junk.
    Hostile("prompt nested 100000 deep", edit(prompt=lambda: nested_dict(DEEP)), "prompt"),
    Hostile("seed nested 100000 deep", edit(seed=lambda: nested_list(DEEP)), "seed"),
    Hostile("r2 nested 100000 deep", edit(r2=lambda: nested_dict(DEEP)), "r2.endpoint_url"),
    # Too many images, unknown keys, the wrong shape of input.
    Hostile("four images", edit(images_base64=lambda: [valid_png()] * 3), "images_base64"),
    Hostile("a thousand images", edit(images_base64=lambda: ["QUFB"] * 1000), "images_base64"),
    Hostile("images_base64 an object", edit(images_base64={"0": "QUFB"}), "images_base64"),
    Hostile("images_base64 holding a number", edit(images_base64=[7]), "images_base64[0]"),
    Hostile("edit_multi with one image", edit(operation="edit_multi"), "images_base64"),
    Hostile("unknown key", edit(strength=0.8), "strength"),
    Hostile("unknown key 1 MB long", lambda: {"image_base64": "QUFB", "prompt": "x", "k" * 2**20: 1},
            "'" + "k" * 80 + "'... (1048576 characters)"),
    Hostile("unknown key with NUL", edit(**{"bad\x00key": 1}), "'bad\\x00key'"),
    Hostile("decompose with a width", lambda: {"operation": "decompose", "image_base64": valid_png(),
                                               "width": 512}, "width"),
    Hostile("rgba input with jpeg output", lambda: {"image_base64": png_b64(sample_image(mode="RGBA")),
                                                    "prompt": "x", "output_format": "jpeg"}, "output_format"),
    Hostile("input a list", lambda: [1, 2, 3], "input"),
    Hostile("input null", lambda: None, "input"),
    Hostile("input a 50 MB string", lambda: "A" * FIFTY_MB, "input"),
    # A job's own bucket, malformed.
    Hostile("r2 missing bucket_name", edit(r2={k: v for k, v in R2.items() if k != "bucket_name"}), "r2.bucket_name"),
    Hostile("r2 missing the secret", edit(r2={k: v for k, v in R2.items() if k != "secret_access_key"}),
            "r2.secret_access_key"),
    Hostile("r2 a string", edit(r2="https://account.r2.cloudflarestorage.com"), "r2"),
    Hostile("r2 empty", edit(r2={}), "r2.endpoint_url"),
    Hostile("r2 unknown key", edit(r2={**R2, "session_token": "x"}), "r2.session_token"),
    Hostile("r2 secret a number", edit(r2={**R2, "secret_access_key": 1234567}), "r2.secret_access_key",
            hidden="1234567"),
    Hostile("r2 bucket_name a number, secret beside it", edit(r2={**R2, "bucket_name": 5}), "r2.bucket_name",
            hidden=R2["secret_access_key"]),
    Hostile("r2 ftp endpoint with credentials", edit(r2={**R2, "endpoint_url": "ftp://user:hostile-password@host"}),
            "r2.endpoint_url", hidden="hostile-password"),
    # LoRA sources no path or URL can be, and paths out of their roots.
    Hostile("lora source 2000 characters", lora(source="a" * 2000), "loras[0].source"),
    Hostile("lora source 1 MB", lora(source="a" * 2**20), "loras[0].source"),
    Hostile("lora source a 300-character repo id", lora(source="owner/" + "n" * 294), "loras[0].source"),
    Hostile("lora source a repo id with '--'", lora(source="own--er/name"), "loras[0].source"),
    Hostile("lora source with NUL", lora(source="/runpod-volume/style\x00.safetensors"), "loras[0].source"),
    Hostile("lora source with a line break", lora(source="owner/name\nX-Injected: 1"), "loras[0].source"),
    Hostile("lora source file://", lora(source="file:///etc/passwd"), "loras[0].source"),
    Hostile("lora source ftp with credentials", lora(source="ftp://user:hostile-password@host/x.safetensors"),
            "loras[0].source", hidden="hostile-password"),
    Hostile("lora source scheme in capitals, presigned", lora(source=PRESIGNED.replace("https", "HTTPS")),
            "loras[0].source", hidden=SIGNATURE),
    Hostile("lora source with one slash after the scheme, presigned", lora(source=PRESIGNED.replace("//", "/", 1)),
            "loras[0].source", hidden=SIGNATURE),
    Hostile("lora source an unclosed IPv6 host", lora(source="http://[::1/x.safetensors"), "loras[0].source"),
    Hostile("lora source s3 without a key", lora(source="s3://bucket"), "loras[0].source"),
    Hostile("lora source outside LORA_ROOTS", lora(source="/etc/hostname"), "loras[0].source"),
    Hostile("lora source climbing out of LORA_ROOTS", lora(source="../../../../../../etc/hostname"), "loras[0].source"),
    Hostile("lora weight_name climbing out of its snapshot", lora(source=LIGHTNING_REPO,
                                                                  weight_name="../../../../../../etc/hostname"),
            "loras[0].weight_name"),
    Hostile("lora weight_name absolute", lora(source=LIGHTNING_REPO, weight_name="/etc/hostname"),
            "loras[0].weight_name"),
    Hostile("lora weight_name a 300-byte name", lora(source=LIGHTNING_REPO, weight_name="é" * 150),
            "loras[0].weight_name"),
    # A presigned URL in an entry of the wrong shape: echoed, if at all, without its secret parts.
    Hostile("loras an object with a presigned url", edit(loras={"source": PRESIGNED}), "loras", hidden=SIGNATURE),
    Hostile("loras a presigned url", edit(loras=PRESIGNED), "loras", hidden=SIGNATURE),
    Hostile("loras a list of presigned urls", edit(loras=[PRESIGNED]), "loras[0]", hidden=SIGNATURE),
    Hostile("loras mapping a presigned url to a scale", edit(loras={PRESIGNED: 0.8}), "loras", hidden=SIGNATURE),
    Hostile("lora scale a presigned url", lora(source=LIGHTNING_REPO, scale=PRESIGNED), "loras[0].scale",
            hidden=SIGNATURE),
    Hostile("image_url an object with a presigned url", edit(image_base64=None, image_url={"url": PRESIGNED}),
            "image_url", hidden=SIGNATURE),
    Hostile("a presigned url as an unknown key", edit(**{PRESIGNED: 1}),
            "'https://bucket.example/loras/style.safetensors'", hidden=SIGNATURE),
    # Image shapes the pipelines cannot take (README, Job input: aspect ratio).
    Hostile("png of 1x1000", with_image(shaped_png(1, 1000)), IMAGE),
    Hostile("png of 3000x10", with_image(shaped_png(3000, 10)), IMAGE),
    Hostile("decompose of a 1x200 png", lambda: {"operation": "decompose", "image_base64": shaped_png(1, 200)()},
            IMAGE),
]

# Inputs a strict reading might refuse, which the worker takes and serves correctly.
TOLERATED: list[tuple[str, Callable[[], str]]] = [
    ("cmyk jpeg", lambda: b64(encoded(sample_image().convert("CMYK"), "JPEG"))),
    ("16-bit greyscale png", lambda: b64(encoded(Image.new("I;16", (64, 64), 40_000), "PNG"))),
    ("base64 with spaces, tabs and line breaks", lambda: " \t\r\n".join(valid_png()[i:i + 60]
                                                                   for i in range(0, len(valid_png()), 60))),
    ("url-safe base64 without padding", lambda: base64.urlsafe_b64encode(
        encoded(sample_image(size=(97, 61)), "PNG")).decode().rstrip("=")),
    ("data uri in capitals", lambda: "DATA:IMAGE/PNG;BASE64," + valid_png()),
    ("multi-picture jpeg (a phone photo with a gain map)", lambda: b64(
        _mpo(sample_image(), sample_image(size=(48, 32), seed=3)))),
]


def _mpo(primary: Image.Image, extra: Image.Image) -> bytes:
    buffer = io.BytesIO()
    primary.save(buffer, format="MPO", save_all=True, append_images=[extra])
    return buffer.getvalue()
