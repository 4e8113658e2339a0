"""Reading the weight files ahead of diffusers' memory-mapped loads (`WEIGHTS_PREFETCH`).

diffusers and transformers load safetensors through mmap: every tensor copied to the
GPU faults its pages in, a few at a time, in the order the model asks for them. On a
local disk that costs 1.3x a plain read (docs/performance.md); on network storage (a RunPod
network volume) each fault is a round trip. Prefetching reads every weight file front
to back in large chunks, several files at once, into the page cache, on a background
thread while the loader runs: the loader's mmap reads then find their pages in memory,
and its copies to the GPU overlap the reading of later files. On by default: on the
H100's local disk it took a cold start from 1.28x to 1.15x a plain read (docs/performance.md),
and on network storage it replaces page faults with large parallel reads. `auto` keeps
it to network filesystems. Skipped when the files would not fit in available memory
(the page cache would drop them again).

Also here: tensors read by key from safetensors files (`stored_tensors`, `read_tensors`),
without memory-mapping, in large reads on a few threads. The FP8 cache (src/models/fp8_cache.py)
takes the transformer's unquantized tensors from the snapshot this way, never touching the
bytes of the block linears it has in FP8; the same reads give a touched linear's bf16
original back from the snapshot.

And first of all, where those files are: `locate` finds a model's snapshot in the HF cache
(its refs/main), offline, for the loader, the FP8 cache and LoRAs named by repo id.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024**2
PARALLEL_FILES = 4  # network filesystems serve several streams faster than one
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Filesystem types (as /proc/mounts names them) whose reads go over a network.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "fuse", "beegfs",
                       "gpfs", "wekafs")


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRef:
    repo_id: str
    revision: str
    path: Path

    def describe(self) -> dict:
        return {"id": self.repo_id, "revision": self.revision}


def locate(repo_id: str, hf_home: Path) -> ModelRef:
    """The cached snapshot of `repo_id` (its refs/main), without touching the network."""
    cache_dir = hf_home / "hub"
    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except IncompleteSnapshotError as exc:
        # The cache's listing of the repo names files this snapshot lacks: Layered's text
        # encoder, tokenizer and processor are left out on purpose where they are the edit
        # model's (src/models/shared_components.py). A file that is really missing fails the load
        # that needs it, naming it.
        log.info("%s: the cached snapshot lacks files its listing names; using it as it is", repo_id)
        path = Path(exc.snapshot_path)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelNotFound(
            f"model {repo_id} is not in the Hugging Face cache at {cache_dir}; "
            f"fetch it with: python tools/download_models.py --hf-home {hf_home}, or start with DOWNLOAD_MODELS=missing"
        ) from None
    return ModelRef(repo_id=repo_id, revision=path.name, path=path)


def filesystem_of(path: Path, mounts: str) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts' text (longest mount point wins)."""
    best, best_type = "", ""
    target = str(path.resolve())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def is_network(filesystem: str) -> bool:
    return filesystem.split(".")[0] in NETWORK_FILESYSTEMS


def should_prefetch(setting: str, hf_home: Path, mounts: str | None = None) -> bool:
    if setting != "auto":
        return setting == "on"
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    return is_network(filesystem_of(hf_home, mounts))


def weight_files(*folders: Path) -> list[Path]:
    return sorted({path.resolve() for folder in folders for path in folder.rglob("*")
                   if path.name.endswith(WEIGHT_SUFFIXES) and path.is_file()})


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prefetch(files: list[Path]) -> dict:
    """Read `files` into the page cache, several at a time. Returns what was done."""
    total = sum(path.stat().st_size for path in files)
    available = available_memory_bytes()
    if available is not None and total > 0.9 * available:
        log.info("weights prefetch skipped: %.1f GB of files, %.1f GB of memory available", total / 1e9,
                 available / 1e9)
        return {"files": len(files), "bytes": total, "skipped": "not enough memory"}
    start = time.perf_counter()
    with ThreadPoolExecutor(PARALLEL_FILES) as pool:
        read = sum(pool.map(read_through, files))
    seconds = time.perf_counter() - start
    log.info("weights prefetched: %d files, %.1f GB in %.1f s (%.2f GB/s)", len(files), read / 1e9, seconds,
             read / 1e9 / max(seconds, 1e-9))
    return {"files": len(files), "bytes": read, "seconds": round(seconds, 2)}


def read_ahead(files: list[Path]) -> Future:
    """`prefetch(files)` on a background thread; the Future gives its report. A daemon
    thread, so a start that fails meanwhile exits without waiting for the reading."""
    reading: Future = Future()

    def run() -> None:
        try:
            reading.set_result(prefetch(files))
        except BaseException as exc:  # handed to whoever waits on the Future
            reading.set_exception(exc)

    threading.Thread(target=run, name="weights-read-ahead", daemon=True).start()
    return reading


def read_through(path: Path) -> int:
    buffer = bytearray(CHUNK_BYTES)
    total = 0
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            total += count
    return total


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
