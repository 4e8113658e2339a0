"""The start's compile figures (src/models/compile_meter.py): a span that compiles counts
its graphs and compile seconds, a span that runs what is compiled already counts none."""

from __future__ import annotations

import torch

from src.models.compile_meter import CompileMeter


def test_a_span_counts_what_compiled_in_it_and_a_rerun_counts_nothing():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="eager", dynamic=True)
    meter = CompileMeter()
    with meter.span("first"):
        compiled(torch.ones(3))
    with meter.span("again, another size"):
        compiled(torch.ones(5))
    first, again = meter.spans
    assert first.name == "first" and first.graphs == 1 and first.seconds > 0
    assert sum(first.phases_s.values()) > 0
    assert again.graphs == 0 and again.phases_s == {}
    assert again.as_dict()["graphs"] == 0
