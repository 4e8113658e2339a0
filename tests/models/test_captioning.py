"""Captioning (src/models/captioning.py): every decoder gives the tokens diffusers' own
`get_image_caption` gets from `generate`, alone and through a whole decompose job.

The tiny text encoder is rigged to end every caption at once (tools/make_tiny_models.py);
`talkative` below undoes that, so captions run to the 512-token cap, in byte tokens the
tiny tokenizer decodes (a caption with text in it), and sharpens its attention so that
every token's rope position changes what comes next (with the random init attention is
nearly uniform: wrong positions went unnoticed)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from src.models import captioning
from src.models.files.snapshots import main_snapshot
from src.plumbing.config import ConfigError, Settings
from src.serving.startup import start_worker
from tests.conftest import image_from_b64, png_b64, same_pixels, sample_image

IM_END = 151645  # <|im_end|>, the caption's end
BYTE_TOKENS = 256  # the tiny tokenizer's byte-level tokens, ids 0..255
NEWLINE = 198  # b"\n": its embedding carries the rig's large value, which would swamp a prompt
# q and k scaled by this: attention sharp enough that the image's 3D positions and each new
# token's position decide the caption (checked: shifted or sequential positions change it).
ATTENTION_SHARPENING = 50.0
CPU = torch.device("cpu")
# Sampling configs that are greedy in effect, as Qwen's VL Instruct models publish them:
# from the top token only (Qwen2-VL), or at a temperature of 1e-6 (Qwen2.5-VL derivatives);
# both with a repetition penalty.
SAMPLED_TOP1 = dict(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)
SAMPLED_COLD = dict(do_sample=True, temperature=1e-6, repetition_penalty=1.05)


def talkative(text_encoder, seed: int = 0) -> None:
    """Logits for the byte tokens but the newline only (random rows of lm_head; every other
    token, the end included, gets 0 and never wins): captions run to the cap. Attention
    sharpened (ATTENTION_SHARPENING)."""
    with torch.no_grad():
        head = text_encoder.lm_head.weight
        head.zero_()
        head[:BYTE_TOKENS] = torch.randn(BYTE_TOKENS, head.shape[1], generator=torch.Generator().manual_seed(seed))
        head[NEWLINE] = 0
        for layer in text_encoder.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(ATTENTION_SHARPENING)
                if projection.bias is not None:
                    projection.bias.mul_(ATTENTION_SHARPENING)


def ending_at(text_encoder, token: int) -> None:
    """<|im_end|> scores 1% above `token`: the caption ends where `token` would first win."""
    with torch.no_grad():
        text_encoder.lm_head.weight[IM_END] = text_encoder.lm_head.weight[token] * 1.01


def image() -> Image.Image:
    picture = Image.new("RGB", (640, 480), (200, 30, 30))
    picture.paste((20, 200, 40), (100, 100, 400, 300))
    return picture


@pytest.fixture(scope="module")
def layered(hf_home):
    """The tiny Layered pipeline with its own (talkative) text encoder, loaded apart from any worker."""
    from diffusers import QwenImageLayeredPipeline

    from src.models.vl_processor import load_processor

    path = main_snapshot(hf_home, "Qwen/Qwen-Image-Layered")
    pipeline = QwenImageLayeredPipeline.from_pretrained(path, processor=load_processor(path), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    talkative(pipeline.text_encoder)
    return pipeline


@contextmanager
def generation_config(text_encoder, **settings):
    original = copy.deepcopy(text_encoder.generation_config)
    for key, value in settings.items():
        setattr(text_encoder.generation_config, key, value)
    try:
        yield
    finally:
        text_encoder.generation_config = original


def diffusers_tokens(pipeline, inputs, max_new_tokens: int = captioning.MAX_NEW_TOKENS) -> list[int]:
    """The new tokens of `get_image_caption`'s own call: generate(**inputs, max_new_tokens=512)."""
    with torch.no_grad():
        out = pipeline.text_encoder.generate(**inputs, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def diffusers_caption(pipeline, picture) -> str:
    return type(pipeline).get_image_caption(pipeline, picture, use_en_prompt=True, device=CPU)


def captioner(pipeline, decoder: str, **options) -> captioning.Captioner:
    made = captioning.Captioner(pipeline, decoder, **options)
    made.warm_up(CPU)
    assert (made.static is not None) == (decoder != "eager")
    return made


def test_greedy_plan_follows_the_generation_config():
    from transformers import GenerationConfig

    plan = captioning.greedy_plan(GenerationConfig(eos_token_id=[IM_END, 151643]))
    assert plan == captioning.GreedyPlan((IM_END, 151643), None)
    assert captioning.greedy_plan(GenerationConfig(eos_token_id=IM_END, **SAMPLED_TOP1)) == \
        captioning.GreedyPlan((IM_END,), 1.05)
    assert captioning.greedy_plan(GenerationConfig(**SAMPLED_COLD)) == captioning.GreedyPlan((), 1.05)
    # Sampling from more than one token, or a processor not reproduced: diffusers' generate runs.
    assert captioning.greedy_plan(GenerationConfig(do_sample=True, top_k=50)) is None
    assert captioning.greedy_plan(GenerationConfig(do_sample=True, temperature=0.1)) is None
    assert captioning.greedy_plan(GenerationConfig(no_repeat_ngram_size=3)) is None
    assert captioning.greedy_plan(GenerationConfig(num_beams=2)) is None


# Shorter than the cap where only the tokens are compared: 2 CPU cores run these.
SHORT = 48


@pytest.mark.parametrize("settings", [{}, SAMPLED_TOP1, SAMPLED_COLD], ids=["greedy", "top1", "cold"])
@pytest.mark.parametrize("decoder", ["eager", "graphed"])
def test_the_same_tokens_as_generate(layered, decoder, settings):
    inputs = captioning.caption_inputs(layered, image(), True, CPU)
    with generation_config(layered.text_encoder, **settings):
        torch.manual_seed(0)  # the stock path samples (from one token, or at 1e-6)
        expected = diffusers_tokens(layered, inputs, SHORT)
        assert captioner(layered, decoder).generate(inputs, SHORT) == expected
    assert len(expected) == SHORT and IM_END not in expected


def test_positions_off_by_one_would_change_the_tokens(layered):
    """The comparisons here can fail: decoding from the right prefill at positions one off
    gives other tokens."""
    inputs = captioning.caption_inputs(layered, image(), True, CPU)
    model = layered.text_encoder
    with torch.no_grad():
        logits, cache, positions = captioning.prefill(model, inputs)
        shifted = captioning.decode_eagerly(model, captioning.greedy_plan(model.generation_config), logits, cache,
                                            positions + 1, inputs["input_ids"], SHORT)
    assert shifted != diffusers_tokens(layered, inputs, SHORT)


@pytest.mark.parametrize("decoder", ["eager", "graphed"])
def test_the_same_caption_as_get_image_caption_up_to_the_cap(layered, decoder):
    picture = image()
    ours = captioner(layered, decoder)
    assert len(ours.generate(captioning.caption_inputs(layered, picture, True, CPU))) == captioning.MAX_NEW_TOKENS
    caption = ours.caption(picture, use_en_prompt=True, device=CPU)
    assert caption == diffusers_caption(layered, picture)
    assert len(caption) > 100  # bytes the tiny tokenizer decodes


@pytest.mark.parametrize("decoder", ["eager", "graphed"])
def test_a_caption_ends_where_generate_ends_it(layered, decoder):
    inputs = captioning.caption_inputs(layered, image(), True, CPU)
    encoder = layered.text_encoder
    original = encoder.lm_head.weight[IM_END].clone()
    try:
        ending_at(encoder, diffusers_tokens(layered, inputs, 16)[10])
        expected = diffusers_tokens(layered, inputs)
        assert expected[-1] == IM_END and len(expected) <= 11
        # Also ends inside a stretch of graphed steps (the end is looked for every 8 tokens).
        assert captioner(layered, decoder).generate(inputs) == expected
    finally:
        with torch.no_grad():
            encoder.lm_head.weight[IM_END] = original


def test_the_compiled_step_traces_as_one_graph_and_gives_the_same_tokens(layered):
    """`compiled` runs inductor on CUDA only; here dynamo traces the step whole (fullgraph:
    no break, so nothing in it reads the device) and runs it eagerly."""
    torch._dynamo.reset()
    inputs = captioning.caption_inputs(layered, image(), True, CPU)
    traced = captioner(layered, "compiled", compiler=lambda step: torch.compile(step, backend="eager", fullgraph=True))
    assert traced.generate(inputs, 16) == diffusers_tokens(layered, inputs, 16)


def test_the_static_step_reads_nothing_back_from_the_device(layered):
    """A CUDA graph cannot record a step that syncs or copies a host tensor in: on the meta
    device (no data) such a step fails, this one runs."""
    meta = copy.deepcopy(layered.text_encoder).to("meta")
    static = captioning.StaticDecoding(meta, captioning.GreedyPlan((IM_END,), 1.05), torch.device("meta"))
    with torch.no_grad():
        for _ in range(3):
            static.step()


def test_a_sampling_config_is_captioned_by_diffusers(layered):
    picture = image()
    with generation_config(layered.text_encoder, do_sample=True, top_k=50):
        ours = captioning.Captioner(layered, "eager")
        assert ours.generate(captioning.caption_inputs(layered, picture, True, CPU)) is None
        torch.manual_seed(3)
        caption = ours.caption(picture, use_en_prompt=True, device=CPU)
        torch.manual_seed(3)
        assert caption == diffusers_caption(layered, picture)


def test_the_decoder_setting(worker_env):
    cuda = torch.device("cuda")
    assert captioning.decoder_for("auto", True, cuda) == "compiled"
    assert captioning.decoder_for("auto", False, cuda) == "eager"
    assert captioning.decoder_for("auto", True, CPU) == "eager"  # compile is CUDA only
    assert captioning.decoder_for("graphed", False, CPU) == "graphed"
    assert Settings.from_env({**worker_env, "CAPTION_DECODER": "Graphed"}).caption_decoder == "graphed"
    with pytest.raises(ConfigError,
                       match="CAPTION_DECODER: 'fast' is not allowed; allowed: auto, stock, eager, graphed, compiled"):
        Settings.from_env({**worker_env, "CAPTION_DECODER": "fast"})


def test_stock_captioning_is_diffusers_own(layered):
    assert captioning.install(layered, "graphed") is not None and "get_image_caption" in layered.__dict__
    assert captioning.install(layered, "stock") is None
    assert "get_image_caption" not in layered.__dict__  # the class's method: diffusers' own


# ---------------------------------------------------------------------------------------
# Through the worker


@pytest.fixture(scope="module", params=["resident", "text_offload"])
def caption_worker(request, worker_env):
    """A worker with Layered preloaded and CAPTION_DECODER=graphed, its text encoder made talkative."""
    worker = start_worker(Settings.from_env({**worker_env, "PRELOAD": "edit,layered", "CAPTION_DECODER": "graphed",
                                             "MEMORY_MODE": request.param}))
    talkative(worker.host.layered().text_encoder)
    return worker


@contextmanager
def prompts_encoded(pipeline):
    """The prompts the pipeline encodes (the caption first, then the negative prompt)."""
    prompts: list[str] = []
    encode = pipeline.encode_prompt

    def recording(*args, **kwargs):
        prompts.append(kwargs["prompt"])
        return encode(*args, **kwargs)

    pipeline.encode_prompt = recording
    try:
        yield prompts
    finally:
        del pipeline.encode_prompt


@contextmanager
def diffusers_captioning(pipeline):
    ours = pipeline.__dict__.pop("get_image_caption")
    try:
        yield
    finally:
        pipeline.get_image_caption = ours


def test_a_decompose_job_with_an_empty_prompt_equals_the_pipeline_called_directly(caption_worker):
    pipeline = caption_worker.host.layered()
    installed = pipeline.get_image_caption.__self__
    assert installed.decoder == "graphed"
    # A streamed text encoder decodes eagerly (a graph would skip the streaming hooks).
    assert (installed.static is not None) == (caption_worker.host.memory_mode == "resident")
    source = sample_image()
    with prompts_encoded(pipeline) as ours:
        out = caption_worker.handle({"id": "caption", "input": {
            "operation": "decompose", "image_base64": png_b64(source), "prompt": "", "layers": 2,
            "num_inference_steps": 2, "seed": 4, "return_base64": True}})
    assert "error" not in out, out
    with prompts_encoded(pipeline) as theirs, diffusers_captioning(pipeline):
        direct = pipeline(image=source.convert("RGBA"), prompt="", negative_prompt=" ", true_cfg_scale=4.0,
                          guidance_scale=1.0, layers=2, resolution=640, num_inference_steps=2, cfg_normalize=True,
                          use_en_prompt=True, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert ours[0] == theirs[0] and len(ours[0]) > 100
    assert all(same_pixels(image_from_b64(entry["base64"]), layer) for entry, layer in zip(out["layers"], direct))


def test_layered_loaded_by_a_job_captions_with_the_configured_decoder(worker_env):
    """Not only a preloaded Layered: the one a decompose job loads gets CAPTION_DECODER too
    (`auto` on the CPU: eager)."""
    worker = start_worker(Settings.from_env({**worker_env, "WARMUP": "false"}))
    assert not worker.host.layered_loaded and worker.host.captioner is None
    pipeline = worker.host.for_operation("decompose")  # what a decompose job does first
    assert pipeline.get_image_caption.__self__ is worker.host.captioner
    assert worker.host.captioner.decoder == "eager"
