#!/usr/bin/env python
"""Write tiny random-weight Qwen image models into a Hugging Face hub cache.

Architecturally valid but minuscule versions of ``Qwen/Qwen-Image-Edit-2511`` and
``Qwen/Qwen-Image-Layered``, in the standard hub-cache layout (``DIR/hub/models--<org>--<name>/``
with ``refs/main`` and ``snapshots/<hash>/``), so that the production loading code runs
unchanged with ``HF_HOME=DIR HF_HUB_OFFLINE=1`` on a CPU box without network access.

Usage::

    python tools/make_tiny_models.py --hf-home DIR

Output is deterministic (fixed seeds, fixed snapshot hashes); re-running over an existing DIR
replaces the snapshots. Why each size is what it is: docs/testing.md, "The tiny models".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.models.files.snapshots import write_snapshot  # noqa: E402

EDIT_REPO_ID = "Qwen/Qwen-Image-Edit-2511"
LAYERED_REPO_ID = "Qwen/Qwen-Image-Layered"

# Bump when the generated content changes, so that the snapshot hash changes too.
GENERATOR_VERSION = "1"
SEED = 0

# --- Tokenizer ------------------------------------------------------------
# The Qwen2.5-VL added tokens at their real ids (151643 onwards); the first
# 14 are special tokens, the rest are ordinary added tokens in the real repo.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",  # 151643, also pad
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645, chat eos
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
]
QWEN_OTHER_ADDED_TOKENS = [
    "<tool_call>",  # 151657
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",  # 151664
]
FIRST_ADDED_TOKEN_ID = 151643
TOKEN_IDS = {tok: FIRST_ADDED_TOKEN_ID + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS)}
ENDOFTEXT_ID = TOKEN_IDS["<|endoftext|>"]
IM_END_ID = TOKEN_IDS["<|im_end|>"]

# Qwen2 pre-tokenizer split pattern (same as the real tokenizer).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# --- Text encoder (Qwen2.5-VL) -------------------------------------------
TEXT_VOCAB_SIZE = 152064  # real value; must exceed the largest added token id
TEXT_HIDDEN = 16  # also the vision merger output and the transformer's joint_attention_dim
TEXT_LAYERS = 2
TEXT_HEADS = 2  # head_dim 8
TEXT_KV_HEADS = 1  # grouped-query attention, like the real model
TEXT_INTERMEDIATE = 32
TEXT_MROPE_SECTION = [1, 1, 2]  # must sum to head_dim / 2
VISION_DEPTH = 2
VISION_FULLATT_BLOCKS = [1]  # block 0 uses window attention, block 1 full attention
VISION_HIDDEN = 16
VISION_HEADS = 2
VISION_INTERMEDIATE = 32
VISION_PATCH_SIZE = 14  # must match the processor's patch_size
VISION_MERGE_SIZE = 2
VISION_TEMPORAL_PATCH_SIZE = 2
VISION_WINDOW_SIZE = 112

# Greedy-decoding rig (see _rig_eos_after_newline): the newline token's
# embedding gets a large value in dimension 0, which the <|im_end|> row of
# lm_head reads.
EOS_RIG_DIM = 0
EOS_RIG_EMBED_VALUE = 1.0  # 50x the std (0.02) of the random embeddings
EOS_RIG_LOGIT_GAIN = 10.0

# --- Processor ------------------------------------------------------------
# The image processor resizes images to sides that are multiples of
# patch_size * merge_size = 28 with an area within these bounds: at most 8x8
# patches (16 vision tokens) per image; the 384x384 condition image of the edit
# pipeline becomes 84x84 (9 tokens). The real repo allows up to 12845056 pixels.
VL_MIN_PIXELS = 56 * 56  # real default
VL_MAX_PIXELS = 112 * 112
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --- VAE (AutoencoderKLQwenImage) ----------------------------------------
VAE_BASE_DIM = 2  # the real model uses 96
VAE_DIM_MULT = [1, 1, 1, 1]  # constant width: needed for num_res_blocks=0
VAE_NUM_RES_BLOCKS = 0  # encoder: none besides the mid block; decoder: 1 per stage
VAE_TEMPORAL_DOWNSAMPLE = [False, True, True]  # real; len() sets vae_scale_factor = 8
VAE_Z_DIM = 16  # real; must differ from 4 for Layered (RGBA input vs latents check)

# --- Transformer (QwenImageTransformer2DModel) ---------------------------
TRANSFORMER_LAYERS = 1
TRANSFORMER_HEADS = 2
TRANSFORMER_AXES_DIMS_ROPE = (4, 6, 6)  # sum = attention_head_dim; each even
TRANSFORMER_HEAD_DIM = sum(TRANSFORMER_AXES_DIMS_ROPE)
TRANSFORMER_PATCH_SIZE = 2

# Real scheduler config of the Qwen-Image family.
QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# model_index.json component entries shared by both pipelines (as in the real repos).
COMPONENT_CLASSES = {
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Tokenizer / processor files
# --------------------------------------------------------------------------


def byte_level_vocab() -> dict[str, int]:
    """The 256 byte tokens in GPT-2 byte-to-unicode order (ids 0..255, as in the real vocab)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: i for i, char in enumerate(bytes_to_unicode().values())}


