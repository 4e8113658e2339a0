"""COMPILE_CACHE_DIR: the compiled transformer blocks (COMPILE=true) paid for once per volume.

The first start on a setup compiles during its warm-up, then saves what PyTorch's compile
caches hold (`torch.compiler.save_cache_artifacts`: Inductor's graphs, the Triton kernels
and their autotuning) to one file; later starts load it (`load_cache_artifacts`) before
their warm-up, whose compile then finds every graph and kernel done.

The file's name is a hash of everything that changes the compiled code (`CacheKey`: the
torch, Triton, CUDA and diffusers versions, the GPU and its compute capability, the models'
revisions, the settings that change the blocks): a setup that differs finds no file and
compiles. A file is written whole to a temporary name and renamed into place, so a reader
never sees half of one and two workers writing at once leave one whole file (the last
rename). Each file carries its payload's SHA-256: a cut or damaged file, or one torch
refuses, is ignored with one log line, and the start compiles as if there were none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT = 1  # of the file; part of the key
SUFFIX = ".torch-artifacts"


class CorruptCache(ValueError):
    """A cache file whose header or payload does not check out."""


@dataclass(frozen=True)
class CacheKey:
    """What the compiled code depends on, and the file name it hashes to."""

    fields: dict

    @classmethod
    def for_setup(cls, gpu: str, capability: tuple[int, int] | None, models: list[str], settings: dict) -> "CacheKey":
        import diffusers

        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        return cls({"format": FORMAT, "torch": torch.__version__, "triton": triton_version,
                    "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "gpu": gpu,
                    "capability": list(capability) if capability else None, "models": sorted(models),
                    "settings": settings})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:40]

    def path_in(self, folder: Path) -> Path:
        return folder / f"{self.digest}{SUFFIX}"


def write_file(path: Path, key: CacheKey, payload: bytes) -> None:
    """`payload` under `path`: a JSON header line (the key's fields, the payload's size and
    hash), then the payload; written to a temporary name beside it and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"key": key.fields, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_file(path: Path, key: CacheKey) -> bytes:
    """The payload of a file `write_file` wrote for `key`, or CorruptCache."""
    data = path.read_bytes()
    line, _, payload = data.partition(b"\n")
    try:
        header = json.loads(line)
        size, digest, fields = header["bytes"], header["sha256"], header["key"]
    except (ValueError, KeyError, TypeError):
        raise CorruptCache("its header is not readable") from None
    if fields != key.fields:
        raise CorruptCache("it was written for another setup")
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
        raise CorruptCache(f"its payload is {len(payload)} bytes where {size} were written, or damaged")
    return payload


def load(folder: Path, key: CacheKey) -> str:
    """Hand a saved cache to torch before compiling: "warm" if one was loaded, else "cold"
    (none yet, or one ignored, with a log line)."""
    path = key.path_in(folder)
    if not path.exists():
        log.info("compile cache: none for this setup in %s: this start compiles and saves one", folder)
        return "cold"
    why = ""
    try:
        payload = read_file(path, key)
        loaded = torch.compiler.load_cache_artifacts(payload)  # None when it cannot read them
    except (OSError, CorruptCache) as exc:
        log.warning("compile cache %s ignored (%s): compiling instead", path, exc)
        return "cold"
    except Exception as exc:  # torch's own loaders: a file it cannot take must not fail the start
        loaded, why = None, f": {type(exc).__name__}: {exc}"
    if loaded is None:
        log.warning("compile cache %s ignored (torch could not load it%s): compiling instead", path, why)
        return "cold"
    log.info("compile cache: loaded %.1f MB from %s", len(payload) / 1e6, path)
    return "warm"


def save(folder: Path, key: CacheKey) -> bool:
    """Save what this process compiled (after the warm-up); False (logged) when there is
    nothing to save or the folder cannot be written."""
    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts or not artifacts[0]:
        log.info("compile cache: nothing compiled to save")
        return False
    path = key.path_in(folder)
    try:
        write_file(path, key, artifacts[0])
    except OSError as exc:
        log.warning("compile cache: could not write %s (%s); later starts compile again", path, exc)
        return False
    log.info("compile cache: saved %.1f MB to %s for later starts", len(artifacts[0]) / 1e6, path)
    return True
