"""Random Qwen-Image-Edit weights written to disk in the Hugging Face cache layout the worker
loads (HF_HOME), for tools/start_bench.py --from-disk: the start then reads real files.

    python tools/disk_weights.py --hf-home /tmp/hf-disk --precision fp8   # on the GPU machine
    python tools/disk_weights.py --hf-home /tmp/hf-disk --precision bf16  # then the holes filled

The edit model's snapshot gets full-size random weights (the published configs; speed does
not depend on the values) as sharded safetensors with their index, as the Hub has them; its
tokenizer, processor and scheduler come from the tiny models' snapshot (as tools/bench.py),
the processor with the real pixel bounds. The models are built on the GPU with their default
random init (finite values: the warm-up runs them) and each shard written on its own thread.
The Lightning files (tools/bench.py's random rank-64 LoRA) go where the worker looks.

`--precision fp8` writes what a QUANTIZE=fp8 start with the FP8 cache reads: the FP8 cache
(src/models/fp8/cache.py's layout and manifest; quantized on the GPU from the same weights)
and, in the bf16 snapshot, the tensors it takes by key. The bf16 weights of the quantized
linears are left as holes (sparse files: the header and size as published, no disk blocks):
the bf16 edit set and its FP8 cache together (72 GB) do not fit the device's 64 GiB disk.
Only the FP8 Lightning fuse reads those holes: they read as zeros, which fail its check against
the FP8 cache, so a `PRELOAD=…,lightning` FP8 start cannot run from this layout. `--precision bf16` afterwards
fills the holes in place and removes the FP8 cache: the full bf16 snapshot, 58 GB; `--precision
fp8` over a bf16 layout punches the holes (fallocate) and writes the FP8 cache.

`--size tiny` writes the same layout from the tiny models' configs (the CPU test).
`disk-layout.json` in HF_HOME records what is there (the start bench copies it into its results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.models.fp8 import cache as fp8_cache# noqa: E402
from src.models.files import tensors as weights# noqa: E402
from src.models.files.snapshots import main_snapshot, repo_folder  # noqa: E402
from src.plumbing.config import DEFAULT_FP8_KEEP_BF16, FP8_CACHE_FOLDER, Settings  # noqa: E402

EDIT_REPO = "Qwen/Qwen-Image-Edit-2511"
LAYOUT_FILE = "disk-layout.json"
SHARD_BYTES = 5 * 1000**3
LIGHTNING_BYTES = 2 * 850 * 1000**2  # the two random Lightning files (4 and 8 steps), about
WRITERS = 4  # shards written at once
# diffusers' and transformers' sharded file names and index files.
SHARD_NAMES = {"diffusers": ("diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json"),
               "transformers": ("model", "model.safetensors.index.json")}
COMPONENTS = {"transformer": "diffusers", "text_encoder": "transformers", "vae": "diffusers"}


def copy_template(template_home: Path, hf_home: Path) -> Path:
    """The tiny edit snapshot's small files (configs, tokenizer, processor, scheduler) at
    the same revision in `hf_home`; its weights and model configs are replaced later."""
    source = repo_folder(template_home, EDIT_REPO)
    target = repo_folder(hf_home, EDIT_REPO)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, symlinks=False, ignore=shutil.ignore_patterns("*.safetensors"))
    return main_snapshot(hf_home, EDIT_REPO)


def built(factory, device: torch.device) -> torch.nn.Module:
    """A module built straight on `device` in bf16 with its default random init."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            return factory().eval()
    finally:
        torch.set_default_dtype(previous)


