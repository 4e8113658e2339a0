"""Fill a RunPod network volume with the worker's models, in the standard Hugging Face cache layout.

Run it once on a Pod that has the volume mounted (at /runpod-volume), then deploy the worker
with the same HF_HOME: `from_pretrained(repo_id)` finds the files there with HF_HUB_OFFLINE=1.

    python tools/download_models.py                      # both models into /runpod-volume/huggingface-cache
    python tools/download_models.py --only edit --dry-run
    HF_TOKEN=hf_... python tools/download_models.py --hf-home /workspace/hf

The worker lends the edit model's text encoder, tokenizer and processor to Qwen-Image-Layered,
so Layered's text_encoder/, tokenizer/ and processor/ (about 16 GB) need not be downloaded, but
only where they are the same files. This tool proves it first: it compares both repositories'
file hashes from the hub's metadata (nothing downloaded; with --only layered and --dry-run too),
skips the folders that are the same and downloads Layered's own where they differ, which the
worker then loads instead (src/shared_components.py). --full takes the whole repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.shared_components import SHARED_COMPONENTS, compare_components, hub_file_hashes  # noqa: E402

DEFAULT_EDIT_MODEL = "Qwen/Qwen-Image-Edit-2511"
DEFAULT_LAYERED_MODEL = "Qwen/Qwen-Image-Layered"
DEFAULT_HF_HOME = "/runpod-volume/huggingface-cache"
DEFAULT_MAX_WORKERS = 8
GB = 1000**3


@dataclass(frozen=True)
class Download:
    name: str                       # "edit" or "layered"
    repo_id: str
    ignore_patterns: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> argparse.Namespace:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-home", default=env.get("HF_HOME") or DEFAULT_HF_HOME, metavar="DIR",
                        help=f"HF_HOME to fill (models go to DIR/hub); default $HF_HOME, else {DEFAULT_HF_HOME}")
    parser.add_argument("--only", choices=("edit", "layered"), help="download only this model")
    parser.add_argument("--edit-model", default=env.get("EDIT_MODEL") or DEFAULT_EDIT_MODEL, metavar="REPO_ID",
                        help=f"default $EDIT_MODEL, else {DEFAULT_EDIT_MODEL}")
    parser.add_argument("--layered-model", default=env.get("LAYERED_MODEL") or DEFAULT_LAYERED_MODEL,
                        metavar="REPO_ID", help=f"default $LAYERED_MODEL, else {DEFAULT_LAYERED_MODEL}")
    parser.add_argument("--full", action="store_true",
                        help=f"take all of the layered model ({', '.join(SHARED_COMPONENTS)} too), comparing nothing")
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS,
                        help=f"parallel file downloads; default {DEFAULT_MAX_WORKERS}")
    parser.add_argument("--dry-run", action="store_true", help="show what would be downloaded, download nothing")
    return parser.parse_args(argv)


def needs_comparison(args: argparse.Namespace) -> bool:
    """Whether Layered's shared folders must be compared with the edit repo's: Layered is
    downloaded and not whole. With --only layered too: the edit repo's metadata is read, not its files."""
    return args.only in (None, "layered") and not args.full


