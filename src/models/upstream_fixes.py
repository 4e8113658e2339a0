"""Worker-side fixes for places where the pinned diffusers runs a model differently from
how its authors run it. Each names its upstream report and is small enough to delete
once the pinned version carries the fix; docs/upstream-register.md lists them all.
"""

from __future__ import annotations

import torch

# transformers' token types (ProcessorMixin.create_mm_token_type_ids): text 0, image 1, video 2.
IMAGE_TOKEN_TYPE, VIDEO_TOKEN_TYPE = 1, 2
_MARK = "_worker_mm_token_types_hook"


def forward_mm_token_types(text_encoder: torch.nn.Module) -> None:
    """diffusers #14194 (fix PR #14189, both open at 0.42.1): the edit pipelines call the
    Qwen2.5-VL text encoder without `mm_token_type_ids`. transformers 5.x computes the
    image tokens' (t, h, w) rope positions from that field, so without it every token,
    the image's too, gets a plain sequential position: a conditioning the model was
    never trained on, silently.

    This hook adds the field to every call that carries image pixels and lacks it,
    derived from the token ids exactly as the processor derives it, so it is right
    whether or not the processor returned the field and whichever pipeline calls.
    Calls without pixels (text-only prompts, generation steps after the first) pass
    unchanged. Idempotent: a text encoder shared by two pipelines is hooked once."""
    if getattr(text_encoder, _MARK, None) is not None:
        return
    config = text_encoder.config

    def add_token_types(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None or kwargs.get("pixel_values") is None or kwargs.get("mm_token_type_ids") is not None:
            return None
        token_types = torch.zeros_like(input_ids)
        token_types[input_ids == config.image_token_id] = IMAGE_TOKEN_TYPE
        token_types[input_ids == config.video_token_id] = VIDEO_TOKEN_TYPE
        return args, {**kwargs, "mm_token_type_ids": token_types}

    setattr(text_encoder, _MARK, text_encoder.register_forward_pre_hook(add_token_types, with_kwargs=True))


def apply(pipeline) -> None:
    """Every fix that applies to `pipeline`'s components."""
    forward_mm_token_types(pipeline.text_encoder)
