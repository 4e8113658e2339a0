"""Per-card-class tables for docs/performance.md ("Per card class"), from bench/results and the
worker's price table (src/plumbing/gpu_prices.json).

    python tools/card_tables.py        # prints the markdown tables

Measured: job totals (`timings_ms.total`) on the H200, or on an H100 80GB where a row says so,
with its memory capped as the class's card would have it (`tools/bench.py --gpu-memory-gib`); the start is `build_s + warmup_s +
loras_prepare_s` (random weights built in memory, so no read, and no imports). Estimated, and labelled
so wherever printed: the time on another card, the measured time scaled by the datasheets' dense
bf16 TFLOP/s (989 for both the H200 and the H100 SXM, against the card's), a switch's host-to-device copy rescaled by the host link,
and in `offload` (the transformer streamed each pass) never faster than the transformer's bytes
over the link for each pass. Cost: those seconds times the card's flex per-second price.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
H100 = "nvidia-h100-80gb-hbm3"  # the results files of the H100 80GB runs
PRICES = ROOT / "src" / "plumbing" / "gpu_prices.json"

H200_BF16_TFLOPS = 989.0  # NVIDIA's H100/H200 SXM datasheets, dense (1,979 with sparsity)
H200_LINK_GB_S = 46.4  # measured: the bf16 switch, 40.9 GB in 0.881 s (swap-pinned-79)
PCIE4_GB_S = 25.0  # PCIe 4 x16 is 32 GB/s each way on paper; page-locked copies reach about 25
TRANSFORMER_GB = {"bf16": 40.9, "fp8": 29.5}  # the edit transformer's bytes (FP8: the default recipe)


@dataclass(frozen=True)
class Card:
    """One card of a class: its key in gpu_prices.json and the datasheet facts the estimate uses."""
    key: str
    short: str
    bf16_tflops: float  # dense bf16 tensor TFLOP/s (datasheet)
    fp8: bool  # FP8 tensor cores (compute capability 8.9+); without them QUANTIZE=fp8 fails the start
    link_gb_s: float  # practical page-locked host-to-device rate


CLASSES = {
    "80 GB": (79, (Card("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0, True, H200_LINK_GB_S),
                   Card("NVIDIA A100 80GB PCIe", "A100", 312.0, False, PCIE4_GB_S))),
    "48 GB": (44, (Card("NVIDIA L40S", "L40S", 362.0, True, PCIE4_GB_S),
                   Card("NVIDIA A40", "A6000/A40", 150.0, False, PCIE4_GB_S))),
    "24 GB": (22, (Card("NVIDIA GeForce RTX 4090", "RTX 4090", 165.0, True, PCIE4_GB_S),
                   Card("NVIDIA L4", "L4", 121.0, True, PCIE4_GB_S))),
}


@dataclass(frozen=True)
class Row:
    """One table row: a job (or the start) from one results file. `cases` are (index, name) pairs
    whose job totals add up (the alternating pair is two jobs); none means the file's start."""
    card_class: str
    setting: str  # "bf16" or "fp8"
    job: str
    file: str  # the date and label part of bench/results/<gpu>-<file>.json
    cases: tuple[tuple[int, str], ...] = ()
    note: str = ""
    gpu: str = "nvidia-h200"  # the results file's prefix: the card it was measured on

    @property
    def stem(self) -> str:
        return f"{self.gpu}-{self.file}"

    @property
    def measured_on(self) -> str:
        return "H100" if self.gpu.startswith("nvidia-h100") else "H200"


def load(row: Row) -> dict:
    return json.loads((RESULTS / f"{row.stem}.json").read_text())


class Refused(Exception):
    """The worker refused the row's job (its error is the message)."""


def measured_cases(row: Row) -> list[dict]:
    """The row's cases from its file, each checked to be the case named; Refused where one did not run."""
    cases = load(row)["cases"]
    picked = []
    for index, name in row.cases:
        case = cases[index]
        if case["case"] != name:
            raise ValueError(f"{row.stem} case {index} is {case['case']}; the row wants {name}")
        if "error" in case:
            raise Refused(case["error"])
        picked.append(case)
    return picked


def estimate_case(case: dict, card: Card, precision: str, streamed: bool) -> float:
    """Seconds this job would take on `card`: the measured time without the switch scaled by bf16
    TFLOP/s, the switch's bytes over the card's link; streamed, at least the transformer's bytes
    over the link per pass. An estimate, never a measurement."""
    timings = {key: value / 1000 for key, value in case["timings_ms"].items()}
    switch = timings.get("load", 0.0)
    compute = (timings["total"] - switch) * H200_BF16_TFLOPS / card.bf16_tflops
    if streamed:
        compute = max(compute, case["passes"] * TRANSFORMER_GB[precision] / card.link_gb_s)
    return compute + switch * H200_LINK_GB_S / card.link_gb_s