def borrowed_patterns(comparison: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """ignore_patterns for Layered's folders that hold the same files as the edit repo's (the
    worker borrows those). Differing folders are downloaded; so is everything when nothing was compared."""
    return tuple(f"{component}/*" for component, differing in comparison.items() if not differing)


def plan(args: argparse.Namespace, comparison: Mapping[str, tuple[str, ...]]) -> list[Download]:
    """The downloads the arguments ask for, given `comparison` (compare_components of the two
    repositories' hub listings; empty where needs_comparison is false)."""
    downloads = []
    if args.only in (None, "edit"):
        downloads.append(Download("edit", args.edit_model))
    if args.only in (None, "layered"):
        skip = () if args.full else borrowed_patterns(comparison)
        downloads.append(Download("layered", args.layered_model, skip))
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


def compare_on_hub(api, edit_model: str, layered_model: str, token: str | None) -> dict[str, tuple[str, ...]]:
    """compare_components of the two repositories' main revisions (what snapshot_download takes),
    from the hub's file metadata: nothing is downloaded."""
    def listing(repo_id: str) -> dict[str, str]:
        return hub_file_hashes(api.model_info(repo_id, files_metadata=True, token=token).siblings or [])
    return compare_components(listing(edit_model), listing(layered_model))


def folder_size(path: Path) -> int:
    """Bytes of the files under a snapshot folder (its entries are links into blobs/)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_home = Path(args.hf_home).expanduser()
    cache_dir = hf_home / "hub"

    # The worker image sets HF_HUB_OFFLINE=1; this tool exists to go online. huggingface_hub
    # reads the variable when imported, so it is cleared before the import below.
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        print("note: HF_HUB_OFFLINE is set; ignoring it for this download")
        os.environ["HF_HUB_OFFLINE"] = "0"
    from huggingface_hub import errors
    from huggingface_hub.utils import httpx  # huggingface_hub's own HTTP client, whatever its package

    try:
        return _download(args, hf_home, cache_dir)
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError,
            errors.DryRunError, httpx.TransportError) as exc:
        # Gated or missing repo, bad token, no network: one line, not a traceback.
        print(f"error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


def _download(args: argparse.Namespace, hf_home: Path, cache_dir: Path) -> int:
    from huggingface_hub import HfApi, snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    print(f"HF_HOME {hf_home}  (cache {cache_dir}; token: {'HF_TOKEN' if token else 'none / huggingface-cli login'})")
    cache_dir.mkdir(parents=True, exist_ok=True)

    # 1. Which of Layered's shared folders the worker can borrow: the same files on the hub.
    comparison = {}
    if needs_comparison(args):
        comparison = compare_on_hub(HfApi(), args.edit_model, args.layered_model, token)
        print("\n".join(comparison_lines(comparison, args.edit_model, args.layered_model)))
    downloads = plan(args, comparison)

    # 2. Sizes first, so a too-small volume fails now rather than 40 GB in.
    to_fetch = 0
    for item in downloads:
        files = snapshot_download(item.repo_id, cache_dir=cache_dir, token=token, dry_run=True,
                                  ignore_patterns=list(item.ignore_patterns) or None)
        total = sum(f.file_size or 0 for f in files)
        pending = sum(f.file_size or 0 for f in files if f.will_download)
        to_fetch += pending
        skipped = f"; skipping {', '.join(item.ignore_patterns)}" if item.ignore_patterns else ""
        print(f"{item.name:<8} {item.repo_id}: {len(files)} files, {total / GB:.1f} GB, "
              f"{pending / GB:.1f} GB to download{skipped}")
    free = shutil.disk_usage(cache_dir).free
    print(f"to download: {to_fetch / GB:.1f} GB; free on {cache_dir}: {free / GB:.1f} GB")
    if args.dry_run:
        return 0
    if to_fetch > free:
        print(f"error: not enough space on {cache_dir}: need {to_fetch / GB:.1f} GB, "
              f"{free / GB:.1f} GB free; grow the network volume", file=sys.stderr)
        return 1

    # 3. Download (huggingface_hub shows tqdm progress), then check the snapshot is complete
    #    the way the worker will read it: offline.
    total_bytes = 0
    for item in downloads:
        print(f"\n{item.name}: {item.repo_id}")
        ignore = list(item.ignore_patterns) or None
        snapshot_download(item.repo_id, cache_dir=cache_dir, token=token,
                          ignore_patterns=ignore, max_workers=args.max_workers)
        path = Path(snapshot_download(item.repo_id, cache_dir=cache_dir, ignore_patterns=ignore,
                                      local_files_only=True))
        size = folder_size(path)
        total_bytes += size
        print(f"{item.name}: {size / GB:.1f} GB at {path}")

    print(f"\ndone: {total_bytes / GB:.1f} GB under {cache_dir}")
    print(f"deploy the worker with HF_HOME={hf_home} (and HF_HUB_OFFLINE=1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
