"""Fill a RunPod network volume with the worker's models, in the standard Hugging Face cache layout.

Run it once on a Pod that has the volume mounted (at /runpod-volume), then deploy the worker
with the same HF_HOME: `from_pretrained(repo_id)` finds the files there with HF_HUB_OFFLINE=1.
(A worker started with DOWNLOAD_MODELS=missing does the same itself, for what HF_HOME lacks.)

    python tools/download_models.py                      # both models into /runpod-volume/huggingface-cache
    python tools/download_models.py --lightning          # and the Lightning LoRA files
    python tools/download_models.py --only edit --dry-run
    HF_TOKEN=hf_... python tools/download_models.py --hf-home /workspace/hf
    python tools/download_models.py --fp8                # and the FP8 cache for QUANTIZE=fp8 workers
    python tools/download_models.py --only loras --lora owner/name/style.safetensors   # a LoRA repo's file

--lora OWNER/NAME[/FILE] (repeatable) puts a LoRA repo, or one file of it, into the same cache,
where a job's `loras` source `owner/name` (with `weight_name` FILE) finds it; jobs never
download from the hub. `--only loras` skips the models.

--fp8 writes, once the snapshots are in, the FP8 cache of each transformer downloaded
(src/models/fp8/cache.py): its FP8 block linears as a QUANTIZE=fp8 worker quantizes them at start,
into $FP8_CACHE_DIR (default HF_HOME/qwen-fp8), for the block linears $FP8_KEEP_BF16 does not
keep (default: all but the modulation). A worker with the same settings then loads them
instead of reading the bf16 blocks and quantizing (about 14 GB written per transformer; the
quantization runs on the CPU, so no GPU is needed). It needs torch, as the worker does.

The worker lends the edit model's text encoder, tokenizer and processor to Qwen-Image-Layered,
so Layered's text_encoder/, tokenizer/ and processor/ (about 16 GB) need not be downloaded, but
only where they are the same files. This tool proves it first: it compares both repositories'
file hashes from the hub's metadata (nothing downloaded; with --only layered and --dry-run too),
skips the folders that are the same and downloads Layered's own where they differ, which the
worker then loads instead (src/models/files/shared_components.py). --full takes the whole repository.
The work itself is src/models/files/download.py's, shared with the worker's start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from huggingface_hub import HfApi  # noqa: E402

from src.models.files.download import (DEFAULT_MAX_WORKERS, DOWNLOAD_ERRORS, Download, DownloadFailed,  # noqa: E402
                                       borrowed_patterns, check_space, compare_on_hub, comparison_lines, fetch,
                                       hub_online, measure, one_line, size_text)
from src.models.files.download import plan as plan_downloads  # noqa: E402
from src.models.files.shared_components import SHARED_COMPONENTS  # noqa: E402
from src.models.files.snapshots import hub_cache  # noqa: E402

__all__ = ["borrowed_patterns", "comparison_lines", "main", "needs_comparison", "parse_args", "plan"]

DEFAULT_EDIT_MODEL = "Qwen/Qwen-Image-Edit-2511"
DEFAULT_LAYERED_MODEL = "Qwen/Qwen-Image-Layered"
DEFAULT_HF_HOME = "/runpod-volume/huggingface-cache"
# src/plumbing/config.py's defaults, repeated so the tool runs without torch (which src/plumbing/config.py imports);
# tests/models/test_model_download.py checks they agree.
DEFAULT_LIGHTNING_REPO = "lightx2v/Qwen-Image-Edit-2511-Lightning"
DEFAULT_LIGHTNING_FILES = {
    4: "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
    8: "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors",
}


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> argparse.Namespace:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-home", default=env.get("HF_HOME") or DEFAULT_HF_HOME, metavar="DIR",
                        help=f"HF_HOME to fill (models go to DIR/hub); default $HF_HOME, else {DEFAULT_HF_HOME}")
    parser.add_argument("--only", choices=("edit", "layered", "loras"),
                        help="download only this model, or only the --lora repos")
    parser.add_argument("--edit-model", default=env.get("EDIT_MODEL") or DEFAULT_EDIT_MODEL, metavar="REPO_ID",
                        help=f"default $EDIT_MODEL, else {DEFAULT_EDIT_MODEL}")
    parser.add_argument("--layered-model", default=env.get("LAYERED_MODEL") or DEFAULT_LAYERED_MODEL,
                        metavar="REPO_ID", help=f"default $LAYERED_MODEL, else {DEFAULT_LAYERED_MODEL}")
    parser.add_argument("--full", action="store_true",
                        help=f"take all of the layered model ({', '.join(SHARED_COMPONENTS)} too), comparing nothing")
    parser.add_argument("--lightning", action="store_true",
                        help="also the Lightning LoRA files ($LIGHTNING_REPO, $LIGHTNING_4STEP_FILE and "
                             f"$LIGHTNING_8STEP_FILE; default {DEFAULT_LIGHTNING_REPO})")
    parser.add_argument("--lora", action="append", type=lora_download, default=[], metavar="OWNER/NAME[/FILE]",
                        help="also a LoRA repo from the hub, or only FILE of it; repeatable")
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS,
                        help=f"parallel file downloads; default {DEFAULT_MAX_WORKERS}")
    parser.add_argument("--dry-run", action="store_true", help="show what would be downloaded, download nothing")
    parser.add_argument("--fp8", action="store_true",
                        help="then write the FP8 cache of each transformer for QUANTIZE=fp8 workers "
                             "(src/models/fp8/cache.py)")
    parser.add_argument("--fp8-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the dtype the worker loads in: bfloat16 on a GPU (default), float32 on the CPU")
    args = parser.parse_args(argv)
    if args.only == "loras" and not args.lora:
        parser.error("--only loras: name them with --lora OWNER/NAME[/FILE]")
    args.lightning_repo = env.get("LIGHTNING_REPO") or DEFAULT_LIGHTNING_REPO
    args.lightning_files = (env.get("LIGHTNING_4STEP_FILE") or DEFAULT_LIGHTNING_FILES[4],
                            env.get("LIGHTNING_8STEP_FILE") or DEFAULT_LIGHTNING_FILES[8])
    # The worker's FP8 settings, read as it reads them (src/plumbing/config.py) when --fp8 needs them.
    args.fp8_env = {name: env[name] for name in ("FP8_KEEP_BF16", "FP8_CACHE_DIR") if env.get(name)}
    return args


def lora_download(text: str) -> Download:
    """`--lora OWNER/NAME[/FILE]`: the whole repo, or the one file a job names as weight_name."""
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected OWNER/NAME or OWNER/NAME/FILE, got {text!r}")
    file = "/".join(parts[2:])
    return Download("lora", "/".join(parts[:2]), allow_patterns=(file,) if file else ())


def needs_comparison(args: argparse.Namespace) -> bool:
    """Whether Layered's shared folders must be compared with the edit repo's: Layered is
    downloaded and not whole. With --only layered too: the edit repo's metadata is read, not its files."""
    return args.only in (None, "layered") and not args.full