def build_models(snapshot: Path, size: str, device: torch.device) -> dict[str, torch.nn.Module]:
    """The edit model's transformer, text encoder and VAE: full-size (the published configs,
    as tools/bench.py builds them) or from the configs in `snapshot` (tiny)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if size == "full":
        from tools.bench import TEXT_ENCODER_7B, VISION_7B

        text_config = Qwen2_5_VLConfig(text_config=TEXT_ENCODER_7B, vision_config=VISION_7B,
                                       image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
        factories = {"transformer": lambda: QwenImageTransformer2DModel(zero_cond_t=True),
                     "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(text_config),
                     "vae": lambda: AutoencoderKLQwenImage()}
    else:
        text_config = Qwen2_5_VLConfig.from_pretrained(snapshot / "text_encoder")
        factories = {
            "transformer": lambda: QwenImageTransformer2DModel.from_config(
                QwenImageTransformer2DModel.load_config(snapshot / "transformer")),
            "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(text_config),
            "vae": lambda: AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(snapshot / "vae"))}
    return {name: built(factory, device) for name, factory in factories.items()}


def save_config(name: str, module: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if COMPONENTS[name] == "diffusers":
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)


def fix_processor(snapshot: Path) -> None:
    """The real Qwen2.5-VL pixel bounds in the processor's config (tools/bench.py sets them
    in memory): the condition image becomes as many vision tokens as with the real model."""
    from tools.bench import PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS

    path = snapshot / "processor" / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config.update(min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS,
                  size={"shortest_edge": PROCESSOR_MIN_PIXELS, "longest_edge": PROCESSOR_MAX_PIXELS})
    path.write_text(json.dumps(config, indent=2))


def shard_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())


def write_shard(path: Path, state: dict[str, torch.Tensor], names: list[str], holes: frozenset[str]) -> int:
    """One safetensors file of `names` (contiguous offsets and {"format": "pt"}, as
    safetensors writes them), the tensors in `holes` left unwritten: a sparse file of the
    full size. Returns the bytes written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        tensor = state[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": fp8_cache.SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    written = 0
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        base = file.tell()
        for name in names:
            if name in holes:
                continue
            file.seek(base + header[name]["data_offsets"][0])
            written += file.write(tensor_bytes(state[name]))
        file.truncate(base + offset)
    return written


def write_component(folder: Path, kind: str, state: dict[str, torch.Tensor], holes: frozenset[str]) -> dict:
    """`state` as sharded safetensors with the index in `folder`; returns file and written bytes."""
    stem, index_name = SHARD_NAMES[kind]
    groups = shard_groups(state)
    paths = [folder / f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    with ThreadPoolExecutor(WRITERS) as pool:
        written = sum(pool.map(lambda job: write_shard(job[0], state, job[1], holes), zip(paths, groups)))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {name: path.name for path, group in zip(paths, groups) for name in group}}
    (folder / index_name).write_text(json.dumps(index, indent=1))
    return {"file_bytes": sum(path.stat().st_size for path in paths), "written_bytes": written}


def quantized_weights(transformer: torch.nn.Module, keep: frozenset[str]) -> list[str]:
    """The block linears' weight names QUANTIZE=fp8 with FP8_KEEP_BF16=`keep` quantizes."""
    from src.models.fp8.linear import BLOCK_LINEARS

    quantized = [layer for layer in BLOCK_LINEARS if layer not in keep]
    return [f"transformer_blocks.{block}.{layer}.weight" for block in range(len(transformer.transformer_blocks))
            for layer in quantized]


def write_fp8_cache(hf_home: Path, snapshot: Path, transformer: torch.nn.Module, names: list[str],
                    keep: frozenset[str], dtype: torch.dtype) -> dict:
    """The FP8 cache of `transformer` (its weights quantized where they are, with
    fp8_cache.quantize_weight, as the worker quantizes them) in fp8_cache's layout and manifest."""
    spec = fp8_cache.recipe(keep, dtype)
    expected = fp8_cache.cached_tensor_specs(fp8_cache.empty_transformer(snapshot / "transformer", dtype, keep))
    final = fp8_cache.cache_folder(hf_home / FP8_CACHE_FOLDER, EDIT_REPO, snapshot.name, spec)
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    state = dict(transformer.state_dict())
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel()  # one byte per FP8 value
        if groups[-1] and size + nbytes > fp8_cache.SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes

    def write(job: tuple[int, list[str]]) -> tuple[str, int]:
        index, group = job
        path = final / f"{fp8_cache.SHARD_PREFIX}{index:05d}-of-{len(groups):05d}.safetensors"
        entries = [(f"{name.removesuffix('.weight')}.{part}", *expected[f"{name.removesuffix('.weight')}.{part}"])
                   for name in group for part in ("weight", "weight_scale")]

        def tensors():
            for name in group:
                quantized = fp8_cache.quantize_weight(state[name], dtype)
                yield name, quantized.weight.data
                yield f"{name}_scale", quantized.weight_scale.data

        fp8_cache.write_safetensors(path, entries, tensors())
        return path.name, path.stat().st_size

    with ThreadPoolExecutor(WRITERS) as pool:
        files = dict(pool.map(write, enumerate(groups, start=1)))
    manifest = {"format": fp8_cache.FORMAT, "repo_id": EDIT_REPO, "revision": snapshot.name, "recipe": spec,
                "recipe_id": final.name, "files": files, "torch": torch.__version__,
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (final / fp8_cache.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"folder": str(final), "file_bytes": sum(files.values())}


def write_lightning(hf_home: Path) -> int:
    from tools.bench import write_lightning_lora

    settings = Settings.from_env({"HF_HOME": str(hf_home)})
    write_lightning_lora(hf_home, settings)
    folder = repo_folder(hf_home, settings.lightning_repo)
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors"))


def write_layout(hf_home: Path, template_home: Path, precision: str, size: str, device: torch.device,
                 keep: frozenset[str] = frozenset(DEFAULT_FP8_KEEP_BF16), fp8_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The edit model (and the Lightning files) under `hf_home`; `precision` fp8 adds the FP8
    cache and leaves the quantized linears' bf16 weights as holes. Returns what was written."""
    start = time.perf_counter()
    snapshot = copy_template(template_home, hf_home)
    fix_processor(snapshot)
    models = build_models(snapshot, size, device)
    record: dict = {"precision": precision, "size": size, "snapshot": str(snapshot), "components": {}}
    holes = frozenset(quantized_weights(models["transformer"], keep)) if precision == "fp8" else frozenset()
    state = models["transformer"].state_dict()
    hole_bytes = sum(state[name].nbytes for name in holes)
    need = (sum(p.nbytes for module in models.values() for p in module.state_dict().values()) - hole_bytes
            + hole_bytes // 2 + (LIGHTNING_BYTES if size == "full" else 0))  # FP8: a byte per bf16 value's two
    check_room(hf_home, need)
    for name, module in models.items():
        folder = snapshot / name
        save_config(name, module, folder)
        record["components"][name] = write_component(folder, COMPONENTS[name], dict(module.state_dict()),
                                                     holes if name == "transformer" else frozenset())
    if precision == "fp8":
        record["fp8_cache"] = write_fp8_cache(hf_home, snapshot, models["transformer"], sorted(holes), keep, fp8_dtype)
        record["holes"] = {"tensors": len(holes), "bytes": hole_bytes, "names": sorted(holes)}
    if size == "full":  # the real file's layout fits the full-size transformer only
        record["lightning_bytes"] = write_lightning(hf_home)
    os.sync()
    record["write_s"] = round(time.perf_counter() - start, 1)
    record["disk_bytes"] = disk_bytes(hf_home)
    (hf_home / LAYOUT_FILE).write_text(json.dumps(record, indent=2))
    return record


def check_room(hf_home: Path, need: int) -> None:
    """Exit with one line unless the disk under `hf_home` has `need` bytes free (and 1 GB more)."""
    hf_home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(hf_home).free + disk_bytes(hf_home)  # what is there now is replaced
    if free < need + 1e9:
        sys.exit(f"not enough disk at {hf_home}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")


def make_fp8(hf_home: Path, device: torch.device, keep: frozenset[str] = frozenset(DEFAULT_FP8_KEEP_BF16),
             dtype: torch.dtype = torch.bfloat16) -> dict:
    """A bf16 layout made an fp8 one: the quantized linears' bf16 weights punched out of the
    transformer's shards (holes) and the FP8 cache written from a transformer built anew
    (random values again: the bytes' speed, not their values, is measured)."""
    from diffusers import QwenImageTransformer2DModel

    start = time.perf_counter()
    record = json.loads((hf_home / LAYOUT_FILE).read_text())
    snapshot = Path(record["snapshot"])
    folder = snapshot / "transformer"
    transformer = built(lambda: QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(folder)),
                        device)
    holes = frozenset(quantized_weights(transformer, keep))
    punched = 0
    for path in sorted(folder.glob("*.safetensors")):
        stored, _ = weights.safetensors_header(path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for name in sorted(holes & stored.keys()):
                punch_hole(fd, stored[name].start, stored[name].nbytes)
                punched += stored[name].nbytes
        finally:
            os.close(fd)
    record["fp8_cache"] = write_fp8_cache(hf_home, snapshot, transformer, sorted(holes), keep, dtype)
    os.sync()
    record.update(precision="fp8", holes={"tensors": len(holes), "bytes": punched, "names": sorted(holes)},
                  fp8_s=round(time.perf_counter() - start, 1), disk_bytes=disk_bytes(hf_home))
    (hf_home / LAYOUT_FILE).write_text(json.dumps(record, indent=2))
    return record


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): the range reads as zeros and takes no disk."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, 0x02 | 0x01, offset, length) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"fallocate(PUNCH_HOLE) failed: {os.strerror(errno)}")


def fill_holes(hf_home: Path, device: torch.device) -> dict:
    """An fp8 layout made whole bf16: the holes in the transformer's shards written in place
    (random values, finite) and the FP8 cache removed."""
    start = time.perf_counter()
    record = json.loads((hf_home / LAYOUT_FILE).read_text())
    folder = Path(record["snapshot"]) / "transformer"
    holes = set(record.get("holes", {}).get("names", ()))
    filled = 0
    generator = torch.Generator(device).manual_seed(0)
    for path in sorted(folder.glob("*.safetensors")):
        stored, _ = weights.safetensors_header(path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for name in sorted(holes & stored.keys()):
                tensor = stored[name]
                values = torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float32) * 0.02
                filled += os.pwrite(fd, tensor_bytes(values.to(tensor.dtype)), tensor.start)
        finally:
            os.close(fd)
    shutil.rmtree(hf_home / FP8_CACHE_FOLDER, ignore_errors=True)
    os.sync()
    record.update(precision="bf16", filled_bytes=filled, fill_s=round(time.perf_counter() - start, 1),
                  disk_bytes=disk_bytes(hf_home))
    record.pop("fp8_cache", None)
    record.pop("holes", None)
    (hf_home / LAYOUT_FILE).write_text(json.dumps(record, indent=2))
    return record


def disk_bytes(folder: Path) -> int:
    """The disk blocks the files under `folder` take (holes take none)."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-home", type=Path, required=True)
    parser.add_argument("--precision", choices=("fp8", "bf16"), required=True,
                        help="fp8: FP8 cache + the snapshot without the quantized linears' bf16 weights; "
                             "bf16: the whole bf16 snapshot (over an fp8 layout: its holes filled)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--tiny-hf-home", type=Path, default=Path("/tmp/bench-hf"),
                        help="the tiny models (tokenizer, processor, scheduler; the configs with --size tiny)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    layout = args.hf_home / LAYOUT_FILE
    there = json.loads(layout.read_text())["precision"] if layout.exists() else None
    # The FP8 cache's recipe names the dtype the worker loads in: bf16 on a GPU, float32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.precision == "bf16" and there == "fp8":
        record = fill_holes(args.hf_home, device)
    elif args.precision == "fp8" and there == "bf16":
        record = make_fp8(args.hf_home, device, dtype=dtype)
    else:
        from tools.bench import tiny_models

        tiny_models(args.tiny_hf_home)
        record = write_layout(args.hf_home, args.tiny_hf_home, args.precision, args.size, device, fp8_dtype=dtype)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
