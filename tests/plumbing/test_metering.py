import json
import time

import pytest

from src.plumbing.metering import PRICES_FILE, StageTimer, price_for


def test_price_file_records_its_source_and_prices_by_device_name():
    table = json.loads(PRICES_FILE.read_text())
    assert table["source"].startswith("https://") and table["retrieved"]
    h100 = table["gpus"]["NVIDIA H100 80GB HBM3"]
    assert h100["usd_per_hour"] == pytest.approx(h100["usd_per_second"] * 3600)


def test_cost_uses_the_published_price_or_the_override():
    published = price_for("NVIDIA H100 80GB HBM3", None)
    per_hour = json.loads(PRICES_FILE.read_text())["gpus"]["NVIDIA H100 80GB HBM3"]["usd_per_hour"]
    cost = published.cost(10.0)
    assert (cost["gpu"], cost["usd_per_hour"], cost["seconds"]) == ("NVIDIA H100 80GB HBM3", per_hour, 10.0)
    assert cost["usd"] == pytest.approx(10.0 * per_hour / 3600, abs=1e-6)
    assert price_for("NVIDIA H100 80GB HBM3", 3.6).cost(10.0)["usd"] == pytest.approx(0.01)
    unknown = price_for("Some Future GPU", None)
    assert unknown.usd_per_hour == 0.0 and "GPU_PRICE_PER_HOUR" in unknown.source


def test_stage_timer_adds_repeated_stages_and_totals():
    timer = StageTimer()
    for _ in range(2):
        with timer.stage("encode"):
            time.sleep(0.01)
    report = timer.report()
    assert report["encode"] >= 20 and report["total"] >= report["encode"]