def seconds(row: Row) -> float:
    """The measured seconds of a row: its jobs' totals, or the start."""
    if not row.cases:
        results = load(row)  # the worker's own stages (the bench's set-up around them left out)
        return results["build_s"] + results["warmup_s"] + results["loras_prepare_s"]
    return sum(case["timings_ms"]["total"] / 1000 for case in measured_cases(row))


def estimate(row: Row, card: Card) -> float | None:
    """Seconds on `card` (estimated), or None where the card cannot run the setting."""
    precision = "fp8" if row.setting == "fp8" else "bf16"
    if precision == "fp8" and not card.fp8:
        return None
    if not row.cases:
        return seconds(row) * H200_BF16_TFLOPS / card.bf16_tflops
    streamed = load(row).get("memory_mode") == "offload"
    return sum(estimate_case(case, card, precision, streamed) for case in measured_cases(row))


def prices() -> dict:
    return json.loads(PRICES.read_text())["gpus"]


def cell(row: Row, card: Card, table: dict) -> str:
    est = estimate(row, card)
    if est is None:
        return "no FP8 (start fails)"
    return f"~{est:.1f} s, ${est * table[card.key]['usd_per_second']:.4f}"


def markdown(rows: list[Row]) -> str:
    table = prices()
    out = []
    for name, (cap, cards) in CLASSES.items():
        out.append(f"### {name} (capped at {cap} GiB)\n")
        heads = " | ".join(f"{card.short}: est. s, $ per job" for card in cards)
        out.append(f"| job | setting | measured at {cap} GiB | {heads} | file (`bench/results/…`) |")
        out.append("|" + "---|" * (4 + len(cards)))
        for row in (row for row in rows if row.card_class == name):
            setting = "`QUANTIZE=fp8 COMPILE=true`" if row.setting == "fp8" else "bf16 (defaults)"
            note = f" ({row.measured_on}; {row.note})" if row.note else f" ({row.measured_on})"
            try:
                measured, cells = f"{seconds(row):.2f} s", " | ".join(cell(row, card, table) for card in cards)
            except Refused as refusal:
                measured, cells = f"refused: {str(refusal).split(';')[0]}", " | ".join("refused" for _ in cards)
            out.append(f"| {row.job} | {setting} | {measured}{note} | {cells} | `{row.stem}` |")
        out.append("")
    return "\n".join(out)


