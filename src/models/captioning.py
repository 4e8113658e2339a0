"""The caption of an empty decompose prompt, decoded faster than diffusers' `generate`
(CAPTION_DECODER; the default makes diffusers' own forward calls, without `generate`).

With an empty prompt, `QwenImageLayeredPipeline` first captions the image with the text
encoder's greedy `generate(max_new_tokens=512)`; the cap is the authors' and stays (register
row 25). Decoders: `stock` (diffusers' own `get_image_caption`), `eager` (the default: the
forward calls `generate` makes, the same dynamic KV cache and greedy choice, without its
per-step bookkeeping), `graphed` (a static KV cache and the whole step recorded once as a CUDA
graph at the warm-up), `compiled` (`graphed`, the step compiled by inductor first) and `auto`
(`compiled` with `COMPILE=true` on CUDA, else `eager`).

Invariants: on the CPU every decoder gives stock's tokens (tests). Greedy only: a generation
config that samples is captioned by diffusers' own code, except the two forms greedy in effect
(`top_k=1`, a temperature of at most `GREEDY_TEMPERATURE`). Where no graph was recorded (Layered
loaded by a job, `WARMUP=false`, a streamed text encoder, a prompt longer than the static
buffer) captions decode eagerly. Why, and what each decoder costs and agrees with on the GPU:
docs/performance.md, "Caption decoding".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, StaticCache

from src.plumbing.config import CAPTION_DECODERS

log = logging.getLogger(__name__)

# diffusers' get_image_caption, as the authors' demo runs it (register row 25).
MAX_NEW_TOKENS = 512
# The static buffer: the longest caption prompt at the 1024 bucket (about 1,400 image
# tokens and 230 of instruction with the real tokenizer) plus the new tokens, with room.
STATIC_CONTEXT_TOKENS = 3072
# Graphed decoding looks for the end of the caption every this many tokens: fewer host
# syncs, at most this many - 1 steps computed past the end and dropped.
STOP_CHECK_EVERY = 8
# Steps run on a side stream before recording, as torch.cuda.graph asks (they also compile).
CAPTURE_WARMUP_STEPS = 3
# Generation settings whose effect `greedy_plan` reproduces (the others: diffusers' path).
REPRODUCED_SETTINGS = frozenset({
    "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "output_attentions", "output_hidden_states", "max_length",
    "_from_model_config", "transformers_version",
})
# A sampling temperature at or below this is greedy in effect (docs/performance.md, Caption decoding).
GREEDY_TEMPERATURE = 1e-5
WARMUP_IMAGE_SIZE = 64
WARMUP_NEW_TOKENS = 8


@dataclass(frozen=True)
class GreedyPlan:
    """How `generate` picks each token under the text encoder's generation config."""

    stop_ids: tuple[int, ...]
    repetition_penalty: float | None


def greedy_plan(config) -> GreedyPlan | None:
    """The plan when `config` decodes greedily with settings reproduced here; None when
    it samples or sets anything else (diffusers' own path then captions)."""
    if set(config.to_diff_dict()) - REPRODUCED_SETTINGS:
        return None
    greedy_in_effect = config.top_k == 1 or (config.temperature is not None
                                             and config.temperature <= GREEDY_TEMPERATURE)
    if config.do_sample and not greedy_in_effect:
        return None
    eos = config.eos_token_id
    stop_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    penalty = config.repetition_penalty
    return GreedyPlan(stop_ids, penalty if penalty not in (None, 1.0) else None)


def decoder_for(setting: str, compile_enabled: bool, device: torch.device) -> str:
    """CAPTION_DECODER resolved: `auto` is `compiled` where COMPILE=true already trades
    exactness for speed (CUDA), else `eager`."""
    if setting != "auto":
        return setting
    return "compiled" if compile_enabled and device.type == "cuda" else "eager"


def install(pipeline, decoder: str) -> "Captioner | None":
    """Caption with a `Captioner` on this pipeline instance (None for `stock`: diffusers'
    own method). `QwenImageLayeredPipeline.__call__` calls `self.get_image_caption(
    prompt_image, use_en_prompt=..., device=...)`, so an instance attribute of that name
    takes its place with the same arguments and result, and the rest of the pipeline is
    untouched. A captioner already installed with the same decoder is kept (its graph
    with it)."""
    current = getattr(pipeline.__dict__.get("get_image_caption"), "__self__", None)
    if decoder == "stock":
        pipeline.__dict__.pop("get_image_caption", None)
        return None
    if isinstance(current, Captioner) and current.decoder == decoder:
        return current
    captioner = Captioner(pipeline, decoder)
    pipeline.get_image_caption = captioner.caption
    return captioner