def byte_token_id(byte: int) -> int:
    """Id of the token of a single byte, e.g. 198 for b"\\n"."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return byte_level_vocab()[bytes_to_unicode()[byte]]


def write_tokenizer_files(folder: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json for a byte-level Qwen2 tokenizer.

    ``tokenizer.json`` is required: transformers re-numbers the added tokens of
    a vocab.json/merges.txt tokenizer sequentially (256, 257, ...), whereas the
    model config relies on the real ids (e.g. image_token_id 151655). Putting
    the added tokens into the BPE vocabulary at their real ids pins them.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {**byte_level_vocab(), **TOKEN_IDS}
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[],  # no merges: every byte is a token
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_OTHER_ADDED_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))

    added_tokens_decoder = {
        str(TOKEN_IDS[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in QWEN_SPECIAL_TOKENS,
        }
        for t in QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS
    }
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": QWEN_SPECIAL_TOKENS[1:],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def write_processor_files(folder: Path) -> None:
    """Write a Qwen2-VL processor folder: image processor config + tokenizer.

    Same file format as the real repo's processor/ folder. No video processor
    config is written: transformers derives the video processor from
    preprocessor_config.json when torchvision is installed, and without
    torchvision ``src.models.vl_processor.load_processor`` builds an image-only processor.
    """
    write_tokenizer_files(folder)
    _write_json(
        folder / "preprocessor_config.json",
        {
            "image_mean": CLIP_MEAN,
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": CLIP_STD,
            "max_pixels": VL_MAX_PIXELS,
            "merge_size": VISION_MERGE_SIZE,
            "min_pixels": VL_MIN_PIXELS,
            "patch_size": VISION_PATCH_SIZE,
            "processor_class": "Qwen2_5_VLProcessor",
            "temporal_patch_size": VISION_TEMPORAL_PATCH_SIZE,
        },
    )


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _rig_eos_after_newline(model) -> None:
    """Make greedy decoding emit <|im_end|> right after a newline token.

    QwenImageLayeredPipeline captions the input image with
    ``generate(max_new_tokens=512)`` when the prompt is empty; with random
    weights that would run all 512 steps. Its caption prompt ends with
    "<|im_start|>assistant\\n", so it is enough that the newline position
    predicts <|im_end|>: the newline embedding gets a large component in one
    dimension, which dominates that position's hidden state through the
    (near-zero) random layers and the final RMSNorm, and the <|im_end|> row of
    lm_head reads only that dimension. All other tokens keep random embeddings,
    so prompt embeddings stay prompt-dependent.
    """
    with torch.no_grad():
        model.get_input_embeddings().weight[byte_token_id(ord("\n")), EOS_RIG_DIM] = EOS_RIG_EMBED_VALUE
        lm_head = model.get_output_embeddings().weight
        lm_head[IM_END_ID].zero_()
        lm_head[IM_END_ID, EOS_RIG_DIM] = EOS_RIG_LOGIT_GAIN


def build_text_encoder():
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": TEXT_VOCAB_SIZE,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "mrope_section": TEXT_MROPE_SECTION, "rope_theta": 1000000.0},
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
        },
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": VISION_PATCH_SIZE,
            "spatial_merge_size": VISION_MERGE_SIZE,
            "temporal_patch_size": VISION_TEMPORAL_PATCH_SIZE,
            "window_size": VISION_WINDOW_SIZE,
            "fullatt_block_indexes": VISION_FULLATT_BLOCKS,
        },
        image_token_id=TOKEN_IDS["<|image_pad|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=False,  # as in Qwen2.5-VL-7B; _rig_eos_after_newline needs a separate lm_head
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _rig_eos_after_newline(model)
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
        do_sample=False,
    )
    return model


def build_vae(input_channels: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(SEED)
    vae = AutoencoderKLQwenImage(
        base_dim=VAE_BASE_DIM,
        z_dim=VAE_Z_DIM,
        dim_mult=VAE_DIM_MULT,
        num_res_blocks=VAE_NUM_RES_BLOCKS,
        temperal_downsample=VAE_TEMPORAL_DOWNSAMPLE,
        input_channels=input_channels,
    )
    # With 2 channels, the random conv biases swamp the signal: decoded images
    # would barely depend on the latents (seed, prompt, input image). Without
    # biases, outputs vary visibly with the inputs.
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
    return vae


def build_transformer(**flags):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(SEED)
    return QwenImageTransformer2DModel(
        patch_size=TRANSFORMER_PATCH_SIZE,
        in_channels=VAE_Z_DIM * TRANSFORMER_PATCH_SIZE**2,  # packed 2x2 latent patches
        out_channels=VAE_Z_DIM,
        num_layers=TRANSFORMER_LAYERS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_attention_heads=TRANSFORMER_HEADS,
        joint_attention_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=TRANSFORMER_AXES_DIMS_ROPE,
        **flags,
    )


# --------------------------------------------------------------------------
# Repo writing
# --------------------------------------------------------------------------

# Written in this order: the edit repo last, so that its refs/main existing
# means the whole run completed.
PIPELINES = {
    LAYERED_REPO_ID: {
        "class_name": "QwenImageLayeredPipeline",
        "vae_input_channels": 4,  # RGBA
        "transformer_flags": {"use_layer3d_rope": True, "use_additional_t_cond": True},
    },
    EDIT_REPO_ID: {
        "class_name": "QwenImageEditPlusPipeline",
        "vae_input_channels": 3,
        "transformer_flags": {"zero_cond_t": True},  # as in the real 2511 transformer config
    },
}


def write_pipeline_folder(folder: Path, spec: dict) -> None:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    build_vae(spec["vae_input_channels"]).save_pretrained(folder / "vae", safe_serialization=True)
    build_transformer(**spec["transformer_flags"]).save_pretrained(folder / "transformer", safe_serialization=True)
    build_text_encoder().save_pretrained(folder / "text_encoder", safe_serialization=True)
    for sub in ("tokenizer", "processor"):
        (folder / sub).mkdir()
    write_tokenizer_files(folder / "tokenizer")
    write_processor_files(folder / "processor")
    _write_json(
        folder / "model_index.json",
        {"_class_name": spec["class_name"], "_diffusers_version": diffusers.__version__, **COMPONENT_CLASSES},
    )


def snapshot_hash(repo_id: str) -> str:
    """A fixed 40-hex "commit" id per repo and generator version."""
    return hashlib.sha1(f"tiny-random:{repo_id}:v{GENERATOR_VERSION}".encode()).hexdigest()


def write_repo(hf_home: Path, repo_id: str) -> Path:
    """Write one repo into the hub cache, replacing a previous snapshot. Returns the snapshot dir."""
    return write_snapshot(hf_home, repo_id, snapshot_hash(repo_id),
                          lambda folder: write_pipeline_folder(folder, PIPELINES[repo_id]))


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-home", required=True, type=Path, help="HF_HOME directory to write into")
    args = parser.parse_args(argv)

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" bars
    start = time.perf_counter()
    for repo_id in PIPELINES:
        snapshot = write_repo(args.hf_home.resolve(), repo_id)
        print(f"{repo_id}: {snapshot} ({_dir_size(snapshot) / 1e6:.1f} MB)")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
