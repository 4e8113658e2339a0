"""A long run: 200 sequential edits, with refused jobs among them, through the runpod
SDK's local API on a server of its own. The worker's resident memory stays flat once
warm, its file descriptors and threads do not pile up, and it leaves nothing in its
temp folder.

Several minutes on 2 CPU cores (754 s measured while two other suites shared the
machine); marked `longrun` (`pytest -m "not longrun"` skips it).
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import png_b64, sample_image
from tests.process_probe import MIB, open_fds, rss_bytes, threads
from tools.local_stack import start_api

JOBS = 200
REFUSED_EVERY = 10  # a bad input after every 10th edit: failures must not leak either
WARM_JOBS = 20  # allocator pools and caches settle over the first jobs; growth counts after them
# Generous: a leak of one 256x256 image (~0.8 MB as float32 tensors) per job would show
# as ~140 MiB over the 180 counted jobs and fail it.
MAX_RSS_GROWTH_MIB = 100
MAX_FD_GROWTH = 10
MAX_THREAD_GROWTH = 4


def edit_input(seed: int, image: str) -> dict:
    """The cheapest full edit: the smallest size, 2 steps, true CFG off (one transformer
    pass a step). Each job still decodes, runs every model, encodes and uploads."""
    return {"operation": "edit", "image_base64": image, "prompt": "make it blue", "seed": seed,
            "num_inference_steps": 2, "true_cfg_scale": 1.0, "width": 256, "height": 256}


@pytest.mark.longrun
@pytest.mark.timeout(1200)  # above the suite's 600 s per test: a busy machine may take twice the usual time
def test_200_jobs_keep_memory_flat_and_leave_no_temp_files(worker_env, tmp_path, guarantee_figures):
    temp_dir = tmp_path / "worker-tmp"
    temp_dir.mkdir()
    server = start_api({**worker_env, "TMPDIR": str(temp_dir)}, tmp_path / "worker.log")
    session = requests.Session()
    image = png_b64(sample_image())
    pid = server.process.pid
    # What start-up leaves there (torch makes an empty torchinductor_<user> folder) is not
    # a job's doing; whatever appears after it is.
    at_start = set(temp_dir.rglob("*"))
    try:
        started = time.monotonic()
        for i in range(JOBS):
            reply = session.post(f"{server.url}/runsync", json={"input": edit_input(i, image)}, timeout=120).json()
            assert reply["status"] == "COMPLETED" and reply["output"]["success"], reply
            if i % REFUSED_EVERY == REFUSED_EVERY - 1:
                refused = session.post(f"{server.url}/runsync", json={"input": {**edit_input(i, image), "seed": -1}},
                                       timeout=120).json()
                assert refused["error"].startswith("seed: "), refused
            if i + 1 == WARM_JOBS:
                warm = {"rss": rss_bytes(pid), "fds": open_fds(pid), "threads": threads(pid)}
        seconds = time.monotonic() - started
        end = {"rss": rss_bytes(pid), "fds": open_fds(pid), "threads": threads(pid)}
    finally:
        server.stop()

    growth_mib = (end["rss"] - warm["rss"]) / MIB
    guarantee_figures["long_run"] = (
        f"{JOBS} edits + {JOBS // REFUSED_EVERY} refused jobs in {seconds:.0f} s; RSS {warm['rss'] / MIB:.0f} MiB "
        f"after {WARM_JOBS} jobs, {end['rss'] / MIB:.0f} MiB after {JOBS} ({growth_mib:+.1f} MiB); "
        f"fds {warm['fds']} -> {end['fds']}, threads {warm['threads']} -> {end['threads']}; temp files left by "
        f"jobs: {len(set(temp_dir.rglob('*')) - at_start)}")
    assert growth_mib < MAX_RSS_GROWTH_MIB
    assert end["fds"] - warm["fds"] <= MAX_FD_GROWTH
    assert end["threads"] - warm["threads"] <= MAX_THREAD_GROWTH
    assert not set(temp_dir.rglob("*")) - at_start
