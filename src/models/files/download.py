"""Fetching the worker's models into HF_HOME, in the standard Hugging Face cache layout.

Two callers: tools/download_models.py (by hand, on a Pod with the network volume), and a start
with DOWNLOAD_MODELS=missing (handler.py, before anything loads). Jobs never download: the
worker loads with HF_HUB_OFFLINE=1. Steps: `plan` (the edit model; Layered without the folders
it borrows where the hub shows them the same files; the Lightning files), `measure` (the hub's
listing of main's commit) and `check_space`, then `fetch` each file not yet cached with
`hf_hub_download` at that commit, logging progress every PROGRESS_EVERY_S.

Invariants: files are fetched one by one (not `snapshot_download`, whose cached listing would
make the offline lookup call a partial snapshot missing) and refs/main is written last, so it
marks the snapshot whole; a download cut short keeps its finished files and the next start
fetches the rest; a killed file's partial copy is deleted once older than STALE_PARTIAL_S.
`hub_online()` lifts the offline switch for the download alone and puts it back. The
huggingface_hub internals this relies on: docs/upstream-register.md, "Internals relied on".
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, constants, get_cached_repo_tree, hf_hub_download, snapshot_download
from huggingface_hub.errors import (CachedRepoTreeNotFoundError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                    XetDownloadError)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars, enable_progress_bars,
                                   filter_repo_objects)
from huggingface_hub.utils import httpx  # huggingface_hub's own HTTP client, whatever its package

from src.models.files.shared_components import SHARED_COMPONENTS, compare_components, hub_file_hashes
from src.models.files.snapshots import hub_cache, repo_folder, snapshot_dir, write_ref

if TYPE_CHECKING:
    from src.plumbing.config import Settings

log = logging.getLogger(__name__)

GB = 1000**3
MB = 1000**2
DEFAULT_MAX_WORKERS = 8
# A log line on a running download this often (RunPod's log shows no progress bars).
PROGRESS_EVERY_S = 30.0
# A partial file untouched this long belongs to a download that died (a live one writes every second).
STALE_PARTIAL_S = 15 * 60
PARTIAL_SUFFIX = ".incomplete"
ONE_LINE_PARTS = 2
# What a failed download raises inside huggingface_hub: HTTP errors (missing or gated repo, bad
# token) and cache errors are OSErrors; connections fail in its HTTP client; xet has its own.
DOWNLOAD_ERRORS = (OSError, ValueError, httpx.TransportError, XetDownloadError)


class DownloadFailed(RuntimeError):
    """A download that cannot go on; the message is one line naming the repo and the reason."""


@dataclass(frozen=True)
class Download:
    name: str                               # "edit", "layered", "lightning" or "lora"
    repo_id: str
    ignore_patterns: tuple[str, ...] = ()   # folders the worker borrows from the edit model
    allow_patterns: tuple[str, ...] = ()    # empty: the whole repository

    def patterns(self) -> dict[str, list[str] | None]:
        return {"allow_patterns": list(self.allow_patterns) or None,
                "ignore_patterns": list(self.ignore_patterns) or None}


@dataclass(frozen=True)
class Sized:
    """A download with what the hub lists at main's commit: its files (path, bytes) and those of
    them not yet in the cache's snapshot of that commit."""

    download: Download
    commit: str
    files: tuple[tuple[str, int], ...]
    pending: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def pending_bytes(self) -> int:
        return sum(size for _, size in self.pending)


# -- 1. What to fetch ---------------------------------------------------------------------------


