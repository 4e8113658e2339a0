"""The Qwen VAE on still images, without its video feature cache.

The Qwen-Image VAE is a causal video VAE: diffusers' `_encode` and `_decode` keep a copy of
every causal convolution's input for the frames that follow, all of it allocated until the call
ends. An image is one frame, so those copies are never read, yet they are most of a decode's
memory (docs/memory.md). For a single frame, or a batch of single frames (a decomposition's
layers), the encoder and decoder run here without the cache.

Invariants: the same latents and pixels as diffusers', bit for bit (the first frame of a cached
run reads nothing from the cache: each entry is still empty, so it zero-pads, and the temporal
up- and downsamplers skip their time convolution; tests/models/test_image_vae.py). Several
frames of one video and VAE tiling keep diffusers' own path. `saving_memory` turns on, for one
job, the levers that cost pixels, only where the job would not fit otherwise
(src/models/memory/plan.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.autoencoders.vae import DecoderOutput


def for_images(vae) -> None:
    """Make `vae` (an AutoencoderKLQwenImage) encode and decode single frames without
    the feature cache."""
    if getattr(vae, "_for_images", False):
        return
    cached_encode, cached_decode = vae._encode, vae._decode

    def encode(x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 1 or vae.use_tiling:
            return cached_encode(x)
        return vae.quant_conv(vae.encoder(x))

    def decode(z: torch.Tensor, return_dict: bool = True):
        if z.shape[2] != 1 or vae.use_tiling:
            return cached_decode(z, return_dict=return_dict)
        out = torch.clamp(vae.decoder(vae.post_quant_conv(z)), min=-1.0, max=1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)

    vae._encode, vae._decode = encode, decode
    vae._for_images = True


@contextmanager
def saving_memory(vae, levers: tuple[str, ...]):
    """Within the block, `vae` runs the memory levers a job needs (src/models/memory/plan.py):
    `layers_one_at_a_time` (diffusers' slicing: a batch of layers decoded one by one) and
    `vae_tiling` (diffusers' tiling). Both change pixels slightly; both are undone after."""
    if "layers_one_at_a_time" in levers:
        vae.enable_slicing()
    if "vae_tiling" in levers:
        vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_slicing()
        vae.disable_tiling()
