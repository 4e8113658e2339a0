"""PARALLEL: one job across several ranks with diffusers' context parallelism (src/serving/parallel.py).

On the CPU, ranks are processes joined over gloo: the start-up path, diffusers' Ulysses
attention on the tiny models, job broadcast, the lockstep that keeps a failed rank from
hanging the others, and shutdown. NCCL and GPUs are not exercised here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from src.plumbing.config import ConfigError, Settings
from src.serving.parallel import ParallelPlan, follower_job
from tests.conftest import REPO_ROOT, png_b64, reference_edit_pipeline
from tools.local_stack import free_port
from tools.parallel_check import input_image

TOOL = REPO_ROOT / "tools" / "parallel_check.py"
RUN_TIMEOUT_S = 240
# Rounding: Ulysses multiplies 1/N of the tokens at a time, so sums may run in another order.
MAX_PIXEL_DIFF = 1
MAX_DIFFERING_FRACTION = 1e-3


# --- the plan, from the environment -----------------------------------------------

@pytest.mark.parametrize("env, gpus, expected", [
    ({}, 0, ParallelPlan(1, "cpu")),
    ({}, 1, ParallelPlan(1, "cuda")),
    ({}, 4, ParallelPlan(1, "cuda")),  # off unless asked for: not yet run on GPUs
    ({"PARALLEL": "auto"}, 2, ParallelPlan(2, "cuda")),
    ({"PARALLEL": "off"}, 8, ParallelPlan(1, "cuda")),
    ({"PARALLEL": "2"}, 8, ParallelPlan(2, "cuda")),
    ({"PARALLEL": "1"}, 8, ParallelPlan(1, "cuda")),
    ({"PARALLEL": "2", "DEVICE": "cpu"}, 8, ParallelPlan(2, "cpu")),
    ({"PARALLEL": "auto", "DEVICE": "cpu"}, 8, ParallelPlan(1, "cpu")),
])
def test_plan_from_env(env, gpus, expected):
    assert ParallelPlan.for_settings(Settings.from_env(env), cuda_devices=gpus) == expected


@pytest.mark.parametrize("value, gpus, message", [
    ("two", 2, "PARALLEL: 'two' is not allowed; allowed: auto, off or a number of GPUs, 1 to 16"),
    ("0", 2, "PARALLEL: 0 is out of range; allowed: 1 to 16"),
    ("4", 2, "PARALLEL: 4 ranks but 2 GPUs are visible"),
])
def test_bad_plan_fails_at_start(value, gpus, message):
    with pytest.raises(ConfigError) as raised:
        ParallelPlan.for_settings(Settings.from_env({"PARALLEL": value}), cuda_devices=gpus)
    assert str(raised.value) == message


def test_plan_backends():
    assert ParallelPlan(2, "cuda").backend == "cpu:gloo,cuda:nccl"
    assert ParallelPlan(2, "cpu").backend == "gloo"
    assert not ParallelPlan(1, "cuda").enabled and ParallelPlan(2, "cuda").enabled


def test_other_ranks_never_get_the_bucket_or_inline_output():
    job = {"id": "j", "input": {"prompt": "x", "r2": {"bucket_name": "b"}, "return_base64": True, "seed": 3}}
    assert follower_job(job) == {"id": "j", "input": {"prompt": "x", "seed": 3}}
    assert job["input"]["r2"] == {"bucket_name": "b"}  # rank 0's job is left as it was


# --- the lockstep, on two gloo processes -------------------------------------------

def _lockstep_rank(rank: int, port: int, results) -> None:
    """One rank: a job that fails on rank 1 before the model runs, then one that runs."""
    import torch.distributed as dist

    from src.serving.parallel import ParallelPlan, Ranks

    ranks = Ranks.join(rank, ParallelPlan(2, "cpu"), port)
    model = torch.nn.Linear(4, 4)
    model.register_forward_pre_hook(ranks.check_peers)

    def failing_job():
        if rank == 1:
            raise ValueError("bad file on rank 1")
        return model(torch.ones(1, 4))  # rank 0 stops here: rank 1 will never come

    def good_job():
        return [model(torch.ones(1, 4)) for _ in range(3)]

    _, failed = ranks.lockstep(failing_job)
    stopped = ranks.stopped_by_peer
    _, ran = ranks.lockstep(good_job)
    dist.barrier(group=ranks.control)
    ranks.close()
    results.put((rank, failed, stopped, ran))


def test_a_rank_that_fails_before_the_model_stops_the_others_and_the_next_job_runs():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_lockstep_rank, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        outcomes = sorted(results.get(timeout=60) for _ in processes)
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in processes] == [0, 0]
    (_, failed0, stopped0, ran0), (_, failed1, stopped1, ran1) = outcomes
    assert failed0 == failed1 == ["PeerFailed: another rank's part of this job failed",
                                  "ValueError: bad file on rank 1"]
    assert stopped0 and not stopped1
    assert ran0 == ran1 == [None, None]


# --- the worker on two CPU ranks, with the tiny models -----------------------------

def _tool(hf_home, out, ranks=2, extra_jobs: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(TOOL), "--hf-home", str(hf_home), "--ranks", str(ranks), "--device", "cpu",
               "--out", str(out)]
    if extra_jobs:
        (out / "extra.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "extra.json").write_text(json.dumps(extra_jobs))
        command += ["--extra-jobs", str(out / "extra.json")]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=REPO_ROOT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_cpu_ranks_serve_jobs_like_one_pipeline_and_shut_down(hf_home, lora_dir, s3, tmp_path):
    """Start-up, an edit, a bad input refused on rank 0, a job only rank 0 can run (its
    LoRA is on S3 and only rank 0 gets the job's bucket: rank 1 fails before the model,
    rank 0 stops at its first transformer call and answers with rank 1's error), the
    edit again, shutdown."""
    from huggingface_hub import snapshot_download

    s3.client().upload_file(str(lora_dir / "tiny_lora_diffusers.safetensors"), s3.bucket, "parallel/style.safetensors")
    r2 = {"endpoint_url": s3.endpoint_url, "access_key_id": s3.access_key_id,
          "secret_access_key": s3.secret_access_key, "bucket_name": s3.bucket, "region": s3.region}
    source = f"s3://{s3.bucket}/parallel/style.safetensors"
    lora_job = {"image_base64": png_b64(input_image()), "prompt": "a red hat", "seed": 3, "num_inference_steps": 2,
                "width": 256, "height": 256, "r2": r2, "loras": [{"source": source}]}

    done = _tool(hf_home, tmp_path, extra_jobs={"s3_lora": lora_job})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ranks"] == 2 and all(report["checks"].values()), report["checks"]
    assert report["jobs"]["bad_input"]["error"].startswith("num_inference_steps:")
    assert report["jobs"]["s3_lora"]["error"] == (
        f"parallel: rank 1: loras[0].source: {source!r} is an S3 URL but no bucket credentials are configured "
        "(BUCKET_* env or the job's r2)")
    assert report["follower_exit_codes"] == [0]
    assert not any(_alive(pid) for pid in report["follower_pids"])
    # The weights are read ahead once, by rank 0 (its early read): rank 1's load finds them cached.
    prefetched = [line for line in done.stderr.splitlines() if "weights prefetched" in line]
    assert len(prefetched) == 1 and " rank0 " in prefetched[0], prefetched

    # The same job through diffusers on one process.
    path = snapshot_download("Qwen/Qwen-Image-Edit-2511", cache_dir=hf_home / "hub", local_files_only=True)
    pipeline = reference_edit_pipeline(path)
    expected = pipeline(image=[Image.open(tmp_path / "input.png").convert("RGB")], prompt="a red hat",
                        negative_prompt=" ", true_cfg_scale=4.0, guidance_scale=1.0, num_inference_steps=2,
                        width=256, height=256, generator=torch.Generator("cpu").manual_seed(1234)).images[0]
    got = np.asarray(Image.open(tmp_path / "edit.png").convert("RGB"), dtype=np.int16)
    difference = np.abs(got - np.asarray(expected, dtype=np.int16))
    assert got.shape == (256, 256, 3)
    assert difference.max() <= MAX_PIXEL_DIFF and (difference > 0).mean() <= MAX_DIFFERING_FRACTION


def test_a_rank_that_cannot_load_stops_the_start_with_its_reason(tmp_path):
    done = _tool(tmp_path / "empty-hf", tmp_path / "out")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("start failed: parallel load failed on rank 0: ModelNotFound: model "
                           "Qwen/Qwen-Image-Edit-2511 is not in the Hugging Face cache"), last
