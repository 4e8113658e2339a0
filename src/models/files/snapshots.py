"""Where a model's files are: its snapshot in the Hugging Face cache (HF_HOME/hub), offline.

`locate` follows the cache's refs/main, as the loader, the FP8 cache, LoRAs named by repo id
and the start's early read-ahead (src/models/files/early_read.py) all need it. The cache's layout
(`models--<org>--<name>/refs/main`, `snapshots/<revision>/`) is built here alone, for the
download (src/models/files/download.py), the tools and the tests. No torch here: the early
read-ahead runs before torch is imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

log = logging.getLogger(__name__)

HUB_FOLDER = "hub"  # HF_HOME/hub: the folder huggingface_hub calls cache_dir


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
    cache_dir = hub_cache(hf_home)
    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except IncompleteSnapshotError as exc:
        # The cache's listing of the repo names files this snapshot lacks: Layered's text
        # encoder, tokenizer and processor are left out on purpose where they are the edit
        # model's (src/models/files/shared_components.py). A file that is really missing fails the load
        # that needs it, naming it.
        log.info("%s: the cached snapshot lacks files its listing names; using it as it is", repo_id)
        path = Path(exc.snapshot_path)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelNotFound(
            f"model {repo_id} is not in the Hugging Face cache at {cache_dir}; "
            f"fetch it with: python tools/download_models.py --hf-home {hf_home}, or start with DOWNLOAD_MODELS=missing"
        ) from None
    return ModelRef(repo_id=repo_id, revision=path.name, path=path)


# -- The cache's layout -------------------------------------------------------------------------


def hub_cache(hf_home: Path) -> Path:
    return hf_home / HUB_FOLDER


def repo_folder(hf_home: Path, repo_id: str) -> Path:
    """HF_HOME/hub/models--<org>--<name>: one repo's blobs/, refs/ and snapshots/."""
    return hub_cache(hf_home) / f"models--{repo_id.replace('/', '--')}"


def snapshot_dir(hf_home: Path, repo_id: str, revision: str) -> Path:
    return repo_folder(hf_home, repo_id) / "snapshots" / revision


def ref_file(hf_home: Path, repo_id: str, ref: str = "main") -> Path:
    """refs/<ref>: the file that names the revision a ref is at."""
    return repo_folder(hf_home, repo_id) / "refs" / ref


def main_snapshot(hf_home: Path, repo_id: str) -> Path:
    """The snapshot refs/main names, read off the files alone (`locate` also checks the cached
    listing); FileNotFoundError without refs/main."""
    return snapshot_dir(hf_home, repo_id, ref_file(hf_home, repo_id).read_text().strip())


def write_ref(hf_home: Path, repo_id: str, revision: str, ref: str = "main") -> None:
    """refs/<ref> = revision, as huggingface_hub writes it, atomically: a reader never sees half
    of it, and refs/main written last marks a snapshot whole."""
    path = ref_file(hf_home, repo_id, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{ref}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(revision)
    os.replace(temporary, path)


def write_snapshot(hf_home: Path, repo_id: str, revision: str, fill: Callable[[Path], None]) -> Path:
    """snapshots/<revision> as `fill` writes it into an empty folder, replacing an earlier one,
    then refs/main. `fill` writes into a staging folder beside the snapshot that is swapped in
    once whole, so an interrupted run never leaves half a snapshot. Returns the snapshot."""
    snapshot = snapshot_dir(hf_home, repo_id, revision)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{revision}.", dir=snapshot.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like a normal one
    try:
        fill(staging)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        os.replace(staging, snapshot)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_ref(hf_home, repo_id, revision)
    return snapshot
