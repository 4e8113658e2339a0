"""Where a LoRA file comes from: a path on the volume, a repo in the HF cache, or an
https/S3 URL downloaded into a size-capped cache on the volume.

Invariants. A job gets a cached file only where its own fetch would get the same bytes: an
http(s) file by its whole URL, query string included; an s3:// object after a HEAD through the
job's own client on every use, its file named by the endpoint, URL, ETag and size (a job
without access fails at the HEAD as if nothing were cached). No error is cached; each
download, the HEAD included, ends within LORA_DOWNLOAD_TIMEOUT_S. Every failure names the job
key (`loras[i].source`) and the source, never a credential or a presigned query string. A
volume path must lie under LORA_ROOTS as written and with its links followed, a repo's file in
its cached snapshot and the repo's own cache folder; the refusal reads the same whether or
not the path outside exists. Why the cache shares what it shares: docs/loras.md.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from src.job.schema import REPO_ID_SHAPE, InputError, echo
from src.models.files.tensors import ModelNotFound, locate
from src.plumbing.s3_deadline import TimedOut, within
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


@dataclass(frozen=True)
class LoraCache:
    """Downloaded LoRAs, each named by the sha256 of its identity (what a job must
    present to get it: an http(s) URL, or an S3 object's endpoint, URL, ETag and size),
    evicted least recently used first when over `max_bytes` or `max_files`."""

    folder: Path
    max_bytes: int
    max_files: int
    max_download_bytes: int

    def path_for(self, identity: str) -> Path:
        return self.folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:40]}.safetensors"

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
        return _from_s3(source, key, cache, s3_client_for(), limits)
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
        if Path(source).is_absolute():
            raise LoraError(f"{key}: no file at {echo(str(path))}")
        # A bare or relative name: say where it was looked for, and what else a source may be.
        raise LoraError(f"{key}: no file {echo(source)}{f' (weight_name {echo(weight_name)})' if weight_name else ''} "
                        f"in {str(roots[0])!r}, where a relative path is read from (the first of LORA_ROOTS, which "
                        "sets the folders LoRAs may be read from); give an absolute path on the volume, a repo id in "
                        "the HF cache (owner/name), or an https:// or s3:// URL")
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
        raise LoraError(f"{key}: {echo(repo_id)} is not in the Hugging Face cache at {hf_home / 'hub'}, and jobs "
                        f"never download from the hub; put it there with "
                        f"{_download_command(repo_id, weight_name, hf_home)}, or give an https:// or s3:// URL of the "
                        "file") from None
    path = snapshot / weight_name if weight_name else _single_safetensors(snapshot, key, repo_id)
    # Snapshot files are links into the repo's blobs folder: followed, they stay in the repo's folder.
    repo_folder = snapshot.parent.parent
    if not (_within(_as_written(path), [_as_written(snapshot)])  # as written first, as above
            and _within(_followed(path), [_followed(repo_folder)])):
        raise LoraError(f"{key}: {echo(repo_id)}: {echo(weight_name or path.name)} leads outside the repo's "
                        "cached snapshot")
    if not path.is_file():
        held = ", ".join(p.name for p in sorted(snapshot.glob("*.safetensors"))[:5]) or "no .safetensors files"
        raise LoraError(f"{key}: {echo(repo_id)} has no file {echo(weight_name or path.name)} in its cached "
                        f"snapshot (it holds {held}); fetch it with {_download_command(repo_id, weight_name, hf_home)}")
    return LoraFile(source=repo_id, path=path, sha256=_sha256_of(path))


def _download_command(repo_id: str, weight_name: str | None, hf_home: Path) -> str:
    """The tools/download_models.py command that puts this LoRA into this HF cache."""
    file = f"/{weight_name}" if weight_name else ""
    return f"'python tools/download_models.py --hf-home {hf_home} --only loras --lora {repo_id}{file}'"


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


def _download(url: str, key: str, cache: LoraCache, chunks, identity: str | None = None,
              expected_bytes: int | None = None) -> LoraFile:
    """The cached file of `identity` (the URL unless given), or `chunks()` downloaded into
    it; a download of other than `expected_bytes` (when given) is an error and not kept."""
    target = cache.path_for(identity or url)
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
            if expected_bytes is not None and size != expected_bytes:
                raise LoraError(f"{key}: downloading {describe_source(url)!r} failed: {size} bytes arrived, "
                                f"{expected_bytes} expected")
        except BaseException:
            part.close()
            Path(part.name).unlink(missing_ok=True)
            raise
    os.replace(part.name, target)
    sidecar.write_text(digest.hexdigest())
    cache.evict(keep=target)
    return LoraFile(source=url, path=target, sha256=digest.hexdigest())


def _from_s3(url: str, key: str, cache: LoraCache, client, limits: FetchLimits) -> LoraFile:
    """The object behind an s3:// URL as this job's client sees it: asked for with a HEAD
    on every use, its cached file used only for the ETag and size that HEAD answered."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, object_key = url[len("s3://"):].partition("/")
    shown = describe_source(url)
    failed = f"{key}: downloading {shown!r} failed"
    try:
        with within(limits.total_timeout_s):
            head = client.head_object(Bucket=bucket, Key=object_key)
            size, etag = head.get("ContentLength"), head.get("ETag")
            if size is None:
                raise LoraError(f"{failed}: the bucket answered HEAD without a Content-Length")
            if size > cache.max_download_bytes:
                raise LoraError(f"{key}: {shown!r} is {size} bytes (its HEAD's Content-Length), larger than "
                                f"{cache.max_download_bytes} bytes (LORA_MAX_DOWNLOAD_BYTES)")
            # Without an ETag no later HEAD can vouch for the bytes: a name no one will ask for again.
            version = etag or f"unversioned {secrets.token_hex(16)}"
            identity = f"s3 {client.meta.endpoint_url} {url} {version} {size}"
            return _download(url, key, cache, lambda: _s3_chunks(client, bucket, object_key, etag), identity,
                             expected_bytes=size)
    except TimedOut:
        raise LoraError(f"{failed}: timed out after {limits.total_timeout_s:g} s ({limits.total_timeout_setting})") \
            from None
    except ClientError as exc:
        raise LoraError(f"{failed}: {_s3_code(exc)}") from None
    except BotoCoreError as exc:
        raise LoraError(f"{failed}: {type(exc).__name__}") from None


def _s3_chunks(client, bucket: str, object_key: str, etag: str | None):
    """The object's body; with the HEAD's ETag, only that version of it (412 otherwise)."""
    condition = {"IfMatch": etag} if etag else {}
    body = client.get_object(Bucket=bucket, Key=object_key, **condition)["Body"]
    try:
        yield from body.iter_chunks(DOWNLOAD_CHUNK_BYTES)
    finally:
        body.close()


def _s3_code(exc: ClientError) -> str:
    """An S3 error as its code; a HEAD's errors carry only the HTTP status ("404"), which
    botocore gives its standard reason ("Not Found")."""
    from src.plumbing.storage import MAX_ERROR_CODE_CHARS, s3_error_code

    code = s3_error_code(exc)
    if code.isdigit():
        reason = "".join(char for char in str(exc.response.get("Error", {}).get("Message") or "")
                         if char.isprintable())[:MAX_ERROR_CODE_CHARS]
        return f"HTTP {code} ({reason or 'no reason given'})"
    return code


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
