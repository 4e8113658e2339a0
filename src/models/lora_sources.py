"""Where a LoRA file comes from: a path on the volume, a repo in the HF cache, or an
https/S3 URL downloaded once into a size-capped cache on the volume.

Every failure is a `LoraError` (or, for an http(s) URL, a `url_fetch.FetchError` or
`url_guard.UrlRefused`) that names the job key (`loras[i].source`) and the source, never
a credential or a presigned query string.

Paths stay inside their roots: a volume path (and its `weight_name`) must lie under one of
LORA_ROOTS both as written and once its links are followed; a repo's `weight_name` under
its cached snapshot as written, and in the repo's own cache folder (its snapshots and the
blobs they link to) once followed. Whether a path is inside is decided without looking
outside the roots, so the refusal reads the same for a path outside that exists and one
that does not.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from src.job.schema import REPO_ID_SHAPE, InputError, echo
from src.models.weights import ModelNotFound, locate
from src.plumbing.url_fetch import FetchLimits, iter_chunks
from src.plumbing.url_guard import AddressPolicy, shown

DOWNLOAD_CHUNK_BYTES = 1 << 20
# The longest wait for a LoRA download's next bytes; the whole download is bounded by
# LORA_DOWNLOAD_TIMEOUT_S (files run to 2 GB).
DOWNLOAD_IDLE_TIMEOUT_S = 60.0


class LoraError(InputError):
    """A LoRA that cannot be used; the message is `<key>: <reason>`."""


@dataclass(frozen=True)
class LoraFile:
    source: str
    path: Path
    sha256: str
    downloaded: bool = False


@dataclass(frozen=True)
class LoraCache:
    """Downloaded LoRAs, named by the sha256 of their URL, evicted least recently used
    first when over `max_bytes` or `max_files`."""

    folder: Path
    max_bytes: int
    max_files: int
    max_download_bytes: int

    def path_for(self, url: str) -> Path:
        return self.folder / f"{hashlib.sha256(url.encode()).hexdigest()[:40]}.safetensors"

    def evict(self, keep: Path) -> None:
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for index, path in enumerate(files):
            total += path.stat().st_size
            if path != keep and (index >= self.max_files or total > self.max_bytes):
                path.unlink(missing_ok=True)
                path.with_suffix(".sha256").unlink(missing_ok=True)


def describe_source(source: str) -> str:
    """The source as it may appear in logs, errors and outputs: URLs as `url_guard.shown`
    gives them, without user info or query string (presigned URLs carry credentials there)."""
    return shown(source) if source.startswith(("https://", "http://", "s3://")) else source


def http_limits(max_download_bytes: int, connect_timeout_s: float, total_timeout_s: float) -> FetchLimits:
    """What one LoRA download over http(s) may take."""
    return FetchLimits(max_bytes=max_download_bytes, max_bytes_setting="LORA_MAX_DOWNLOAD_BYTES",
                       connect_timeout_s=connect_timeout_s, total_timeout_s=total_timeout_s,
                       total_timeout_setting="LORA_DOWNLOAD_TIMEOUT_S", idle_timeout_s=DOWNLOAD_IDLE_TIMEOUT_S)


def resolve(source: str, weight_name: str | None, key: str, *, roots: tuple[Path, ...], hf_home: Path,
            cache: LoraCache, policy: AddressPolicy, limits: FetchLimits, s3_client_for=None) -> LoraFile:
    """The local file behind a LoRA source, downloading it into the cache if needed;
    http(s) URLs only to addresses `policy` allows, within `limits`."""
    shown = describe_source(source)
    if source.startswith(("https://", "http://")):
        return _download(source, key, cache,
                         lambda: iter_chunks(source, key, policy, limits, DOWNLOAD_CHUNK_BYTES))
    if source.startswith("s3://"):
        if s3_client_for is None:
            raise LoraError(f"{key}: {shown!r} is an S3 URL but no bucket credentials are configured "
                            "(BUCKET_* env or the job's r2)")
        bucket, _, object_key = source[len("s3://"):].partition("/")
        return _download(source, key, cache, lambda: _s3_chunks(s3_client_for(), bucket, object_key, key, shown))
    if REPO_ID_SHAPE.fullmatch(source):
        return _from_hf_cache(source, weight_name, key, hf_home)
    return _from_volume(source, weight_name, key, roots)


def _from_volume(source: str, weight_name: str | None, key: str, roots: tuple[Path, ...]) -> LoraFile:
    named = Path(source) if Path(source).is_absolute() else roots[0] / source
    if weight_name:
        named = named / weight_name
    path = _inside_roots(named, roots, key, source)
    if path.is_dir():
        path = _inside_roots(_single_safetensors(path, key, source), roots, key, source)
    if not path.is_file():
        raise LoraError(f"{key}: no file at {echo(str(path))}")
    return LoraFile(source=source, path=path, sha256=_sha256_of(path))


def _inside_roots(named: Path, roots: tuple[Path, ...], key: str, source: str) -> Path:
    """The file `named` leads to, when it lies under LORA_ROOTS as written and as followed."""
    # As written first: a path outside the roots is refused without reading anything there.
    if _within(_as_written(named), [_as_written(root) for root in roots]):
        real = _followed(named)
        if _within(real, [_followed(root) for root in roots]):
            return real
    allowed = ", ".join(str(root) for root in roots)
    raise LoraError(f"{key}: {echo(source)} is outside the folders LoRAs may be read from ({allowed}; LORA_ROOTS)")


def _from_hf_cache(repo_id: str, weight_name: str | None, key: str, hf_home: Path) -> LoraFile:
    try:
        snapshot = locate(repo_id, hf_home).path
    except ModelNotFound:
        raise LoraError(f"{key}: {echo(repo_id)} is not in the Hugging Face cache at {hf_home / 'hub'} "
                        "(LoRAs are never downloaded from the hub at job time)") from None
    path = snapshot / weight_name if weight_name else _single_safetensors(snapshot, key, repo_id)
    # Snapshot files are links into the repo's blobs folder: followed, they stay in the repo's folder.
    repo_folder = snapshot.parent.parent
    if not (_within(_as_written(path), [_as_written(snapshot)])  # as written first, as above
            and _within(_followed(path), [_followed(repo_folder)])):
        raise LoraError(f"{key}: {echo(repo_id)}: {echo(weight_name or path.name)} leads outside the repo's "
                        "cached snapshot")
    if not path.is_file():
        raise LoraError(f"{key}: {echo(repo_id)} has no file {echo(weight_name or path.name)} in its cached snapshot")
    return LoraFile(source=repo_id, path=path, sha256=_sha256_of(path))


def _as_written(path: Path) -> Path:
    """`path` with '.' and '..' taken as written, no link followed: nothing on disk is read."""
    return Path(os.path.normpath(path))


def _followed(path: Path) -> Path:
    """`path` with every link followed (what opening it reads)."""
    return Path(os.path.realpath(path))


def _within(path: Path, folders: list[Path]) -> bool:
    return any(path.is_relative_to(folder) for folder in folders)


def _single_safetensors(folder: Path, key: str, source: str) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        names = ", ".join(p.name for p in files[:5]) or "none"
        raise LoraError(f"{key}: {echo(source)} holds {len(files)} .safetensors files ({echo(names)}); "
                        "name one with weight_name")
    return files[0]


def _download(url: str, key: str, cache: LoraCache, chunks) -> LoraFile:
    target = cache.path_for(url)
    sidecar = target.with_suffix(".sha256")
    if target.is_file() and sidecar.is_file():
        os.utime(target)  # most recently used
        return LoraFile(source=url, path=target, sha256=sidecar.read_text().strip())
    cache.folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    # Into a temporary file in the same folder, renamed when complete: a cut download
    # never leaves a file the next job would trust.
    with tempfile.NamedTemporaryFile(dir=cache.folder, suffix=".part", delete=False) as part:
        try:
            for chunk in chunks():
                size += len(chunk)
                if size > cache.max_download_bytes:
                    raise LoraError(f"{key}: {describe_source(url)!r} is larger than "
                                    f"{cache.max_download_bytes} bytes (LORA_MAX_DOWNLOAD_BYTES)")
                digest.update(chunk)
                part.write(chunk)
        except BaseException:
            part.close()
            Path(part.name).unlink(missing_ok=True)
            raise
    os.replace(part.name, target)
    sidecar.write_text(digest.hexdigest())
    cache.evict(keep=target)
    return LoraFile(source=url, path=target, sha256=digest.hexdigest(), downloaded=True)


def _s3_chunks(client, bucket: str, object_key: str, key: str, shown: str):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=object_key)["Body"]
        yield from body.iter_chunks(DOWNLOAD_CHUNK_BYTES)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "unknown")
        raise LoraError(f"{key}: downloading {shown!r} failed: {code}") from None
    except BotoCoreError as exc:
        raise LoraError(f"{key}: downloading {shown!r} failed: {type(exc).__name__}") from None


# sha256 of files already hashed, keyed by path and modification time: hashing a
# 1 GB LoRA on every job would cost seconds.
_SHA_CACHE: dict[tuple[str, int], str] = {}


def _sha256_of(path: Path) -> str:
    cache_key = (str(path), path.stat().st_mtime_ns)
    if cache_key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(DOWNLOAD_CHUNK_BYTES):
                digest.update(block)
        _SHA_CACHE[cache_key] = digest.hexdigest()
    return _SHA_CACHE[cache_key]