class Captioner:
    """`get_image_caption` of one Layered pipeline, decoded by `decoder` (module doc)."""

    def __init__(self, pipeline, decoder: str = "eager", *, compiler: Callable | None = None):
        if decoder not in CAPTION_DECODERS[2:]:
            raise ValueError(f"decoder: {decoder!r} is not one of {', '.join(CAPTION_DECODERS[2:])}")
        self.pipeline = pipeline
        self.decoder = decoder
        # How the static step is compiled: inductor for `compiled` (CUDA only); tests pass another.
        self.compiler = compiler
        self.static: StaticDecoding | None = None

    def caption(self, prompt_image, use_en_prompt: bool = True, device=None) -> str:
        """What diffusers' `get_image_caption` returns for these arguments."""
        pipeline = self.pipeline
        inputs = caption_inputs(pipeline, prompt_image, use_en_prompt, device)
        new_tokens = self.generate(inputs)
        if new_tokens is None:
            return type(pipeline).get_image_caption(pipeline, prompt_image, use_en_prompt=use_en_prompt, device=device)
        text = pipeline.vl_processor.batch_decode([new_tokens], skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)[0]
        return text.strip()

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int] | None:
        """The new token ids `text_encoder.generate(**inputs, max_new_tokens=...)` would
        give (the end token included when it came), or None when the generation config is
        not greedy."""
        model = self.pipeline.text_encoder
        plan = greedy_plan(model.generation_config)
        if plan is None:
            log.info("captioning: the text encoder's generation config samples; diffusers' generate runs")
            return None
        logits, cache, positions = prefill(model, inputs)
        prompt_ids = inputs["input_ids"]
        static = self.static
        if static is not None and prompt_ids.shape[1] + max_new_tokens > static.context_tokens:
            log.warning("captioning: a %d-token prompt exceeds the static buffer (%d); decoding eagerly",
                        prompt_ids.shape[1], static.context_tokens)
            static = None
        if static is not None:
            return static.decode(logits, cache, positions, prompt_ids, max_new_tokens)
        return decode_eagerly(model, plan, logits, cache, positions, prompt_ids, max_new_tokens)

    def warm_up(self, device: torch.device) -> None:
        """For the static decoders: allocate the buffers, record the step's CUDA graph
        (compiling it first for `compiled`) and caption a small image through it, so no
        job pays for either. Only where the text encoder is resident on `device`."""
        model = self.pipeline.text_encoder
        if self.decoder == "eager":
            return
        plan = greedy_plan(model.generation_config)
        if plan is None or not resident_on(model, device):
            log.info("captioning: %s decoding needs a greedy config and the text encoder on %s; decoding eagerly",
                     self.decoder, device)
            return
        compiler = self.compiler
        if compiler is None and self.decoder == "compiled" and device.type == "cuda":
            compiler = _inductor
        self.static = StaticDecoding(model, plan, device, compiler=compiler)
        if device.type == "cuda":
            self.static.record_graph()
        from PIL import Image

        grey = Image.new("RGB", (WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE), (128, 128, 128))
        self.generate(caption_inputs(self.pipeline, grey, True, device), max_new_tokens=WARMUP_NEW_TOKENS)


def _inductor(step: Callable) -> Callable:
    # Default mode: the CUDA graph is recorded by StaticDecoding itself, so the compiled step
    # needs no cudagraph trees (whose graphs belong to the thread that recorded them; jobs
    # may run on another thread). One shape: no dynamic shapes.
    return torch.compile(step, fullgraph=True, dynamic=False)


def caption_inputs(pipeline, prompt_image, use_en_prompt: bool, device):
    """The text encoder's inputs, exactly as `get_image_caption` builds them."""
    prompt = pipeline.image_caption_prompt_en if use_en_prompt else pipeline.image_caption_prompt_cn
    return pipeline.vl_processor(text=prompt, images=prompt_image, padding=True, return_tensors="pt").to(device)