ROWS: list[Row] = [
    # 80 GB class, bf16 at 79 GiB (`resident`, the transformers swap)
    Row("80 GB", "bf16", "edit, 40 steps, true CFG", "2026-12-05-cards-bf16-79", ((0, "edit"),)),
    Row("80 GB", "bf16", "edit, 4 steps, no CFG", "2026-12-06-cards-bf16-79-pair", ((0, "nocfg4"),), gpu=H100),
    Row("80 GB", "bf16", "Lightning, 4 steps (first Lightning job: unfused)", "2026-12-05-cards-bf16-79",
        ((1, "lightning4"),)),
    Row("80 GB", "bf16", "decompose 640, 4 layers, 50 steps", "2026-12-06-cards-bf16-79-pair", ((1, "decompose"),),
        "after an edit: 0.96 s of it the switch", H100),
    Row("80 GB", "bf16", "edit/decompose pair (a decomposition after an edit, then a 4-step edit)",
        "2026-12-06-cards-bf16-79-pair", ((1, "decompose"), (2, "nocfg4")), "two switches", H100),
    Row("80 GB", "bf16", "start (`PRELOAD=edit`; build, warm-up; no read)", "2026-12-05-cards-bf16-79"),
    # 80 GB class under FP8 + compile: the H100 80GB itself, uncapped (`resident`, the transformers swap)
    Row("80 GB", "fp8", "edit, 40 steps, true CFG", "2026-12-05-cards-fp8-80", ((0, "edit"),), "uncapped", H100),
    Row("80 GB", "fp8", "edit, 4 steps, no CFG", "2026-12-05-cards-fp8-80", ((1, "nocfg4"),), "uncapped", H100),
    Row("80 GB", "fp8", "Lightning, 4 steps (first Lightning job: unfused)", "2026-12-05-cards-fp8-80",
        ((2, "lightning4"),), "uncapped", H100),
    Row("80 GB", "fp8", "decompose 640, 4 layers, 50 steps", "2026-12-05-cards-fp8-80", ((3, "decompose"),),
        "uncapped; after an edit: 0.68 s of it the switch", H100),
    Row("80 GB", "fp8", "edit/decompose pair (a decomposition after an edit, then a 4-step edit)",
        "2026-12-05-cards-fp8-80", ((3, "decompose"), (4, "nocfg4")), "uncapped; two switches", H100),
    Row("80 GB", "fp8", "start (edit and Layered built; warm-up, LoRA branches; no read)", "2026-12-05-cards-fp8-80",
        note="uncapped", gpu=H100),
    # 48 GB class, bf16 at 44 GiB (`text_offload`, the transformers swap)
    Row("48 GB", "bf16", "edit, 40 steps, true CFG", "2026-12-05-cards-bf16-44", ((3, "edit"),),
        "after a decomposition: 1.21 s of it the switch", H100),
    Row("48 GB", "bf16", "edit, 4 steps, no CFG", "2026-12-04-swap-bf16-44-merged", ((0, "nocfg4"),)),
    Row("48 GB", "bf16", "Lightning, 4 steps (first Lightning job: unfused)", "2026-12-05-cards-bf16-44",
        ((1, "lightning4"),), gpu=H100),
    Row("48 GB", "bf16", "decompose 640, 4 layers, 50 steps", "2026-12-05-cards-bf16-44", ((2, "decompose"),),
        "after an edit: 0.98 s of it the switch", H100),
    Row("48 GB", "bf16", "edit/decompose pair, the decomposition 10 layers at 640, 2 steps",
        "2026-12-04-swap-bf16-44-merged", ((1, "decompose640_10"), (2, "nocfg4")), "two switches"),
    Row("48 GB", "bf16", "start (Layered built before the warm-up; no read)", "2026-12-04-swap-bf16-44-merged"),
    # 48 GB class under FP8 + compile at 44 GiB (`text_offload`, swap)
    Row("48 GB", "fp8", "edit, 40 steps, true CFG", "2026-12-05-cards-fp8-44", ((2, "edit"),), gpu=H100),
    Row("48 GB", "fp8", "edit, 4 steps, no CFG", "2026-12-05-cards-fp8-44", ((0, "nocfg4"),), gpu=H100),
    Row("48 GB", "fp8", "Lightning, 4 steps (first Lightning job: unfused)", "2026-12-05-cards-fp8-44",
        ((1, "lightning4"),), gpu=H100),
    Row("48 GB", "fp8", "Lightning, 4 steps, `PRELOAD=edit,lightning` (the set held in CPU memory)",
        "2026-12-06-host-hold-fp8-44", ((1, "lightning4"),), "0.29 s of it the set's copy to the GPU", H100),
    Row("48 GB", "fp8", "decompose 640, 4 layers, 50 steps", "2026-12-06-cards-fp8-44-pair", ((1, "decompose"),),
        "after an edit: 0.74 s of it the switch", H100),
    Row("48 GB", "fp8", "edit/decompose pair (a decomposition after an edit, then a 4-step edit)",
        "2026-12-06-cards-fp8-44-pair", ((1, "decompose"), (2, "nocfg4")), "two switches", H100),
    Row("48 GB", "fp8", "start (edit built; warm-up, LoRA branches; no read)", "2026-12-05-cards-fp8-44", gpu=H100),
    # 24 GB class, bf16 at 22 GiB (`offload`: the transformer streamed; FP8 fails the start there)
    Row("24 GB", "bf16", "edit, 40 steps, true CFG", "2026-12-05-cards-bf16-22-edit", ((0, "edit"),), gpu=H100),
    Row("24 GB", "bf16", "edit, 4 steps, no CFG", "2026-12-05-cards-bf16-22", ((0, "nocfg4"),), gpu=H100),
    Row("24 GB", "bf16", "decompose 640, 4 layers, 50 steps", "2026-12-05-cards-bf16-22", ((1, "decompose"),),
        gpu=H100),
    Row("24 GB", "bf16", "edit 2048x2048, 2 steps, true CFG (a memory corner)", "2026-12-01-corners-22gib",
        ((2, "edit2048"),), "2026-12-01, before the 12-04 merges"),
    Row("24 GB", "bf16", "decompose 640, 10 layers, 2 steps (a memory corner)", "2026-12-01-corners-22gib",
        ((3, "decompose640_10"),), "2026-12-01, before the 12-04 merges"),
]


if __name__ == "__main__":
    print(markdown(ROWS))
