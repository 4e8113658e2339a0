#!/usr/bin/env python
"""Write tiny random LoRA files for the tiny Qwen-Image-Edit-2511 model.

The tiny edit transformer written by ``tools/make_tiny_models.py`` is read from the hub cache
(its module names and shapes), and deterministic rank-4 random LoRAs are written for it to DIR,
one per key format the worker meets and some it must refuse; with ``--hf-home``, the Lightning
files also as the hub-cache repo ``lightx2v/Qwen-Image-Edit-2511-Lightning`` under their real
file names.

Usage::

    python tools/make_tiny_loras.py --out DIR [--hf-home HF_HOME]

Every LoRA changes the tiny model's output visibly (the weights are large on purpose). Output
is deterministic: re-running gives byte-identical files. Each file, and how diffusers loads it:
docs/testing.md, "The tiny LoRAs".
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
sys.path.insert(0, str(REPO_ROOT))

from make_tiny_models import EDIT_REPO_ID  # noqa: E402
from src.models.files.snapshots import main_snapshot, write_snapshot  # noqa: E402

LIGHTNING_REPO_ID = "lightx2v/Qwen-Image-Edit-2511-Lightning"
# The real file names (https://huggingface.co/lightx2v/Qwen-Image-Edit-2511-Lightning).
LIGHTNING_FILES = {
    (4, "bf16"): "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
    (4, "fp32"): "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-fp32.safetensors",
    (8, "bf16"): "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors",
    (8, "fp32"): "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-fp32.safetensors",
}

# Bump when the generated content changes, so that the snapshot hash changes too.
GENERATOR_VERSION = "1"
RANK = 4
# Real Lightning files: rank 64, alpha 8 (scale 1/8). Same ratio here.
LIGHTNING_ALPHA = 0.5
# Relative size of the random deltas: B @ A has entries of about GAIN / sqrt(in_features),
# comparable to the tiny model's own weights, so every LoRA changes the image visibly.
GAIN = 0.5
SEEDS = {"user": 1, "lightning4": 4, "lightning8": 8, "other": 99}

# Linear layers of a QwenImageTransformerBlock that the real Lightning LoRAs adapt:
# 60 blocks x 12 layers x rank 64 in bf16 is the 849,608,296-byte size of the real files
# (with img_mod.1 / txt_mod.1 it would be ~1.18 GB).
LIGHTNING_MODULES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
METADATA = {"format": "pt"}


def edit_transformer_path(hf_home: Path) -> Path:
    try:
        return main_snapshot(hf_home, EDIT_REPO_ID) / "transformer"
    except FileNotFoundError:
        raise SystemExit(
            f"no tiny {EDIT_REPO_ID} in {hf_home}; run: python tools/make_tiny_models.py --hf-home {hf_home}"
        ) from None


def block_linears(transformer_path: Path) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of every Linear inside transformer_blocks."""
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(transformer_path)
    return {
        name: tuple(module.weight.shape)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")
    }


def random_pairs(
    shapes: dict[str, tuple[int, int]], seed: int, gain: float = GAIN
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (rank x in), B (out x rank))}, float32, from one fixed-seed generator."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in sorted(shapes):
        out_features, in_features = shapes[name]
        a = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, RANK, generator=generator) * gain / RANK**0.5
        pairs[name] = (a, b)
    return pairs


