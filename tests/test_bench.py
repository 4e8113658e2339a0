"""tools/bench.py's stage clock (`--breakdown`) on the tiny models: the models it times keep
their signatures, so every captioning decoder runs under it, diffusers' own `generate` too."""

from __future__ import annotations

import inspect

from src.plumbing.config import Settings
from src.serving.worker import Worker
from tests.conftest import png_b64, sample_image
from tools.bench import StageClock


def test_the_stage_clock_keeps_the_text_encoders_signature_for_stock_captioning(worker_env):
    worker = Worker.start(Settings.from_env({**worker_env, "PRELOAD": "edit,layered", "CAPTION_DECODER": "stock"}))
    pipeline = worker.pipes.layered()
    unwrapped = inspect.signature(pipeline.text_encoder.forward)
    clock = StageClock()
    clock.attach(pipeline)
    assert inspect.signature(pipeline.text_encoder.forward) == unwrapped
    assert "pixel_values" in inspect.signature(pipeline.text_encoder.forward).parameters
    job = {"operation": "decompose", "image_base64": png_b64(sample_image()), "prompt": "", "layers": 2,
           "num_inference_steps": 2, "seed": 3, "return_base64": True}
    out = worker.handle({"id": "breakdown", "input": job})
    assert "error" not in out, out  # was: ValueError: The following model_kwargs are not used by the model
    report = clock.report(out["timings_ms"]["inference"] / 1000)
    assert report["text_encoder"] > 0 and report["transformer"] > 0 and report["vae_decode"] > 0
