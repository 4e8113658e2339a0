"""Regional compile (src/models/acceleration.py): all the blocks of a pass run one compiled
graph, and the compiled pass returns the pipeline's own image. Dynamo runs here as on the
GPU; the `eager` backend stands in for Inductor, which the CPU suite does not exercise."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel
from PIL import Image

from src.models.acceleration import regional_compile
from src.models.compile_meter import CompileMeter
from src.models.files.snapshots import main_snapshot
from tests.conftest import direct_edit, reference_edit_pipeline, same_pixels

EDIT_REPO = "Qwen/Qwen-Image-Edit-2511"


def _pipeline(hf_home, blocks: int):
    """The tiny edit pipeline with a transformer of `blocks` blocks (the tiny model has one;
    what this is about only shows from the second block on)."""
    snapshot = main_snapshot(hf_home, EDIT_REPO)
    pipeline = reference_edit_pipeline(snapshot)
    config = dict(QwenImageTransformer2DModel.load_config(snapshot / "transformer"), num_layers=blocks)
    torch.manual_seed(0)
    pipeline.transformer = QwenImageTransformer2DModel.from_config(config).eval()
    return pipeline


def _edit(pipeline) -> Image.Image:
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    return direct_edit(pipeline, [grey], "test", seed=0, num_inference_steps=2, width=64, height=64)


def _compiled_edit(pipeline, fresh_inputs: bool) -> tuple[Image.Image, int]:
    """The edit with the blocks compiled as the worker compiles them (or, without fresh inputs,
    by diffusers' regional compile alone); and the graphs compiled."""
    torch._dynamo.reset()
    if fresh_inputs:
        regional_compile(pipeline.transformer, backend="eager")
    else:
        pipeline.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
    meter = CompileMeter()
    with meter.span("edit"):
        image = _edit(pipeline)
    return image, meter.spans[0].graphs


def test_every_block_runs_one_graph_and_the_image_is_the_pipelines(hf_home):
    stock = _edit(_pipeline(hf_home, blocks=3))

    image, graphs = _compiled_edit(_pipeline(hf_home, blocks=3), fresh_inputs=True)

    assert graphs == 1
    assert same_pixels(image, stock)


def test_without_fresh_inputs_the_first_block_compiles_a_graph_of_its_own(hf_home):
    """Why `regional_compile` detaches: block 0's inputs are views, the others' are not."""
    _, graphs = _compiled_edit(_pipeline(hf_home, blocks=3), fresh_inputs=False)

    assert graphs == 2


def test_the_first_compile_traces_its_block_once(hf_home):
    """Floats taken as constants: otherwise the norms' eps turn symbolic, fail to become
    tensors in AOTAutograd, and Dynamo traces the block again (`compile_attempt_1`), at
    every worker's first compile. `aot_eager` runs that AOTAutograd pass, `eager` does not."""
    stock = _edit(_pipeline(hf_home, blocks=3))
    pipeline = _pipeline(hf_home, blocks=3)
    torch._dynamo.reset()
    regional_compile(pipeline.transformer, backend="aot_eager")
    meter = CompileMeter()

    with meter.span("edit"):
        image = _edit(pipeline)

    span = meter.spans[0]
    assert (span.graphs, "compile_attempt_0" in span.phases_s, "compile_attempt_1" in span.phases_s) == (1, True, False)
    assert same_pixels(image, stock)


def test_accelerate_compiles_every_block_the_worker_s_way(hf_home):
    """`accelerate`'s CUDA branch, run on the CPU: nothing in it touches the device until the
    first forward, so it is checked here that it compiles every block with the inputs detached."""
    from src.models.acceleration import accelerate

    transformer = _pipeline(hf_home, blocks=3).transformer
    accelerate(transformer, torch.device("cuda"), attention="sdpa", compile_blocks=True)
    accelerate(transformer, torch.device("cuda"), attention="sdpa", compile_blocks=True)  # a second time

    assert all(block._compiled_call_impl is not None for block in transformer.transformer_blocks)
    assert [len(transformer.img_in._forward_hooks), len(transformer.txt_in._forward_hooks)] == [1, 1]
