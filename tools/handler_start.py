"""One worker start through handler.py, timed by stage, for tools/start_bench.py --from-disk.

    START_BENCH_T0=<time> HF_HOME=/tmp/hf-disk python tools/handler_start.py --out start.json

Runs `handler.main()` as RunPod runs it (the settings from the environment, the imports,
start_worker: the weights read from HF_HOME, prepared, warmed up, the LoRAs prepared) and
stops where it would start serving: runpod.serverless.start is replaced, once main() has
imported the SDK, by a function that notes the time (ready) and returns (where the runpod
package is missing, as on the GPU machine, a stand-in module gives main() the two names it uses). Nothing else is replaced; the timings come from
wrappers that call through, put in place as main() imports the modules (an import hook), so
this probe imports nothing heavy before main() does:

- `read`: the wall-clock span in which weight files were being read: the read-ahead
  (WEIGHTS_PREFETCH, read_ahead.prefetch on its thread; handler.py begins it before the
  imports, src/models/files/early_read.py) and the FP8 cache's loads (fp8_cache.load_transformer),
  their intervals joined. It overlaps `imports` (the early read) and `load` (building and
  moving the models); `read_began_s` and `torch_import_began_s` say where it began.
- `quantize_move`: seconds inside ModelHost.prepare (FP8 quantization, placement on the
  GPU), also part of `load`.
- the worker's own `startup_s` (load, warmup, loras, ...) as it logs them, and `imports`:
  from the process's start (START_BENCH_T0, set by the parent) to start_worker.
- bytes this process read from disk (/proc/self/io read_bytes, all threads) before the load
  (the early read), during it and after it (the LoRA preparation reads the published weights under FP8).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def disk_read_bytes() -> int:
    """Bytes this process has had read from storage (page-cache hits do not count); -1 where unknown."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def joined_length(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of `intervals`."""
    total, end = 0.0, float("-inf")
    for begin, finish in sorted(intervals):
        if finish <= end:
            continue
        total += finish - max(begin, end)
        end = finish
    return total


class ImportWatch(importlib.abc.MetaPathFinder):
    """Calls `on_import(name)` as module `name` begins importing (before its code runs) and
    `after_import(name)` once it has."""

    def __init__(self, names: tuple[str, ...], on_import, after_import):
        self.names, self.on_import, self.after_import = set(names), on_import, after_import

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        self.on_import(fullname)
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.after_import(fullname)

        spec.loader.exec_module = exec_module
        return spec