def resident_on(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model's weights all live on `device`: not streamed in by diffusers' group
    offloading (MEMORY_MODE text_offload, offload), whose hooks a graph would not replay."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return not _is_group_offload_enabled(model) and all(p.device.type == device.type for p in model.parameters())


def prefill(model, inputs) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """`generate`'s first forward, with its inputs: positions from the attention mask (text)
    and `get_rope_index` (the image's 3D rope positions), stacked as (4, batch, length);
    the attention mask as `generate` passes it (transformers then picks the same attention
    kernel); a dynamic cache; logits of the last position only. Returns those logits
    (float32), the cache and the positions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    others = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    text_positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    rope_positions, _ = model.model.get_rope_index(ids, attention_mask=mask, **others)
    positions = torch.cat([text_positions[None], rope_positions], dim=0)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1, **others)
    return out.logits[:, -1].float(), cache, positions


def penalized(scores: torch.Tensor, seen: torch.Tensor | None, penalty: float | None) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, elementwise: the same arithmetic on
    the scores of tokens already in the sequence (`seen`), so the same floats."""
    if penalty is None:
        return scores
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def seen_tokens(prompt_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(1, vocab) mask of the prompt's tokens (ids the logits cannot reach are left out, as
    transformers drops them)."""
    seen = torch.zeros((1, vocab_size), dtype=torch.bool, device=prompt_ids.device)
    ids = prompt_ids[0]
    return seen.index_fill_(1, ids[ids < vocab_size], True)


def decode_eagerly(model, plan: GreedyPlan, logits: torch.Tensor, cache: DynamicCache, positions: torch.Tensor,
                   prompt_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """generate's greedy loop: per token, the penalty, argmax, end test, and the forward of
    that token at the next position (all four position rows, as generate advances them)
    with the attention mask grown by one, as generate grows it."""
    seen = seen_tokens(prompt_ids, logits.shape[-1]) if plan.repetition_penalty else None
    position = positions[..., -1:]
    mask = torch.ones_like(prompt_ids)  # one unpadded prompt: the processor's mask
    tokens: list[int] = []
    while True:
        token = penalized(logits, seen, plan.repetition_penalty).argmax(-1)
        tokens.append(int(token))  # a host sync per token, as in generate
        if tokens[-1] in plan.stop_ids or len(tokens) == max_new_tokens:
            return tokens
        if seen is not None:
            seen.index_fill_(1, token, True)
        position = position + 1
        mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()


class StaticDecoding:
    """The decoding step over preallocated tensors, so that one CUDA graph can replay it:
    the static KV cache, the current token, its 3D rope position, the tokens so far, their
    count and (with a repetition penalty) the seen-token mask. Each step reads the token
    and writes the next one in place."""

    def __init__(self, model, plan: GreedyPlan, device: torch.device, *, compiler: Callable | None = None,
                 context_tokens: int = STATIC_CONTEXT_TOKENS, max_new_tokens: int = MAX_NEW_TOKENS):
        text = model.config.get_text_config(decoder=True)
        self.model, self.plan, self.context_tokens = model, plan, context_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=context_tokens)
        # Allocated now, at their final addresses (a recorded graph reads and writes them there).
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.cache.early_initialization(batch_size=1, num_heads=text.num_key_value_heads, head_dim=head_dim,
                                        dtype=model.dtype, device=device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        # Only the three rope rows: without the text row, attention masks come from the
        # cache alone (no packed-sequence test, which reads the device).
        self.position = torch.zeros((3, 1, 1), dtype=torch.long, device=device)
        self.tokens = torch.zeros(max_new_tokens, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.seen = (torch.zeros((1, text.vocab_size), dtype=torch.bool, device=device)
                     if plan.repetition_penalty else None)
        self.step = compiler(self._step) if compiler is not None else self._step
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        logits = self.model(input_ids=self.token, position_ids=self.position, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float()
        self._choose(logits)

    def _choose(self, logits: torch.Tensor) -> None:
        token = penalized(logits, self.seen, self.plan.repetition_penalty).argmax(-1)
        self.token.copy_(token.view(1, 1))
        self.tokens.index_copy_(0, self.count, token)
        self.count.add_(1)
        self.position.add_(1)
        if self.seen is not None:
            self.seen.index_fill_(1, token, True)

    def record_graph(self) -> None:
        """Record one step as a CUDA graph. The warm-up steps before it run on a side
        stream, as torch.cuda.graph requires; they scribble on the buffers, which every
        caption resets."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP_STEPS):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def begin(self, logits: torch.Tensor, prefilled: DynamicCache, positions: torch.Tensor,
              prompt_ids: torch.Tensor) -> None:
        """Load the prefill (its cache and positions) into the buffers and choose the first
        token from its logits."""
        self.cache.reset()
        for index, layer in enumerate(prefilled.layers):
            self.cache.update(layer.keys, layer.values, index)
        self.position.copy_(positions[1:, :, -1:])
        self.count.zero_()
        if self.seen is not None:
            self.seen.copy_(seen_tokens(prompt_ids, self.seen.shape[-1]))
        self._choose(logits)

    def advance(self) -> None:
        """One step: the current token's forward and the next token's choice."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def decode(self, logits: torch.Tensor, prefilled: DynamicCache, positions: torch.Tensor,
               prompt_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """The greedy tokens after the prefill (its logits, cache and positions), as
        `decode_eagerly` chooses them."""
        if max_new_tokens > self.tokens.numel():
            raise ValueError(f"max_new_tokens: {max_new_tokens} is more than the {self.tokens.numel()} allocated")
        self.begin(logits, prefilled, positions, prompt_ids)
        tokens: list[int] = []
        done = 1
        while True:
            for token in self.tokens[len(tokens):done].tolist():  # the one host sync of a stretch
                tokens.append(token)
                if token in self.plan.stop_ids:
                    return tokens
            if done == max_new_tokens:
                return tokens
            stretch = min(STOP_CHECK_EVERY, max_new_tokens - done)
            for _ in range(stretch):
                self.advance()
            done += stretch
