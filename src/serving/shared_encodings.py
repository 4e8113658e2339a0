"""Work shared by the results of one edit job: each encoding done once.

A job with several results (`num_images`, a list of prompts) calls the edit pipeline
once per result, each call exactly as a single-image job makes it, so every result
equals that job's pixel for pixel. What those calls would repeat is computed once:

- the text encoder's output for a prompt and the job's images (every result of the
  prompt shares it, and the negative prompt's is shared by all results);
- the VAE latents of the reference images (every result shares them).

Both are deterministic functions of their inputs (the VAE encode takes the mode of its
distribution, never a sample), so a reused value is the value the call would compute.
Entries are keyed by the inputs themselves, never by call order.
"""

from __future__ import annotations

import hashlib
import inspect
from contextlib import contextmanager

import torch


@contextmanager
def encodings_shared(pipeline):
    """Within the block, `pipeline` reuses its prompt and reference-image encodings."""
    prompt_memo: dict[tuple, tuple] = {}
    latents_memo: list[tuple[torch.Tensor, torch.Tensor]] = []
    encode_prompt, encode_vae_image = pipeline.encode_prompt, pipeline._encode_vae_image
    signature = inspect.signature(encode_prompt)

    def shared_encode_prompt(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        arguments = call.arguments
        if arguments.get("prompt_embeds") is not None:
            return encode_prompt(*args, **kwargs)
        key = (_prompt_key(arguments["prompt"]), _images_key(arguments.get("image")), str(arguments.get("device")),
               arguments.get("num_images_per_prompt"), arguments.get("max_sequence_length"))
        if key not in prompt_memo:
            prompt_memo[key] = encode_prompt(*args, **kwargs)
        return prompt_memo[key]

    def shared_encode_vae_image(image: torch.Tensor, generator):
        for seen, latents in latents_memo:
            if seen.shape == image.shape and seen.dtype == image.dtype and torch.equal(seen, image):
                return latents
        latents = encode_vae_image(image, generator)
        latents_memo.append((image, latents))
        return latents

    shared = {"encode_prompt": shared_encode_prompt, "_encode_vae_image": shared_encode_vae_image}
    shadowed = {name: pipeline.__dict__.get(name) for name in shared}
    pipeline.__dict__.update(shared)  # instance attributes shadow the class's methods
    try:
        yield
    finally:
        for name, previous in shadowed.items():
            if previous is None:
                del pipeline.__dict__[name]
            else:
                pipeline.__dict__[name] = previous


def _prompt_key(prompt) -> tuple[str, ...]:
    return (prompt,) if isinstance(prompt, str) else tuple(prompt)


def _images_key(images) -> tuple:
    """The condition images by content: PIL images of a few hundred pixels a side."""
    if images is None:
        return ()
    return tuple((image.size, image.mode, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
                 for image in (images if isinstance(images, list) else [images]))
