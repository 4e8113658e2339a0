"""Result images to output entries: encode, upload (or inline), describe.

Each entry is {url, key, width, height, format, bytes} plus `base64` when returned
inline. Object keys are `{BUCKET_PREFIX}/{job_id}/{attempt}/{name}.{ext}`: `attempt` is
new each time a job runs, so a job that RunPod retries under the same id, or two job
ids that read alike once made safe for a key, never overwrite each other's images, and
the images of one run stay together under one folder.
"""

from __future__ import annotations

import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from src.job.codec import CONTENT_TYPES, encode_image, to_base64
from src.plumbing.storage import Bucket

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# 8 hex digits: 2**32 values, among the few runs that one job id ever has.
ATTEMPT_ID_BYTES = 4


class OutputTooLarge(ValueError):
    """Inline images over RunPod's result size limit with no bucket to put them in."""


def new_attempt_id() -> str:
    return secrets.token_hex(ATTEMPT_ID_BYTES)


def object_key(prefix: str, job_id: str, attempt: str, name: str, fmt: str) -> str:
    safe_job = _UNSAFE_KEY_CHARS.sub("_", job_id)[:128] or "job"
    return "/".join(part for part in (prefix, safe_job, attempt, f"{name}.{fmt}") if part)


def encode_all(named: list[tuple[str, Image.Image]], fmt: str, quality: int,
               png_level: int) -> list[tuple[str, Image.Image, bytes]]:
    """Each image encoded, in parallel: PIL's encoders run without the GIL, so a
    decomposition's layers or several results take about one image's time per core."""
    def encode(image: Image.Image) -> bytes:
        return encode_image(image, fmt, quality, png_level)

    if len(named) == 1:
        return [(named[0][0], named[0][1], encode(named[0][1]))]
    with ThreadPoolExecutor(max_workers=min(len(named), os.cpu_count() or 1)) as pool:
        encoded = list(pool.map(encode, [image for _, image in named]))
    return [(name, image, data) for (name, image), data in zip(named, encoded)]


def check_inline_size(encoded: list[tuple[str, Image.Image, bytes]], max_inline_bytes: int) -> bool:
    """Whether the base64 of these images fits RunPod's result size limit."""
    return sum((len(data) + 2) // 3 * 4 for _, _, data in encoded) <= max_inline_bytes


def store_images(encoded: list[tuple[str, Image.Image, bytes]], fmt: str, *, bucket: Bucket | None,
             prefix: str, job_id: str, inline: bool, max_inline_bytes: int) -> tuple[list[dict], list[str]]:
    """Upload (when a bucket is given) and build the entries. Returns (entries, warnings)."""
    warnings: list[str] = []
    if inline and not check_inline_size(encoded, max_inline_bytes):
        if bucket is None:
            total = sum(len(data) for _, _, data in encoded)
            raise OutputTooLarge(
                f"output: {total} bytes of images do not fit in RunPod's result limit "
                f"({max_inline_bytes} bytes of base64); configure a bucket (BUCKET_* env or the job's r2) "
                "to receive URLs instead"
            )
        inline = False
        warnings.append(f"return_base64: images left out of the output, over the {max_inline_bytes}-byte "
                        "inline limit; fetch them from their url")
    attempt = new_attempt_id()
    stored = (
        bucket.put_all([(object_key(prefix, job_id, attempt, name, fmt), data, CONTENT_TYPES[fmt])
                        for name, _, data in encoded])
        if bucket is not None else [None] * len(encoded)
    )
    entries = []
    for (name, image, data), obj in zip(encoded, stored):
        entry = {"name": name, "url": obj.url if obj else None, "key": obj.key if obj else None,
                 "width": image.width, "height": image.height, "format": fmt, "bytes": len(data)}
        if inline:
            entry["base64"] = to_base64(data)
        entries.append(entry)
    return entries, warnings