class StartProbe:
    """The wrappers' records of one start."""

    def __init__(self):
        self.t0 = float(os.environ.get("START_BENCH_T0", time.time()))
        self.reads: list[tuple[float, float]] = []  # wall-clock intervals of weight reading
        self.read_reports: list[dict] = []
        self.prepare_s = 0.0
        self.worker_start_at: float | None = None
        self.load_span: tuple[float, float] | None = None
        self.io: dict[str, int] = {}
        self.torch_import_at: float | None = None
        self.worker = None
        self.ready_at: float | None = None
        self.sdk = "runpod"

    def install(self) -> None:
        if importlib.util.find_spec("runpod") is None:  # the GPU machine has no RunPod SDK:
            # a stand-in for the two names main() uses
            stand_in = sys.modules["runpod"] = types.ModuleType("runpod")
            stand_in.RunPodLogger = type("RunPodLogger", (), {"set_level": lambda self, level: None})
            stand_in.serverless = types.SimpleNamespace(start=self.ready)
            self.sdk = "stand-in: the runpod package is not installed (its import time is not in `imports`)"

        from src.models.files import read_ahead# no torch: handler.py reads ahead before importing it

        probe = self
        prefetch = read_ahead.prefetch
        self.io["start"] = disk_read_bytes()

        def timed_prefetch(files):
            begin = time.time()
            report = prefetch(files)
            probe.reads.append((begin, time.time()))
            probe.read_reports.append({"how": "read-ahead", **report})
            return report

        def noted(name):
            if name == "torch":
                probe.torch_import_at = time.time()

        def imported(name):
            if name == "src.serving.startup":
                self.install_load()
            elif name == "runpod":
                sys.modules["runpod"].serverless.start = self.ready

        read_ahead.prefetch = timed_prefetch
        sys.meta_path.insert(0, ImportWatch(("torch", "runpod", "src.serving.startup"), noted, imported))

    def ready(self, config) -> None:
        """Stands in for runpod.serverless.start: where handler.py would start serving."""
        self.ready_at = time.time()
        self.io["ready"] = disk_read_bytes()

    def install_load(self) -> None:
        """The wrappers of the load, once handler.main() has imported the worker."""
        from src.models.fp8 import cache as fp8_cache
        from src.models.host import ModelHost
        from src.serving import startup

        probe = self
        load_transformer = fp8_cache.load_transformer
        prepare, load = ModelHost.prepare, ModelHost.load
        start = startup.start_worker

        def timed_cache_load(*args, **kwargs):
            begin = time.time()
            model, report = load_transformer(*args, **kwargs)
            probe.reads.append((begin, time.time()))
            probe.read_reports.append({"how": "fp8 cache", "bytes": report.bytes_read,
                                       "seconds": round(report.seconds, 2)})
            return model, report

        def timed_prepare(self, *args, **kwargs):
            begin = time.perf_counter()
            try:
                return prepare(self, *args, **kwargs)
            finally:
                probe.prepare_s += time.perf_counter() - begin

        def timed_load(self):
            probe.io["before_load"] = disk_read_bytes()
            begin = time.time()
            try:
                return load(self)
            finally:
                probe.load_span = (begin, time.time())
                probe.io["after_load"] = disk_read_bytes()

        def noted_start(settings, *args, **kwargs):
            probe.worker_start_at = time.time()
            probe.worker = start(settings, *args, **kwargs)
            return probe.worker

        fp8_cache.load_transformer = timed_cache_load
        ModelHost.prepare, ModelHost.load = timed_prepare, timed_load
        startup.start_worker = noted_start

    def result(self) -> dict:
        worker = self.worker
        startup = {key: round(value, 1) for key, value in worker.startup_s.items()}
        names = {"load": "load", "warmup": "compile_and_warm_up", "loras": "lora_preparation",
                 "compile_cache_save": "compile_cache_save"}
        stages = {"imports": round(self.worker_start_at - self.t0, 1),
                  "read": round(joined_length(self.reads), 3) if self.reads else None,  # tiny layouts: ms
                  "quantize_move": round(self.prepare_s, 1)}
        stages.update({names.get(key, key): value for key, value in startup.items()})
        gb = {"before_load": (self.io["before_load"] - self.io["start"]) / 1e9,
              "load": (self.io["after_load"] - self.io["before_load"]) / 1e9,
              "after_load": (self.io["ready"] - self.io["after_load"]) / 1e9}
        read_bytes = sum(report.get("bytes", 0) for report in self.read_reports if not report.get("skipped"))
        import torch

        from src.models.host import device_name

        host = worker.host
        return {"gpu": device_name(host.device), "torch": torch.__version__,
                "ready_s": round(self.ready_at - self.t0, 1), "stages_s": stages,
                "read_began_s": round(min(self.reads)[0] - self.t0, 2) if self.reads else None,
                "torch_import_began_s": round(self.torch_import_at - self.t0, 2) if self.torch_import_at else None,
                "disk_read_gb": {key: round(value, 2) for key, value in gb.items()},
                "weights_read": {"bytes": read_bytes, "reports": self.read_reports,
                                 "gb_per_s": round(read_bytes / 1e9 / joined_length(self.reads), 2)
                                 if self.reads else None},
                "compile_cache": worker.compile_cache_state,
                "warm_passes": [span.as_dict() for span in worker.compile_meter.spans],
                "memory_mode": host.memory_mode,
                "swap_transformers": host.swap_transformers, "preload": sorted(worker.settings.preload),
                "fp8_loads": host.fp8_loads, "runpod_sdk": self.sdk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    probe = StartProbe()
    probe.install()
    import handler

    handler.main()
    args.out.write_text(json.dumps(probe.result(), indent=2))


if __name__ == "__main__":
    main()
