"""CFG_BATCH: true CFG's two transformer passes of a step as one batch of two.

With true CFG the edit pipeline calls its transformer twice per step, on the same latents and
timestep: with the prompt's text states, then the negative prompt's. `cfg_batched(pipeline)`
makes the first call run both as one batch of two, the text streams padded to the longer and
the padding masked with `encoder_hidden_states_mask` (the transformer's own input for it), and
answers the second call from the half it kept. Off by default: slower on the H200
(docs/performance.md, CFG as one batch of two).

Invariants: each half is its own pass up to rounding (another batch size, a masked attention
sum; tests/models/test_cfg_batch.py). The pair is found from the pipeline's own calls
(`encode_prompt` for the prompt, then the negative prompt), never from call order alone: the
second call is answered only with the same latents object, timestep and the second's states;
any other call runs as without the switch. The worker asks for the batch only where the memory
plan has room for both samples (src/models/memory/plan.py `cfg_pair`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class _Pair:
    encoded: list[tuple] = field(default_factory=list)  # (states, mask) per encode_prompt call, in order
    kept: tuple | None = None  # (latents, timestep, the negative prompt's output) awaiting its call

    def texts(self) -> tuple[tuple, tuple] | None:
        """(the prompt's (states, mask), the negative prompt's) once both were encoded."""
        return (self.encoded[0], self.encoded[1]) if len(self.encoded) >= 2 else None


@contextmanager
def cfg_batched(pipeline, enabled: bool = True):
    """Within the block, each step's conditional and unconditional passes of `pipeline`
    run as one transformer call with a batch of two (when `enabled`)."""
    if not enabled:
        yield
        return
    pair = _Pair()
    transformer = pipeline.transformer
    encode_prompt, forward = pipeline.encode_prompt, transformer.forward

    def recording_encode_prompt(*args, **kwargs):
        encoded = encode_prompt(*args, **kwargs)
        pair.encoded.append(encoded[:2])
        return encoded

    def paired_forward(*args, **kwargs):
        texts = pair.texts()
        if args or texts is None or not _batchable(kwargs):
            return forward(*args, **kwargs)
        prompt, negative = texts
        states, mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")
        kept, pair.kept = pair.kept, None
        if (kept is not None and states is negative[0] and mask is negative[1]
                and kwargs["hidden_states"] is kept[0] and torch.equal(kwargs["timestep"], kept[1])):
            return _as_asked(kept[2], kwargs)
        if states is prompt[0] and mask is prompt[1]:
            both = forward(**_batch_of_two(kwargs, prompt, negative), return_dict=False)[0]
            pair.kept = (kwargs["hidden_states"], kwargs["timestep"], both[1:])
            return _as_asked(both[:1], kwargs)
        return forward(*args, **kwargs)

    shadowed = {"encode_prompt": pipeline.__dict__.get("encode_prompt"), "forward": transformer.__dict__.get("forward")}
    pipeline.__dict__["encode_prompt"] = recording_encode_prompt  # instance attributes shadow the methods
    transformer.__dict__["forward"] = paired_forward
    try:
        yield
    finally:
        for owner, name in ((pipeline, "encode_prompt"), (transformer, "forward")):
            if shadowed[name] is None:
                del owner.__dict__[name]
            else:
                owner.__dict__[name] = shadowed[name]


def _batchable(kwargs: dict) -> bool:
    """A call of one sample the batch of two covers: keywords only, no extra conditioning."""
    hidden = kwargs.get("hidden_states")
    return (hidden is not None and hidden.shape[0] == 1 and kwargs.get("additional_t_cond") is None
            and kwargs.get("controlnet_block_samples") is None and kwargs.get("encoder_hidden_states") is not None)


def _batch_of_two(kwargs: dict, prompt: tuple, negative: tuple) -> dict:
    """The call's keywords for both texts at once: latents and timestep twice, the text
    states padded to the longer with zeros, masked where padded (no mask when both are
    whole and of one length, as the pipeline passes a whole text's)."""
    texts = [prompt[0], negative[0]]
    length = max(text.shape[1] for text in texts)
    masks = []
    for text, mask in (prompt, negative):
        whole = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask.bool()
        masks.append(torch.nn.functional.pad(whole, (0, length - text.shape[1]), value=False))
    padded = [torch.nn.functional.pad(text, (0, 0, 0, length - text.shape[1])) for text in texts]
    mask = torch.cat(masks)
    batched = {key: value for key, value in kwargs.items() if key != "return_dict"}
    batched.update(
        hidden_states=torch.cat([kwargs["hidden_states"]] * 2),
        timestep=torch.cat([kwargs["timestep"].reshape(-1)] * 2),
        encoder_hidden_states=torch.cat(padded),
        encoder_hidden_states_mask=None if bool(mask.all()) else mask,
        img_shapes=list(kwargs["img_shapes"]) * 2,
    )
    if kwargs.get("guidance") is not None:
        batched["guidance"] = torch.cat([kwargs["guidance"].reshape(-1)] * 2)
    return batched


def _as_asked(sample: torch.Tensor, kwargs: dict):
    """One half in the form the caller asked for (a tuple with return_dict=False)."""
    if kwargs.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    return (sample,)
