"""Tensors read by key from safetensors files (`stored_tensors`, `read_tensors`), without
memory-mapping, in large reads on a few threads. The FP8 cache (src/models/fp8/cache.py) takes
the transformer's unquantized tensors from the snapshot this way, never touching the bytes of
the block linears it has in FP8; the same reads give a touched linear's bf16 original back
from the snapshot.

Also offered here, from their torch-free homes (the start's early read-ahead runs before torch
is imported): where a model's files are (`locate`, src/models/files/snapshots.py) and the read-ahead
of weight files into the page cache (`WEIGHTS_PREFETCH`, src/models/files/read_ahead.py).
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from src.models.files.read_ahead import (CHUNK_BYTES, NETWORK_FILESYSTEMS, PARALLEL_FILES, Span,  # noqa: F401
                                   WEIGHT_SUFFIXES, available_memory_bytes, filesystem_of, is_network, prefetch,
                                   read_ahead, read_spans_ahead, read_through, should_prefetch,
                                   weight_files)
from src.models.files.snapshots import ModelNotFound, ModelRef, locate  # noqa: F401

# -- Tensors by key from safetensors files ---------------------------------------------------------

# safetensors' dtype names (its format's spec) for the dtypes a diffusers checkpoint or the FP8 cache holds.
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
HEADER_LENGTH_BYTES = 8  # a little-endian u64: the JSON header's length
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit
PARALLEL_READS = 4
T, R = TypeVar("T"), TypeVar("R")
READS_AHEAD = 8  # tensors read but not yet taken by the caller, at most


class BadWeightFile(ValueError):
    """A safetensors file whose header cannot be read or does not fit the file."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: `nbytes` from absolute offset `start` of `path`."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def safetensors_header(path: Path) -> tuple[dict[str, StoredTensor], int]:
    """The tensors of one safetensors file by name, and the header's size in bytes (read
    with them). Raises BadWeightFile for a header that is cut, not JSON, or points past the file."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(HEADER_LENGTH_BYTES)
        if len(head) < HEADER_LENGTH_BYTES:
            raise BadWeightFile(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise BadWeightFile(f"{path}: header length {length} does not fit the file's {size} bytes")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadWeightFile(f"{path}: header is not JSON ({exc})") from None
    data_start = HEADER_LENGTH_BYTES + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BadWeightFile(f"{path}: tensor {name!r} has an unreadable header entry") from None
        expected = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise BadWeightFile(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit "
                                f"bytes {begin}..{end} of a {size - data_start}-byte data section")
        tensors[name] = StoredTensor(path, dtype, shape, data_start + begin, end - begin)
    return tensors, data_start


def stored_tensors(folder: Path) -> tuple[dict[str, StoredTensor], int]:
    """Every tensor of the safetensors files in `folder` (a diffusers model folder, sharded
    or not) by name, and the bytes their headers took to read."""
    tensors: dict[str, StoredTensor] = {}
    header_bytes = 0
    for path in sorted(folder.glob("*.safetensors")):
        found, header_size = safetensors_header(path)
        tensors.update(found)
        header_bytes += header_size
    return tensors, header_bytes


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """One tensor's bytes read straight into a new CPU tensor (no memory map, no extra copy)."""
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    fd = os.open(stored.path, os.O_RDONLY)
    try:
        done = 0
        while done < stored.nbytes:
            count = os.preadv(fd, [view[done:]], stored.start + done)
            if count == 0:
                raise BadWeightFile(f"{stored.path}: ends {stored.nbytes - done} bytes short of a tensor")
            done += count
    finally:
        os.close(fd)
    return buffer.view(stored.dtype).reshape(stored.shape)


def in_file_order(stored: Mapping[str, StoredTensor], names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda name: (str(stored[name].path), stored[name].start))


def read_tensors(stored: Mapping[str, StoredTensor], names: Iterable[str],
                 threads: int = PARALLEL_READS) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors, read on `threads` threads and handed over in the order of `names`
    (`in_file_order` reads sequentially), with at most READS_AHEAD of them waiting in memory."""
    return in_order_on_threads(lambda name: read_tensor(stored[name]), names, threads, READS_AHEAD)


def in_order_on_threads(function: Callable[[T], R], items: Iterable[T], threads: int,
                        ahead: int) -> Iterator[tuple[T, R]]:
    """(item, function(item)) for each item, in order, computed on `threads` threads at most
    `ahead` items before the caller takes them (reading ahead of the work that uses it)."""
    with ThreadPoolExecutor(threads, thread_name_prefix="weights-read") as pool:
        waiting: deque = deque()
        for item in items:
            waiting.append((item, pool.submit(function, item)))
            if len(waiting) >= ahead:
                done, result = waiting.popleft()
                yield done, result.result()
        while waiting:
            done, result = waiting.popleft()
            yield done, result.result()
