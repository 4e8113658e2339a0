"""What torch.compile did during one span of the start (a warm-up pass): how many graphs
Dynamo compiled and the seconds of each compile phase, read from torch's own process-wide
records (`torch._dynamo.utils.compilation_time_metrics`, `counters`) before and after.

The start logs each warm pass with these figures, and tools/bench.py writes them, so a
start's compile time is measured where it is spent: a pass that compiles nothing needs
no place in the start, and one that compiles with a warm compile cache shows what the
cache does not save (Dynamo's tracing). Reading the records changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def _metrics() -> tuple[dict[str, float], int]:
    """(seconds per timed compile phase, graphs compiled) so far in this process; nothing
    where Dynamo was never imported (no compile yet)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}, 0
    seconds = {key: sum(values) for key, values in utils.compilation_time_metrics.items()}
    return seconds, int(utils.counters["stats"]["unique_graphs"])


@dataclass
class CompileSpan:
    """One span: wall seconds, graphs compiled in it and the compile phases' seconds."""

    name: str
    seconds: float = 0.0
    graphs: int = 0
    phases_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 2), "graphs": self.graphs,
                "phases_s": {key: round(value, 2) for key, value in sorted(self.phases_s.items())}}


class CompileMeter:
    """`with meter.span("edit"):` records one CompileSpan into `meter.spans`."""

    # The phases worth reading in a log line (torch's names; others stay in `phases_s`).
    MAIN_PHASES = ("_compile.compile_inner", "compile_fx_inner", "async_compile.wait")

    def __init__(self):
        self.spans: list[CompileSpan] = []

    def span(self, name: str) -> "_Span":
        return _Span(self, name)


class _Span:
    def __init__(self, meter: CompileMeter, name: str):
        self.meter, self.record = meter, CompileSpan(name)

    def __enter__(self) -> CompileSpan:
        self._seconds, self._graphs = _metrics()
        self._start = time.perf_counter()
        return self.record

    def __exit__(self, *exc) -> None:
        self.record.seconds = time.perf_counter() - self._start
        seconds, graphs = _metrics()
        self.record.graphs = graphs - self._graphs
        self.record.phases_s = {key: value - self._seconds.get(key, 0.0) for key, value in seconds.items()
                                if value - self._seconds.get(key, 0.0) > 0.0}
        self.meter.spans.append(self.record)
