"""Where a model's files are: its snapshot in the Hugging Face cache (HF_HOME/hub), offline.

`locate` follows the cache's refs/main, as the loader, the FP8 cache, LoRAs named by repo id
and the start's early read-ahead (src/models/early_read.py) all need it. No torch here: the
early read-ahead runs before torch is imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

log = logging.getLogger(__name__)


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