def borrowed_patterns(comparison: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """ignore_patterns for Layered's folders that hold the same files as the edit repo's (the
    worker borrows those). Differing folders are downloaded; so is everything when nothing was compared."""
    return tuple(f"{component}/*" for component, differing in comparison.items() if not differing)


def plan(edit_model: str | None, layered_model: str | None, comparison: Mapping[str, tuple[str, ...]],
         lightning: tuple[str, Sequence[str]] | None = None, full: bool = False) -> list[Download]:
    """The downloads for these repos (None: not wanted). `comparison` is compare_components of the
    edit and Layered repos (empty: nothing compared, so Layered comes whole, as with `full`);
    `lightning` is (repo id, file names)."""
    downloads = []
    if edit_model:
        downloads.append(Download("edit", edit_model))
    if layered_model:
        downloads.append(Download("layered", layered_model, () if full else borrowed_patterns(comparison)))
    if lightning:
        repo_id, files = lightning
        downloads.append(Download("lightning", repo_id, allow_patterns=tuple(sorted(set(files)))))
    return downloads


def comparison_lines(comparison: Mapping[str, tuple[str, ...]], edit_model: str, layered_model: str) -> list[str]:
    """One line per shared folder: whether the worker borrows it or Layered's own is downloaded."""
    lines = []
    for component in SHARED_COMPONENTS:
        differing = comparison.get(component)
        if differing is None:
            verdict = f"not in {layered_model}: borrowed"
        elif not differing:
            verdict = f"same files as {edit_model}: borrowed"
        else:
            count = f"{len(differing)} file differs" if len(differing) == 1 else f"{len(differing)} files differ"
            verdict = f"differs from {edit_model} ({count}): downloading Layered's own"
        lines.append(f"layered  {component}/: {verdict}")
    return lines


def compare_on_hub(api: HfApi, edit_model: str, layered_model: str, token: str | None) -> dict[str, tuple[str, ...]]:
    """compare_components of the two repositories' main revisions (what `measure` takes), from
    the hub's file metadata: nothing is downloaded."""
    def listing(repo_id: str) -> dict[str, str]:
        return hub_file_hashes(api.model_info(repo_id, files_metadata=True, token=token).siblings or [])
    return compare_components(listing(edit_model), listing(layered_model))


# -- What the cache already holds (offline) -----------------------------------------------------


def missing_downloads(edit_model: str, layered_model: str, lightning: tuple[str, Sequence[str]],
                      cache_dir: Path) -> list[Download]:
    """Which of the worker's models the cache lacks or holds only in part, without the network.

    A snapshot counts as whole once refs/main names it (`fetch` writes refs/main after the last
    file), unless huggingface_hub's cached listing of its commit (`trees/<commit>.json`, which
    snapshot_download writes) shows a file missing: as the worker's own lookup sees it.
    """
    lightning_repo, lightning_files = lightning
    wanted = [Download("edit", edit_model), cached_layered_download(edit_model, layered_model, cache_dir),
              Download("lightning", lightning_repo, allow_patterns=tuple(sorted(set(lightning_files))))]
    return [download for download in wanted if not is_cached(download, cache_dir)]


def is_cached(download: Download, cache_dir: Path) -> bool:
    try:
        snapshot = Path(snapshot_download(download.repo_id, cache_dir=cache_dir, local_files_only=True,
                                          **download.patterns()))
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        return False
    # Named files (Lightning's) are checked one by one: without a cached listing huggingface_hub
    # cannot tell that one is missing.
    return all((snapshot / name).is_file() for name in download.allow_patterns)


def cached_layered_download(edit_model: str, layered_model: str, cache_dir: Path) -> Download:
    """The Layered download as the cache alone can tell it: the folders borrowed are those the
    cached listings of both repos show the same (as the hub comparison would), else, without
    listings, those the Layered snapshot does not hold (the worker then borrows them too)."""
    listings = [_cached_listing(repo_id, cache_dir) for repo_id in (edit_model, layered_model)]
    if None not in listings:
        return Download("layered", layered_model, borrowed_patterns(compare_components(*listings)))
    snapshot = _cached_snapshot(layered_model, cache_dir)
    absent = tuple(f"{component}/*" for component in SHARED_COMPONENTS
                   if snapshot is None or not (snapshot / component).is_dir())
    return Download("layered", layered_model, absent)


def _cached_listing(repo_id: str, cache_dir: Path) -> dict[str, str] | None:
    """{path: git blob id} from the cached listing of refs/main's commit. Blob ids compare as well
    as the hub's hashes do: an LFS file's blob is its pointer, which holds the file's sha256."""
    try:
        return {entry.path: entry.blob_id for entry in get_cached_repo_tree(repo_id, cache_dir=cache_dir)}
    except CachedRepoTreeNotFoundError:
        return None


def _cached_snapshot(repo_id: str, cache_dir: Path) -> Path | None:
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


# -- 2. How much --------------------------------------------------------------------------------


def measure(downloads: Sequence[Download], hf_home: Path, token: str | None) -> list[Sized]:
    """Each download's files at main's commit, from the hub's listing (nothing downloaded), and
    which of them the cache lacks."""
    api = HfApi()
    sized = []
    for download in downloads:
        commit = api.model_info(download.repo_id, token=token).sha
        listed = {entry.path: entry.size for entry in api.list_repo_tree(download.repo_id, recursive=True,
                                                                          revision=commit, token=token)
                  if isinstance(entry, RepoFile)}
        absent = sorted(set(download.allow_patterns) - set(listed))
        if absent:
            raise DownloadFailed(f"{download.repo_id} has no {', '.join(absent)} at {commit[:12]}")
        wanted = sorted(filter_repo_objects(listed, **download.patterns()))
        snapshot = snapshot_dir(hf_home, download.repo_id, commit)
        files = tuple((path, listed[path]) for path in wanted)
        sized.append(Sized(download, commit, files, tuple(f for f in files if not (snapshot / f[0]).is_file())))
    return sized


def check_space(sized: Sequence[Sized], hf_home: Path) -> None:
    """A volume too small fails now rather than 40 GB in."""
    cache_dir = hub_cache(hf_home)
    needed = sum(item.pending_bytes for item in sized)
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise DownloadFailed(f"not enough space in {cache_dir}: {size_text(needed)} to download, "
                             f"{size_text(free)} free; grow the network volume (or the container disk)")


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= GB else f"{n_bytes / MB:.1f} MB"


# -- 3. Fetch -----------------------------------------------------------------------------------


def fetch(sized: Sequence[Sized], hf_home: Path, token: str | None, report: Callable[[str], None],
          max_workers: int = DEFAULT_MAX_WORKERS, progress_every_s: float = PROGRESS_EVERY_S) -> int:
    """Download each item's missing files (those cached are kept), then mark its snapshot whole
    (refs/main). Returns the bytes of the snapshots."""
    total_bytes = 0
    for item in sized:
        repo_id = item.download.repo_id
        storage = repo_folder(hf_home, repo_id)
        freed = remove_stale_partials(storage / "blobs")
        if freed:
            report(f"{repo_id}: removed {size_text(freed)} of partial files an interrupted download left")
        with progress_lines(storage / "blobs", item.pending_bytes, repo_id, report, progress_every_s):
            _download_files(repo_id, item.commit, [path for path, _ in item.pending], hub_cache(hf_home), token,
                            max_workers)
        snapshot = snapshot_dir(hf_home, repo_id, item.commit)
        absent = [path for path, _ in item.files if not (snapshot / path).is_file()]
        if absent:
            raise DownloadFailed(f"{repo_id}: {len(absent)} files absent after the download, such as {absent[0]}")
        write_ref(hf_home, repo_id, item.commit)
        size = folder_size(snapshot)
        total_bytes += size
        report(f"{repo_id}: {size_text(size)} at {snapshot}")
    return total_bytes


def _download_files(repo_id: str, commit: str, paths: Sequence[str], cache_dir: Path, token: str | None,
                    max_workers: int) -> None:
    """hf_hub_download of each path at `commit`, `max_workers` at a time; the first failure stops
    the files not yet started and is raised."""
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="download") as pool:
        futures = [pool.submit(hf_hub_download, repo_id, path, revision=commit, cache_dir=cache_dir, token=token)
                   for path in paths]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((future for future in done if future.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            raise failed.exception()


@contextmanager
def hub_online() -> Iterator[None]:
    """huggingface_hub's requests allowed for the body, whatever HF_HUB_OFFLINE said at its import
    (see the module docstring); the switch is back as it was afterwards."""
    was_offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was_offline


@contextmanager
def progress_bars_off() -> Iterator[None]:
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextmanager
def progress_lines(blobs: Path, expected_bytes: int, label: str, report: Callable[[str], None],
                   every_s: float) -> Iterator[None]:
    """While the body downloads into `blobs`, report the bytes that arrived every `every_s`."""
    start_bytes = _folder_bytes(blobs)
    started = time.monotonic()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every_s):
            arrived = max(0, _folder_bytes(blobs) - start_bytes)
            share = f" ({100 * arrived / expected_bytes:.0f}%)" if expected_bytes else ""
            rate = arrived / max(time.monotonic() - started, 1e-9)
            report(f"{label}: {size_text(arrived)} of {size_text(expected_bytes)}{share}, {size_text(int(rate))}/s")

    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def remove_stale_partials(blobs: Path, older_than_s: float = STALE_PARTIAL_S) -> int:
    """Delete partial files no download has written to for `older_than_s`; returns their bytes."""
    freed = 0
    now = time.time()
    for partial in blobs.glob(f"*{PARTIAL_SUFFIX}") if blobs.is_dir() else ():
        try:
            stat = partial.stat()
            if now - stat.st_mtime > older_than_s:
                partial.unlink()
                freed += stat.st_size
        except FileNotFoundError:  # finished or removed meanwhile by the download that owns it
            continue
    return freed


def folder_size(path: Path) -> int:
    """Bytes of the files under a snapshot folder (its entries are links into blobs/)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _folder_bytes(folder: Path) -> int:
    total = 0
    for entry in folder.iterdir() if folder.is_dir() else ():
        try:
            total += entry.stat().st_size
        except FileNotFoundError:  # a partial file renamed into place meanwhile
            continue
    return total


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and its first two lines (huggingface_hub's HTTP errors
    say the status on the first, what was not found and where on the second)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:ONE_LINE_PARTS]
    return f"{type(exc).__name__}: {' '.join(lines)}" if lines else type(exc).__name__


# -- The start: DOWNLOAD_MODELS=missing ---------------------------------------------------------


def fetch_missing(settings: "Settings", token: str | None = None,
                  progress_every_s: float = PROGRESS_EVERY_S) -> list[str]:
    """Download what the worker may need and HF_HOME lacks: the edit model, the Layered model
    (less the folders it borrows) and the Lightning files. Returns the repo ids fetched; raises
    DownloadFailed with one line. Only this start pays: the files land in HF_HOME (the network
    volume by default), where the next start finds them."""
    edit_model, layered_model, hf_home = settings.edit_model, settings.layered_model, settings.hf_home
    lightning = (settings.lightning_repo, tuple(settings.lightning_files.values()))
    cache_dir = hub_cache(hf_home)
    missing = missing_downloads(edit_model, layered_model, lightning, cache_dir)
    if not missing:
        log.info("models: all in HF_HOME (%s); nothing to download", hf_home)
        return []
    current = missing[0].repo_id
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Log lines instead of huggingface_hub's progress bars, which a log shows as garbage.
        with hub_online(), progress_bars_off():
            # 1, 2. What each download takes, in order: edit, Layered, Lightning.
            sized = []
            for download in missing:
                current = download.repo_id
                if download.name == "layered":
                    comparison = compare_on_hub(HfApi(), edit_model, layered_model, token)
                    for line in comparison_lines(comparison, edit_model, layered_model):
                        log.info("%s", line)
                    download = plan(None, layered_model, comparison)[0]
                item = measure([download], hf_home, token)[0]
                log.info("model %s missing from HF_HOME; downloading (%s)", download.repo_id,
                         size_text(item.pending_bytes))
                log.info("%s: %d files, %s in all%s", download.repo_id, len(item.files), size_text(item.total_bytes),
                         f"; skipping {', '.join(download.ignore_patterns)}" if download.ignore_patterns else "")
                sized.append(item)
            current = "the models"
            check_space(sized, hf_home)
            # 3. Download.
            for item in sized:
                current = item.download.repo_id
                fetch([item], hf_home, token, lambda line: log.info("%s", line),
                      progress_every_s=progress_every_s)
    except DownloadFailed as exc:
        raise DownloadFailed(f"DOWNLOAD_MODELS=missing: {exc}") from None
    except DOWNLOAD_ERRORS as exc:
        raise DownloadFailed(f"DOWNLOAD_MODELS=missing: downloading {current} into {cache_dir} failed: "
                             f"{one_line(exc)}") from None
    return [item.download.repo_id for item in sized]
