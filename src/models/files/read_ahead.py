"""Reading weight files into the page cache ahead of diffusers' memory-mapped loads (`WEIGHTS_PREFETCH`).

diffusers and transformers load safetensors through mmap: every tensor copied to the GPU faults
its pages in, a few at a time, in the order the model asks for them; on network storage (a
RunPod network volume) each fault is a round trip. `prefetch` reads files front to back in large
chunks, several at once, so the loader's reads find their pages in memory; `read_ahead` does it
on a background thread (`read_spans_ahead`: byte spans of files, the tensors a read by key will
take). `auto` keeps it to network filesystems. Skipped when the files exceed
90% of available memory (the page cache would drop them again). Figures: docs/performance.md.

Standard library only (no torch): the start's first read (src/models/files/early_read.py) runs
while Python is still importing torch and diffusers.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

Span = tuple[Path, int, int]  # a file, the offset of its first byte read, how many bytes

CHUNK_BYTES = 64 * 1024**2
PARALLEL_FILES = 4  # network filesystems serve several streams faster than one
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MEMORY_SHARE = 0.9  # of available memory, at most, for the files read ahead
# Filesystem types (as /proc/mounts names them) whose reads go over a network.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "fuse", "beegfs",
                       "gpfs", "wekafs")


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
    """The weight files under `folders` (symlinks resolved, so a blob shared by two snapshots is
    listed once; missing ones left out)."""
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
    return prefetch_spans([(path, 0, path.stat().st_size) for path in files], "weights prefetched")


def prefetch_spans(spans: list[Span], what: str) -> dict:
    """Read byte spans (file, first byte, bytes) into the page cache, PARALLEL_FILES at a time;
    skipped where they exceed MEMORY_SHARE of the available memory. Returns what was done."""
    total = sum(length for _, _, length in spans)
    files = len({path for path, _, _ in spans})
    available = available_memory_bytes()
    if available is not None and total > MEMORY_SHARE * available:
        log.info("read-ahead skipped (%s): %.1f GB of files, %.1f GB of memory available", what, total / 1e9,
                 available / 1e9)
        return {"files": files, "bytes": total, "skipped": "not enough memory"}
    start = time.perf_counter()
    with ThreadPoolExecutor(PARALLEL_FILES) as pool:
        read = sum(pool.map(read_span, spans))
    seconds = time.perf_counter() - start
    log.info("%s: %d files, %.1f GB in %.1f s (%.2f GB/s)", what, files, read / 1e9, seconds,
             read / 1e9 / max(seconds, 1e-9))
    return {"files": files, "bytes": read, "seconds": round(seconds, 2)}


def read_ahead(files: list[Path]) -> Future:
    """`prefetch(files)` on a background thread; the Future gives its report."""
    return read_ahead_in_turn([files])[0]


def read_ahead_in_turn(groups: list[list[Path]]) -> list[Future]:
    """`prefetch` of each group, one group after another, on one background thread; a Future
    per group gives its report (or its error)."""
    return in_background([lambda files=files: prefetch(files) for files in groups])


def read_spans_ahead(spans: list[Span], what: str) -> Future:
    """`prefetch_spans` on a background thread; the Future gives its report."""
    return in_background([lambda: prefetch_spans(spans, what)])[0]


def in_background(reads: list) -> list[Future]:
    """Each of `reads` (callables) in turn on one background thread, a Future per call. A
    daemon thread, so a start that fails meanwhile exits without waiting for the reading."""
    readings: list[Future] = [Future() for _ in reads]

    def run() -> None:
        for read, reading in zip(reads, readings):
            try:
                reading.set_result(read())
            except BaseException as exc:  # handed to whoever waits on the Future
                reading.set_exception(exc)

    threading.Thread(target=run, name="weights-read-ahead", daemon=True).start()
    return readings


def read_through(path: Path) -> int:
    return read_span((path, 0, path.stat().st_size))


def read_span(span: Span) -> int:
    """Read `span`'s bytes (fewer where the file ends first); returns how many were read."""
    path, offset, length = span
    buffer = memoryview(bytearray(min(CHUNK_BYTES, length)))
    total = 0
    with open(path, "rb", buffering=0) as file:
        file.seek(offset)
        while total < length and (count := file.readinto(buffer[:min(CHUNK_BYTES, length - total)])):
            total += count
    return total
