"""Whether Qwen-Image-Layered's text encoder, tokenizer and processor are the edit model's files.

The worker lends the edit pipeline's text encoder, tokenizer and processor to Qwen-Image-Layered,
so the 7B text encoder is loaded once. That is only right where both repositories hold the same
files, so this module compares them, file by file, by the hash the hub gives each file: the
sha256 for LFS files, the git blob id for the others.

The hub cache names each blob after that same hash (blobs/<hash>, with the snapshot's files
symlinks into blobs/). So one identity is read two ways without reading the 16 GB of weights:
from the hub's metadata before downloading (tools/download_models.py, which then downloads
Layered's own folder where it differs), and from a local snapshot's symlinks at start (the
worker, which then loads that folder from Layered instead of borrowing it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

# Layered's folders that the worker borrows from the edit model where they hold the same files.
SHARED_COMPONENTS = ("text_encoder", "tokenizer", "processor")
HASH_CHUNK_BYTES = 1 << 20


class HubFile(Protocol):
    """What this module reads of huggingface_hub's RepoSibling (from model_info(files_metadata=True))."""

    rfilename: str
    blob_id: str | None
    lfs: object | None          # BlobLfsInfo, whose .sha256 is the LFS file's hash


def hub_file_hashes(siblings: Iterable[HubFile]) -> dict[str, str]:
    """{path in the repo: hash} from `HfApi().model_info(repo_id, files_metadata=True).siblings`.

    The hash is the one the hub cache names the file's blob after: the LFS sha256 for LFS files,
    the git blob id for the others.
    """
    hashes = {}
    for sibling in siblings:
        file_hash = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
        if not file_hash:
            # Without files_metadata=True the hub lists names only; comparing None with None
            # would call any two files the same.
            raise ValueError(f"no hash for {sibling.rfilename!r}: call model_info with files_metadata=True")
        hashes[sibling.rfilename] = file_hash
    return hashes


def snapshot_file_hashes(snapshot: Path, component: str) -> dict[str, str]:
    """{path in the repo: hash} of the files in one component folder of a local snapshot.

    Keys are the repo's paths (`processor/preprocessor_config.json`), as in hub_file_hashes.
    An empty dict means the snapshot does not hold the folder (download_models skipped it).
    """
    folder = snapshot / component
    if not folder.is_dir():
        return {}
    # Dangling links count too: the file is listed even where its blob is gone.
    files = sorted(path for path in folder.rglob("*") if path.is_symlink() or path.is_file())
    return {path.relative_to(snapshot).as_posix(): _local_file_hash(path) for path in files}


def _local_file_hash(path: Path) -> str:
    if path.is_symlink():
        # In the hub cache a snapshot file links to blobs/<hash>: the name is the identity,
        # and the blob (up to gigabytes) is never read.
        return Path(os.readlink(path)).name
    # A plain file (tools/make_tiny_models.py writes those; so does a local_dir download) has no
    # blob name, so its content is hashed: fine for the tiny test models, slow for real weights.
    # For an LFS file this equals the hub's hash; for a small git file it does not (the hub gives
    # the git blob id), so comparing it with a linked snapshot reports a difference, and the
    # worker then loads Layered's own folder: always correct, only a larger load.
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def component_files(files: Mapping[str, str], component: str) -> dict[str, str]:
    """The entries of a {path in the repo: hash} listing that lie in one component folder."""
    prefix = f"{component}/"
    return {path: file_hash for path, file_hash in files.items() if path.startswith(prefix)}


def differing_files(edit_files: Mapping[str, str], layered_files: Mapping[str, str]) -> tuple[str, ...]:
    """Paths whose hash differs, or that only one side holds, sorted.

    A file only one side holds counts: borrowing is right only for the very same set of files.
    """
    paths = edit_files.keys() | layered_files.keys()
    return tuple(sorted(path for path in paths if edit_files.get(path) != layered_files.get(path)))


def compare_components(edit_files: Mapping[str, str],
                       layered_files: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """For each shared component that Layered's listing holds: its files that differ from the
    edit repo's (an empty tuple: the same files, so the worker can borrow the edit model's).

    Both arguments are whole-repo {path: hash} listings (hub_file_hashes). A component Layered
    does not hold is left out: there is nothing of Layered's own to download or load.
    """
    comparison = {}
    for component in SHARED_COMPONENTS:
        layered = component_files(layered_files, component)
        if layered:
            comparison[component] = differing_files(component_files(edit_files, component), layered)
    return comparison


def own_components(edit_snapshot: Path, layered_snapshot: Path) -> tuple[str, ...]:
    """The shared components the worker must load from Layered's snapshot itself.

    Those the Layered snapshot holds (download_models fetched them because the hub showed them
    different, or --full took everything) whose files differ from the edit snapshot's. The rest
    are borrowed from the edit pipeline: absent from Layered's snapshot, or the same files.
    """
    own = []
    for component in SHARED_COMPONENTS:
        layered = snapshot_file_hashes(layered_snapshot, component)
        # The edit side is hashed only where Layered holds the folder: with plain files that
        # saves reading the edit model's text encoder for nothing.
        if layered and differing_files(snapshot_file_hashes(edit_snapshot, component), layered):
            own.append(component)
    return tuple(own)
