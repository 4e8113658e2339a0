"""tools/card_tables.py: every row of docs/performance.md's per-card tables resolves to a committed
result (the case it names, in the file it names), and the estimates scale as documented."""

from __future__ import annotations

import pytest

from tools.card_tables import (CLASSES, H200_BF16_TFLOPS, H200_LINK_GB_S, PCIE4_GB_S, ROWS, Card, Refused, cell,
                               estimate, estimate_case, measured_cases, prices, seconds)

H200_LIKE = Card("NVIDIA H200", "H200", H200_BF16_TFLOPS, True, H200_LINK_GB_S)


def job(total: float, load: float = 0.0, passes: int = 4) -> dict:
    timings = {"inference": (total - load) * 1000, "total": total * 1000}
    if load:
        timings["load"] = load * 1000
    return {"case": "nocfg4", "timings_ms": timings, "passes": passes}


def test_a_card_like_the_h200_is_estimated_at_the_measured_time():
    assert estimate_case(job(46.1, load=0.88), H200_LIKE, "bf16", streamed=False) == pytest.approx(46.1)


def test_compute_scales_by_tflops_and_the_switch_by_the_host_link():
    half = Card("x", "x", H200_BF16_TFLOPS / 2, True, PCIE4_GB_S)
    got = estimate_case(job(10.0, load=1.0), half, "bf16", streamed=False)
    assert got == pytest.approx(9.0 * 2 + 1.0 * H200_LINK_GB_S / PCIE4_GB_S)


def test_streamed_passes_are_never_faster_than_the_transformer_over_the_link():
    fast = Card("x", "x", H200_BF16_TFLOPS * 10, True, PCIE4_GB_S)
    assert estimate_case(job(4.0, passes=4), fast, "bf16", streamed=True) == pytest.approx(4 * 40.9 / PCIE4_GB_S)
    assert estimate_case(job(4.0, passes=4), fast, "bf16", streamed=False) == pytest.approx(0.4)


def test_every_row_names_a_committed_case_and_prices_every_card():
    table = prices()
    for row in ROWS:
        assert row.card_class in CLASSES
        try:
            measured_cases(row)  # raises ValueError where the index holds another case
        except Refused:
            continue
        assert seconds(row) > 0
        for card in CLASSES[row.card_class][1]:
            assert card.key in table, card.key
            est = estimate(row, card)
            if est is None:
                assert row.setting == "fp8" and not card.fp8
                continue
            assert f"${est * table[card.key]['usd_per_second']:.4f}" in cell(row, card, table)