def peft_keys(pairs, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in pairs.items():
        out[f"{prefix}{name}.lora_A.weight"] = a
        out[f"{prefix}{name}.lora_B.weight"] = b
    return out


def lightning_keys(pairs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The lightx2v format: bare module names, lora_down/lora_up, a 0-dim alpha per module.
    B is stored rank/alpha times larger, so that alpha/rank * B @ A is a delta like the others'."""
    out = {}
    for name, (a, b) in pairs.items():
        out[f"{name}.lora_down.weight"] = a.to(dtype)
        out[f"{name}.lora_up.weight"] = (b * (RANK / LIGHTNING_ALPHA)).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(LIGHTNING_ALPHA, dtype=dtype)
    return out


def other_model_files() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEEDS["other"])

    def rnd(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    sdxl = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    sdxl_kohya = "lora_unet_" + sdxl.replace(".", "_")
    return {
        # Flux.1 (diffusers format, real 3072 width): no such modules in Qwen.
        "tiny_lora_wrong_model.safetensors": {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": rnd(RANK, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": rnd(3072, RANK),
            "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": rnd(RANK, 3072),
            "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": rnd(3072, RANK),
        },
        # Right module names, shapes of the real 20B model (3072 wide) instead of the tiny one.
        "tiny_lora_wrong_shapes.safetensors": {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rnd(RANK, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rnd(3072, RANK),
        },
        "tiny_lora_sdxl_kohya.safetensors": {
            f"{sdxl_kohya}.lora_down.weight": rnd(RANK, 640),
            f"{sdxl_kohya}.lora_up.weight": rnd(640, RANK),
            f"{sdxl_kohya}.alpha": torch.tensor(float(RANK)),
        },
        "tiny_lora_sdxl_diffusers.safetensors": {
            f"unet.{sdxl}.lora_A.weight": rnd(RANK, 640),
            f"unet.{sdxl}.lora_B.weight": rnd(640, RANK),
        },
        "not_a_lora.safetensors": {
            "model.embed.weight": rnd(10, 16),
            "model.norm.weight": torch.ones(16),
        },
    }


def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {key: tensors[key].contiguous() for key in sorted(tensors)}
    save_file(tensors, str(path), metadata=METADATA)


def snapshot_hash(repo_id: str) -> str:
    """A fixed 40-hex "commit" id (same scheme as make_tiny_models.snapshot_hash)."""
    return hashlib.sha1(f"tiny-random-lora:{repo_id}:v{GENERATOR_VERSION}".encode()).hexdigest()


def write_lightning_repo(hf_home: Path, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write the Lightning repo into the hub cache like make_tiny_models.write_repo does."""
    def fill(folder: Path) -> None:
        for name, tensors in files.items():
            save(tensors, folder / name)

    return write_snapshot(hf_home, LIGHTNING_REPO_ID, snapshot_hash(LIGHTNING_REPO_ID), fill)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the LoRA files")
    parser.add_argument("--hf-home", type=Path, default=None,
                        help="HF_HOME holding the tiny models; also receives the tiny Lightning repo "
                             "(default for reading the model: ./.cache/hf, and no repo is written)")
    args = parser.parse_args(argv)

    model_home = (args.hf_home or REPO_ROOT / ".cache" / "hf").resolve()
    shapes = block_linears(edit_transformer_path(model_home))

    user = random_pairs(shapes, SEEDS["user"])
    lightning_shapes = {n: s for n, s in shapes.items() if n.split(".", 2)[2] in LIGHTNING_MODULES}
    lightning = {steps: random_pairs(lightning_shapes, SEEDS[f"lightning{steps}"]) for steps in (4, 8)}

    files = {
        "tiny_lora_diffusers.safetensors": peft_keys(user, "transformer."),
        "tiny_lora_aitoolkit.safetensors": peft_keys(user, "diffusion_model."),
        "tiny_lightning_4step.safetensors": lightning_keys(lightning[4], torch.bfloat16),
        "tiny_lightning_8step.safetensors": lightning_keys(lightning[8], torch.bfloat16),
        **other_model_files(),
    }
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save(tensors, out / name)
        print(f"{out / name} ({len(tensors)} tensors, {(out / name).stat().st_size} bytes)")

    if args.hf_home is not None:
        repo_files = {}
        for (steps, precision), name in LIGHTNING_FILES.items():
            tensors = lightning_keys(lightning[steps], torch.bfloat16)  # fp32 holds the same (bf16) values
            if precision == "fp32":
                tensors = {key: value.float() for key, value in tensors.items()}
            repo_files[name] = tensors
        snapshot = write_lightning_repo(args.hf_home.resolve(), repo_files)
        print(f"{LIGHTNING_REPO_ID}: {snapshot} ({', '.join(sorted(repo_files))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
