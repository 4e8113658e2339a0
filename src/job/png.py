"""Lossless PNG encoding on every core.

Pillow encodes a PNG on one thread and tries PNG's five row filters on every row, on the job's
critical path while the GPU waits. Here the rows are cut into stripes, each Paeth-filtered and
deflated on its own thread (numpy and zlib release the GIL), and the pieces joined into one
zlib stream the way pigz joins them: every stripe but the last ends on a byte boundary with an
empty stored block (`Z_SYNC_FLUSH`), so the raw deflate streams concatenate into one valid
stream. A stripe starts with no history, which costs a few bytes at each seam.

Invariants: the pixels are exactly the image's (any PNG decoder gives them back); the bytes
differ from Pillow's. Images with anything PNG would carry besides pixels (an ICC profile, a
transparency colour, text: `image.info`) and modes other than L, LA, RGB and RGBA are left to
Pillow. What it saves: docs/performance.md, "Levers for the 4-step job".
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}
PAETH = 4
# Fewer rows than this per stripe and the threads' overhead outweighs their work.
MIN_ROWS_PER_STRIPE = 64
# More threads than this gain little on a 1024x1024 image (and a container may be shown
# more cores than its quota).
MAX_STRIPES = 16
# zlib's header for a 32 KiB window (CMF 0x78) with a check value that makes it divide by 31.
ZLIB_HEADER = b"\x78\x01"


def supports(image: Image.Image) -> bool:
    """Whether `encode` writes this image exactly as Pillow would describe it."""
    return image.mode in COLOR_TYPES and not image.info


def encode(image: Image.Image, level: int) -> bytes:
    """The image as PNG bytes, deflated at zlib `level` (0-9)."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height = pixels.shape[0]
    stripes = max(1, min(available_cores(), MAX_STRIPES, height // MIN_ROWS_PER_STRIPE))
    bounds = [height * k // stripes for k in range(stripes + 1)]
    last = stripes - 1

    def stripe(k: int) -> tuple[bytes, bytes]:
        raw = _paeth_filtered(pixels, bounds[k], bounds[k + 1]).tobytes()
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: no header of its own
        body = deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if k == last else zlib.Z_SYNC_FLUSH)
        return raw, body

    if stripes == 1:
        pieces = [stripe(0)]
    else:
        with ThreadPoolExecutor(max_workers=stripes) as pool:
            pieces = list(pool.map(stripe, range(stripes)))
    checksum = 1
    for raw, _ in pieces:
        checksum = zlib.adler32(raw, checksum)
    stream = ZLIB_HEADER + b"".join(body for _, body in pieces) + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, COLOR_TYPES[image.mode], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def available_cores() -> int:
    """The cores this process may run on (Linux), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _paeth_filtered(pixels: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1, each led by its filter type byte (Paeth) and filtered against the
    unfiltered rows above and pixels to the left, as PNG defines it."""
    rows = pixels[start:stop].reshape(stop - start, -1).astype(np.int16)
    channels = pixels.shape[2]
    above = np.zeros_like(rows)
    if start > 0:
        above[0] = pixels[start - 1].reshape(-1)
    above[1:] = rows[:-1]
    left = np.zeros_like(rows)
    left[:, channels:] = rows[:, :-channels]
    above_left = np.zeros_like(rows)
    above_left[:, channels:] = above[:, :-channels]
    to_left = np.abs(above - above_left)  # |p - left| where p = left + above - above_left
    to_above = np.abs(left - above_left)
    to_above_left = np.abs(left + above - 2 * above_left)
    prediction = np.where((to_left <= to_above) & (to_left <= to_above_left), left,
                          np.where(to_above <= to_above_left, above, above_left))
    filtered = np.empty((stop - start, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = PAETH
    filtered[:, 1:] = (rows - prediction) & 0xFF
    return filtered


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
