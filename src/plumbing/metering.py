"""Per-stage timings and the cost of a job, computed from what was actually done."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PRICES_FILE = Path(__file__).with_name("gpu_prices.json")
SECONDS_PER_HOUR = 3600


class StageTimer:
    """Wall time of named stages, in milliseconds; a repeated stage adds up."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def report(self) -> dict[str, float]:
        stages = {name: round(value, 1) for name, value in self.ms.items()}
        stages["total"] = round(self.elapsed_s() * 1000, 1)
        return stages


@dataclass(frozen=True)
class Price:
    gpu: str
    usd_per_hour: float
    source: str

    def cost(self, seconds: float) -> dict:
        usd = seconds * self.usd_per_hour / SECONDS_PER_HOUR
        return {"gpu": self.gpu, "usd_per_hour": self.usd_per_hour, "seconds": round(seconds, 3),
                "usd": round(usd, 6), "price_source": self.source}


def price_for(gpu_name: str, override_per_hour: float | None, prices_file: Path = PRICES_FILE) -> Price:
    """The hourly price of this GPU: GPU_PRICE_PER_HOUR if set, else RunPod's published
    serverless price for the device name, else 0 (unknown GPU, or the CPU)."""
    if override_per_hour is not None:
        return Price(gpu_name, override_per_hour, "GPU_PRICE_PER_HOUR")
    table = json.loads(prices_file.read_text())
    entry = table["gpus"].get(gpu_name)
    if entry is None:
        return Price(gpu_name, 0.0, "unknown: set GPU_PRICE_PER_HOUR")
    return Price(gpu_name, float(entry["usd_per_hour"]), f"{table['source']} ({table['retrieved']})")
