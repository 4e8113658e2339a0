"""Captioning alone on a GPU: the caption of an empty decompose prompt, by diffusers' own
`generate` and by each decoder of src/models/captioning.py, with the full-size Qwen2.5-VL 7B
text encoder built from the published config with random bf16 weights (tools/bench.py's
build). Random weights never end a caption, so every run makes the 512 tokens of the cap:
the issue's bound.

    python tools/caption_bench.py --label caption                    # every decoder
    python tools/caption_bench.py --decoders stock,graphed --label caption-graphed
    python tools/caption_bench.py --profile                          # also: where a stock step's time goes
    python tools/caption_bench.py --decoders none --agreement 160    # why `eager` leaves stock's tokens

The image is what Layered gives the caption call at `resolution=640`: a 1024x1024
picture resized to 640x640 (529 image tokens with the real processor's pixel bounds),
after the English caption instruction (with the tiny models' byte-level tokenizer the
instruction is about 1,030 tokens, 230 with the real one: the prompt here is longer).

Per decoder: new tokens, seconds for the whole caption (prefill included) and per token
(the issue's 107 ms), the prefill's seconds, ms per decoded token after it, the first-use
cost (graph recording, compile) and whether its tokens equal stock's (else the first
index where they differ: random weights make near-ties common, so this is a harsh test of
the static decoders' rounding). `stock_text_only` runs `generate` on the same prompt
with its image tokens replaced by text (no pixels): the text path at the same length.
Writes `<out>/<gpu>-<date>-<label>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.models import captioning  # noqa: E402
from src.models.files.snapshots import main_snapshot  # noqa: E402
from tools.bench import (PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS, TEXT_ENCODER_7B, VISION_7B,  # noqa: E402
                         photo_like, random_module, tiny_models)
from tools.bench_results import write_results  # noqa: E402

DECODERS = ("stock", "stock_text_only", "eager", "graphed", "compiled")
IMAGE_TOKEN = 151655
TEXT_STAND_IN = 1000  # an ordinary text token in place of each image token


def layered_with_random_text_encoder(tiny_hf_home: Path):
    """A QwenImageLayeredPipeline whose text encoder and processor are the full-size ones
    (random weights, the real pixel bounds); its tiny transformer and VAE are never run."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from src.models.vl_processor import load_processor

    snapshot = main_snapshot(tiny_hf_home, "Qwen/Qwen-Image-Layered")
    processor = load_processor(str(snapshot))
    processor.image_processor.min_pixels = PROCESSOR_MIN_PIXELS
    processor.image_processor.max_pixels = PROCESSOR_MAX_PIXELS
    processor.image_processor.size = {"shortest_edge": PROCESSOR_MIN_PIXELS, "longest_edge": PROCESSOR_MAX_PIXELS}
    config = Qwen2_5_VLConfig(text_config=TEXT_ENCODER_7B, vision_config=VISION_7B, image_token_id=IMAGE_TOKEN,
                              video_token_id=151656, vision_start_token_id=151652)
    return QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(snapshot / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(snapshot / "vae"),
        text_encoder=random_module(lambda: Qwen2_5_VLForConditionalGeneration(config)),
        tokenizer=processor.tokenizer, processor=processor,
        transformer=QwenImageTransformer2DModel.from_pretrained(snapshot / "transformer"),
    )


def timed(call) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = call()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def stock_tokens(model, inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=captioning.MAX_NEW_TOKENS)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def text_only(inputs) -> dict:
    ids = inputs["input_ids"].clone()
    ids[ids == IMAGE_TOKEN] = TEXT_STAND_IN
    return {"input_ids": ids, "attention_mask": inputs["attention_mask"]}


def first_difference(tokens: list[int], reference: list[int]) -> int | None:
    for index, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return index
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def measure(name: str, pipeline, inputs, prefill_s: float, reference: list[int] | None,
            repeats: int) -> tuple[dict, list | None]:
    model = pipeline.text_encoder
    first_use_s = 0.0
    if name == "stock":
        run = lambda: stock_tokens(model, inputs)  # noqa: E731
    elif name == "stock_text_only":
        plain = text_only(inputs)
        run = lambda: stock_tokens(model, plain)  # noqa: E731
    else:
        captioner = captioning.Captioner(pipeline, name)
        first_use_s, _ = timed(lambda: captioner.warm_up(model.device))
        if name != "eager" and captioner.static is None:
            return {"decoder": name, "error": "the static decoder was not prepared (see the log)"}, None
        run = lambda: captioner.generate(inputs)  # noqa: E731
    seconds = []
    for _ in range(repeats):
        elapsed, tokens = timed(run)
        seconds.append(elapsed)
    best = min(seconds)
    result = {"decoder": name, "tokens": len(tokens), "seconds": round(best, 3),
              "all_seconds": [round(s, 3) for s in seconds],
              "ms_per_token": round(best / len(tokens) * 1e3, 2),
              "decode_ms_per_token": round((best - prefill_s) / max(len(tokens) - 1, 1) * 1e3, 2),
              "first_use_s": round(first_use_s, 1)}
    if reference is not None and name != "stock_text_only":
        difference = first_difference(tokens, reference)
        result["same_tokens_as_stock"] = difference is None
        if difference is not None:
            result["first_difference_at"] = difference
    return result, tokens