def plan(args: argparse.Namespace, comparison) -> list[Download]:
    """The downloads the arguments ask for, given `comparison` (compare_components of the two
    repositories' hub listings; empty where needs_comparison is false)."""
    return plan_downloads(args.edit_model if args.only in (None, "edit") else None,
                          args.layered_model if args.only in (None, "layered") else None, comparison,
                          lightning=(args.lightning_repo, args.lightning_files) if args.lightning else None,
                          full=args.full) + list(args.lora)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_home = Path(args.hf_home).expanduser()
    cache_dir = hub_cache(hf_home)
    token = os.environ.get("HF_TOKEN") or None
    print(f"HF_HOME {hf_home}  (cache {cache_dir}; token: {'HF_TOKEN' if token else 'none / hf auth login'})")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The worker image sets HF_HUB_OFFLINE=1; this tool exists to go online.
        with hub_online():
            return _download(args, hf_home, cache_dir, token)
    except DownloadFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DOWNLOAD_ERRORS as exc:
        # Gated or missing repo, bad token, no network, full disk: one line, not a traceback.
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


def _download(args: argparse.Namespace, hf_home: Path, cache_dir: Path, token: str | None) -> int:
    # 1. Which of Layered's shared folders the worker can borrow: the same files on the hub.
    comparison = {}
    if needs_comparison(args):
        comparison = compare_on_hub(HfApi(), args.edit_model, args.layered_model, token)
        print("\n".join(comparison_lines(comparison, args.edit_model, args.layered_model)))

    # 2. Sizes first, so a too-small volume fails now rather than 40 GB in.
    sized = measure(plan(args, comparison), hf_home, token)
    for item in sized:
        skipped = f"; skipping {', '.join(item.download.ignore_patterns)}" if item.download.ignore_patterns else ""
        print(f"{item.download.name:<9} {item.download.repo_id}: {len(item.files)} files, "
              f"{size_text(item.total_bytes)}, {size_text(item.pending_bytes)} to download{skipped}")
    print(f"to download: {size_text(sum(item.pending_bytes for item in sized))}")
    if args.dry_run:
        return 0
    check_space(sized, hf_home)

    # 3. Download (huggingface_hub shows its progress bars on a terminal), then read each
    #    snapshot back the way the worker will: offline.
    total_bytes = fetch(sized, hf_home, token, print, max_workers=args.max_workers)
    print(f"\ndone: {size_text(total_bytes)} under {cache_dir}")
    if args.fp8:
        write_fp8_caches(args, hf_home)
    print(f"deploy the worker with HF_HOME={hf_home} (and HF_HUB_OFFLINE=1)")
    return 0


def write_fp8_caches(args: argparse.Namespace, hf_home: Path) -> None:
    """4. The FP8 cache of each transformer just downloaded (torch and diffusers imported only here)."""
    import torch

    from src.models.fp8.cache import CacheUnusable, build_for_models
    from src.models.files.tensors import ModelNotFound
    from src.plumbing.config import ConfigError, Settings

    try:
        settings = Settings.from_env({**args.fp8_env, "HF_HOME": str(hf_home)})
        repo_ids = [repo for name, repo in (("edit", args.edit_model), ("layered", args.layered_model))
                    if args.only in (None, name)]
        build_for_models(hf_home, settings.fp8_cache_dir, repo_ids, settings.fp8_keep_bf16,
                         getattr(torch, args.fp8_dtype), print)
    except (ConfigError, CacheUnusable, ModelNotFound) as exc:
        raise DownloadFailed(f"--fp8: {exc}") from None
    print(f"FP8 caches under {settings.fp8_cache_dir}: deploy with QUANTIZE=fp8"
          f"{' and FP8_CACHE_DIR=' + str(settings.fp8_cache_dir) if 'FP8_CACHE_DIR' in args.fp8_env else ''}")


if __name__ == "__main__":
    sys.exit(main())