def stock_with_logits(model, inputs, new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """`generate`'s tokens and the raw float32 logits it chose each one from."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [step[0] for step in out.logits]


def eager_teacher_forced(model, inputs, forced: list[int]) -> list[torch.Tensor]:
    """The eager decoder's logits at each step when it is fed `forced` (stock's tokens)
    instead of its own choices: captioning.prefill, then decode_eagerly's forward."""
    with torch.no_grad():
        logits, cache, positions = captioning.prefill(model, inputs)
        steps, position = [logits[0]], positions[..., -1:]
        mask = torch.ones_like(inputs["input_ids"])
        for token in forced[:-1]:
            position = position + 1
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            steps.append(model(input_ids=torch.tensor([[token]], device=model.device), attention_mask=mask,
                               position_ids=position, past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1].float())
    return steps


def compare_steps(steps: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Per step: bitwise equal or the largest difference; where the argmax differs, the
    reference's gap between its top two scores (a near-tie, or a real departure)."""
    differences = [float((a - b).abs().max()) for a, b in zip(steps, reference)]
    unequal = [index for index, difference in enumerate(differences) if difference > 0]
    flips = []
    for index, (a, b) in enumerate(zip(steps, reference)):
        if int(a.argmax()) != int(b.argmax()):
            top2 = b.topk(2).values
            flips.append({"step": index, "reference_top2_gap": round(float(top2[0] - top2[1]), 5),
                          "difference_there": round(differences[index], 5)})
    return {"steps": len(differences), "first_unequal_step": unequal[0] if unequal else None,
            "unequal_steps": len(unequal), "max_abs_difference": round(max(differences), 5),
            "median_abs_difference": round(sorted(differences)[len(differences) // 2], 5),
            "argmax_flip_count": len(flips), "argmax_flips": flips[:10]}


def static_teacher_forced(captioner, model, inputs, forced: list[int]) -> list[int]:
    """A static decoder's choice at each step when fed `forced` (stock's tokens): its graph
    (or compiled step) replayed over the same history as stock's."""
    static = captioner.static
    with torch.no_grad():
        logits, cache, positions = captioning.prefill(model, inputs)
        static.begin(logits, cache, positions, inputs["input_ids"])
        for token in forced[:-1]:
            static.token.fill_(token)
            static.advance()
    return static.tokens[:len(forced)].tolist()


def decoder_agreement(name: str, pipeline, inputs, tokens: list[int]) -> dict:
    """Against stock's tokens: the decoder's choices under stock's history (how many steps
    pick another token), and its own tokens, twice (where they leave stock's, and whether
    the decoder reproduces itself)."""
    model = pipeline.text_encoder
    captioner = captioning.Captioner(pipeline, name)
    captioner.warm_up(model.device)
    first = captioner.generate(inputs, len(tokens))
    second = captioner.generate(inputs, len(tokens))
    result = {"free_running_first_token_difference": first_difference(first, tokens),
              "reproduces_itself": first == second, "first_difference_from_itself": first_difference(second, first)}
    if captioner.static is not None:
        choices = static_teacher_forced(captioner, model, inputs, tokens)
        result["teacher_forced_argmax_flip_count"] = sum(a != b for a, b in zip(choices, tokens))
    return result


def prefill_activations(model, run) -> dict[str, torch.Tensor]:
    """The vision tower's output and each language layer's hidden states during `run`'s
    first forward over the whole prompt."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            if name not in captured and torch.is_tensor(tensor) and tensor.dim() >= 2 and tensor.shape[-2] > 1:
                captured[name] = tensor.detach().float().clone()
        return hook

    handles = [model.model.visual.register_forward_hook(keep("visual"))]
    handles += [layer.register_forward_hook(keep(f"layer{index}"))
                for index, layer in enumerate(model.model.language_model.layers)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def agreement(pipeline, inputs, new_tokens: int, decoders: list[str]) -> dict:
    """Why a decoder leaves stock's tokens on the GPU: does stock reproduce itself, where
    the eager decoder's logits first differ from stock's (teacher-forced on stock's
    tokens, so each step sees the same history), by how much, and whether the argmax
    flips only where stock's top two nearly tie; and where in the prefill (vision tower,
    which language layer) the first difference arises."""
    model = pipeline.text_encoder
    tokens, logits = stock_with_logits(model, inputs, new_tokens)
    again_tokens, again_logits = stock_with_logits(model, inputs, new_tokens)
    forced = eager_teacher_forced(model, inputs, tokens)
    stock_acts = prefill_activations(model, lambda: model.generate(**inputs, max_new_tokens=1))
    eager_acts = prefill_activations(model, lambda: captioning.prefill(model, inputs))
    layers = {name: round(float((stock_acts[name] - eager_acts[name]).abs().max()), 6)
              for name in stock_acts if name in eager_acts and stock_acts[name].shape == eager_acts[name].shape}
    return {"new_tokens": new_tokens,
            "stock_against_stock": {"first_token_difference": first_difference(again_tokens, tokens),
                                    **compare_steps(again_logits, logits)},
            "eager_teacher_forced_against_stock": compare_steps(forced, logits),
            "decoders": {name: decoder_agreement(name, pipeline, inputs, tokens) for name in decoders},
            "prefill_max_abs_difference_by_module": layers,
            "first_differing_prefill_module": next((name for name, value in layers.items() if value > 0), None)}


def profile_stock_steps(model, inputs, steps: int = 16) -> list[dict]:
    """The top operations (by CUDA and CPU time) of `steps` stock decoding steps."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4)  # warm
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(**inputs, max_new_tokens=steps)
    events = sorted(prof.key_averages(), key=lambda e: e.cpu_time_total, reverse=True)[:25]
    return [{"op": e.key, "calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 2),
             "cuda_ms": round(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3, 2)}
            for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoders", default=",".join(DECODERS), help=f"comma list of {', '.join(DECODERS)}")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="caption")
    parser.add_argument("--tiny-hf-home", default="/tmp/bench-hf", help="tiny models: tokenizer and configs only")
    parser.add_argument("--profile", action="store_true", help="also profile 16 stock decoding steps")
    parser.add_argument("--repeats", type=int, default=2, help="timed captions per decoder (the best is kept)")
    parser.add_argument("--agreement", type=int, default=0, metavar="TOKENS",
                        help="also compare eager's logits with stock's over this many tokens (see agreement)")
    parser.add_argument("--agreement-decoders", default="eager,graphed,compiled",
                        help="decoders whose tokens --agreement compares with stock's")
    args = parser.parse_args()

    hf_home = tiny_models(Path(args.tiny_hf_home))
    pipeline = layered_with_random_text_encoder(hf_home)
    model = pipeline.text_encoder
    device = model.device
    picture = pipeline.image_processor.resize(photo_like((1024, 1024), 0).convert("RGBA"), 640, 640)
    inputs = captioning.caption_inputs(pipeline, picture, True, device)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=8)  # first use of the kernels, not timed
        prefill_s, _ = timed(lambda: captioning.prefill(model, inputs))
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "label": args.label,
               "prompt_tokens": inputs["input_ids"].shape[1],
               "image_tokens": int((inputs["input_ids"] == IMAGE_TOKEN).sum()),
               "max_new_tokens": captioning.MAX_NEW_TOKENS, "prefill_s": round(prefill_s, 3), "decoders": []}
    print(json.dumps({k: v for k, v in results.items() if k != "decoders"}), flush=True)
    reference = None
    for name in filter(None, args.decoders.split(",")) if args.decoders != "none" else ():
        try:
            result, tokens = measure(name, pipeline, inputs, prefill_s, reference, args.repeats)
        except Exception as exc:  # one decoder failing (a capture this build refuses) must not hide the others
            result = {"decoder": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        else:
            if name == "stock":
                reference = tokens
        results["decoders"].append(result)
        print(json.dumps(result), flush=True)
        write_results(results, Path(args.out))
    if args.agreement:
        results["agreement"] = agreement(pipeline, inputs, args.agreement, args.agreement_decoders.split(","))
        print(json.dumps(results["agreement"]), flush=True)
        write_results(results, Path(args.out))
    if args.profile:
        results["stock_step_profile"] = {"multimodal": profile_stock_steps(model, inputs),
                                         "text_only": profile_stock_steps(model, text_only(inputs))}
        write_results(results, Path(args.out))

    print(f"\n{'decoder':<16} {'tokens':>6} {'s':>7} {'ms/token':>9} {'decode ms/token':>15} {'first use s':>11} same")
    for result in results["decoders"]:
        if "error" in result:
            print(f"{result['decoder']:<16} error: {result['error']}")
            continue
        print(f"{result['decoder']:<16} {result['tokens']:>6} {result['seconds']:>7.2f} {result['ms_per_token']:>9.2f} "
              f"{result['decode_ms_per_token']:>15.2f} {result['first_use_s']:>11.1f} "
              f"{result.get('same_tokens_as_stock', '')}")


if __name__ == "__main__":
    main()
