"""DOWNLOAD_MODELS=missing, for real but without the internet: a loopback hub (tests/fake_hf_hub.py)
serves the tiny models through the endpoints huggingface_hub calls, HF_ENDPOINT points at it, and
the worker starts on an empty HF_HOME. It downloads before loading, loads offline and serves;
jobs and later starts never ask the hub; DOWNLOAD_MODELS=never (the default) fails the start
with the one-line model-not-found message; a failed download is one line; an interrupted one is
finished by the next start, which fetches only what is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from huggingface_hub import constants
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import get_session

from src.models.files.download import hub_online, missing_downloads, remove_stale_partials
from src.models.files.snapshots import repo_folder
from src.plumbing.config import DEFAULT_LIGHTNING_FILES, DEFAULT_LIGHTNING_REPO, Settings
from tests.conftest import FAST, REPO_ROOT, fetch, png_b64, sample_image
from tests.fake_hf_hub import start_fake_hub
from tools.local_stack import start_api

EDIT_REPO = "Qwen/Qwen-Image-Edit-2511"
LAYERED_REPO = "Qwen/Qwen-Image-Layered"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"  # the one tiny file larger than huggingface_hub's 10 MiB chunks
LIGHTNING = (DEFAULT_LIGHTNING_REPO, tuple(DEFAULT_LIGHTNING_FILES.values()))
# The start path (src/model_download.fetch_missing, as handler.py calls it) in a process of its own,
# whose huggingface_hub reads HF_ENDPOINT at import; argv[1]: seconds between progress lines.
FETCH = """
import logging, os, sys
sys.path.insert(0, os.getcwd())
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
logging.getLogger("httpx2").setLevel(logging.WARNING)
from src.plumbing.config import Settings
from src.models.files.download import DownloadFailed, fetch_missing
try:
    print(fetch_missing(Settings.from_env(os.environ), progress_every_s=float(sys.argv[1])))
except DownloadFailed as exc:
    sys.exit(str(exc))
"""


@pytest.fixture(scope="module")
def hub(hf_home, lora_dir):
    """The loopback hub serving the tiny cache (lora_dir puts the tiny Lightning repo in it first)."""
    server = start_fake_hub(hf_home)
    yield server
    server.stop()


@pytest.fixture
def clean_hub(hub):
    hub.fail.clear()
    hub.cut_once.clear()
    hub.slow.clear()
    yield hub
    hub.fail.clear()
    hub.cut_once.clear()
    hub.slow.clear()


def hub_env(hub, hf_home: Path, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", **extra}


def run_fetch(env: dict[str, str], progress_every_s: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FETCH, str(progress_every_s)], cwd=REPO_ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def start_handler(env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "handler.py"], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr
    return done


def runsync(api, job_input: dict) -> dict:
    response = requests.post(f"{api.url}/runsync", json={"input": job_input}, timeout=600)
    response.raise_for_status()
    return response.json()


def snapshot(hf_home: Path, repo_id: str) -> Path:
    """The snapshot on disk, whole or not (an interrupted download has no refs/main yet)."""
    return next((repo_folder(hf_home, repo_id) / "snapshots").iterdir())


# -- The worker's start on an empty HF_HOME --------------------------------------------------------


@pytest.fixture(scope="module")
def first_start(hub, s3, tmp_path_factory):
    """handler.py behind the local API, started on an empty HF_HOME with DOWNLOAD_MODELS=missing."""
    home = tmp_path_factory.mktemp("empty-hf-home")
    env = hub_env(hub, home, DOWNLOAD_MODELS="missing", PRELOAD="edit", GPU_PRICE_PER_HOUR="1.80",
                  ALLOW_PRIVATE_URLS="true", **s3.env())
    asked_before = len(hub.requests)
    api = start_api(env, tmp_path_factory.mktemp("api") / "worker.log")
    yield api, home, env, asked_before, len(hub.requests)
    api.stop()


def test_an_empty_hf_home_is_filled_before_the_worker_loads(first_start, hub):
    api, home, _, asked_before, asked_at_start = first_start
    log = api.log()
    for repo_id in (EDIT_REPO, LAYERED_REPO, DEFAULT_LIGHTNING_REPO):
        assert re.search(rf"model {re.escape(repo_id)} missing from HF_HOME; downloading \(\d+\.\d [MG]B\)", log)
    # Downloaded before the pipelines load, and only then.
    assert log.index("missing from HF_HOME") < log.index(f"loading {EDIT_REPO}@")
    # The weights' early read-ahead (handler.py) begins once the last file is in, on what arrived.
    last_fetched = log.rindex(f"{DEFAULT_LIGHTNING_REPO}: ")
    assert last_fetched < log.index("reading the weights ahead while the libraries import: edit\n")
    assert asked_at_start > asked_before
    # Layered's text encoder, tokenizer and processor are the edit model's files: borrowed, not fetched.
    layered = snapshot(home, LAYERED_REPO)
    assert not any((layered / folder).exists() for folder in ("text_encoder", "tokenizer", "processor"))
    assert (layered / WEIGHTS).is_file()
    assert sorted(path.name for path in snapshot(home, DEFAULT_LIGHTNING_REPO).iterdir()) == sorted(LIGHTNING[1])
    assert "Traceback" not in log


def test_the_filled_worker_serves_edits_lightning_and_decompositions_without_asking_the_hub(first_start, hub):
    api, _, _, _, asked_at_start = first_start
    reply = runsync(api, {"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "make it blue",
                          "seed": 3, **FAST})
    assert reply["status"] == "COMPLETED", reply
    assert fetch(reply["output"]["output_url"]).size == (256, 256)
    lightning = runsync(api, {"image_base64": png_b64(sample_image()), "prompt": "x", "lightning": 4,
                              "width": 256, "height": 256, "seed": 1})
    assert lightning["status"] == "COMPLETED", lightning
    assert lightning["output"]["lightning"]["steps"] == 4
    layers = runsync(api, {"operation": "decompose", "image_base64": png_b64(sample_image()), "prompt": "scene",
                           "layers": 2, "num_inference_steps": 2, "seed": 4})
    assert layers["status"] == "COMPLETED", layers
    assert len(layers["output"]["layers"]) == 2
    assert len(hub.requests) == asked_at_start  # jobs never download


def test_the_next_start_on_the_filled_hf_home_downloads_nothing(first_start, hub, tmp_path):
    """Only the first worker pays: a second one on the same HF_HOME loads at once."""
    _, _, env, _, _ = first_start
    asked = len(hub.requests)
    api = start_api(env, tmp_path / "second.log")
    try:
        assert "nothing to download" in api.log() and "missing from HF_HOME" not in api.log()
    finally:
        api.stop()
    assert len(hub.requests) == asked


def test_never_fails_the_start_on_an_empty_hf_home_with_one_line_and_asks_the_hub_nothing(clean_hub, tmp_path):
    asked = len(clean_hub.requests)
    done = start_handler(hub_env(clean_hub, tmp_path))  # DOWNLOAD_MODELS unset: never
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"start failed: model {EDIT_REPO} is not in the Hugging Face cache at {tmp_path}/hub; "
        f"fetch it with: python tools/download_models.py --hf-home {tmp_path}, or start with DOWNLOAD_MODELS=missing")
    assert len(clean_hub.requests) == asked


def test_a_repo_the_hub_does_not_have_fails_the_start_with_one_line(clean_hub, tmp_path):
    done = start_handler(hub_env(clean_hub, tmp_path, DOWNLOAD_MODELS="missing", EDIT_MODEL="Qwen/Not-There"))
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"start failed: DOWNLOAD_MODELS=missing: downloading Qwen/Not-There into "
                                f"{tmp_path}/hub failed: RepositoryNotFoundError: ")
    assert len(last_line) < 700


# -- Interrupted downloads, progress, partial files ------------------------------------------------


def test_an_interrupted_download_keeps_its_files_and_the_next_start_fetches_only_the_rest(clean_hub, tmp_path):
    clean_hub.fail.add(WEIGHTS)
    failed = run_fetch(hub_env(clean_hub, tmp_path, DOWNLOAD_MODELS="missing"))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"DOWNLOAD_MODELS=missing: downloading {EDIT_REPO} into {tmp_path}/hub failed: HfHubHTTPError: Server error '500")
    edit = snapshot(tmp_path, EDIT_REPO)
    kept = {path for path in clean_hub.repos[EDIT_REPO].files if (edit / path).is_file()}
    assert kept and WEIGHTS not in kept
    # The cache knows the snapshot is not whole (huggingface_hub's listing of the commit).
    assert [d.repo_id for d in missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, tmp_path / "hub")] == [
        EDIT_REPO, LAYERED_REPO, DEFAULT_LIGHTNING_REPO]

    clean_hub.fail.clear()
    mark = len(clean_hub.requests)
    done = run_fetch(hub_env(clean_hub, tmp_path, DOWNLOAD_MODELS="missing"))
    assert done.returncode == 0, done.stderr
    fetched = [path for repo_id, path, _ in clean_hub.file_gets(mark) if repo_id == EDIT_REPO]
    assert WEIGHTS in fetched and not kept & set(fetched)
    assert missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, tmp_path / "hub") == []


def test_a_connection_cut_mid_file_resumes_from_its_last_whole_chunk(clean_hub, hf_home, tmp_path):
    """huggingface_hub writes a download in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB) and, after a
    dropped connection, asks for the rest from the end of the last one it wrote."""
    source = snapshot(hf_home, EDIT_REPO) / TEXT_ENCODER
    assert source.stat().st_size > constants.DOWNLOAD_CHUNK_SIZE * 1.5
    clean_hub.cut_once[TEXT_ENCODER] = int(constants.DOWNLOAD_CHUNK_SIZE * 1.5)
    mark = len(clean_hub.requests)
    done = run_fetch(hub_env(clean_hub, tmp_path, DOWNLOAD_MODELS="missing"))
    assert done.returncode == 0, done.stderr
    ranges = [byte_range for repo_id, path, byte_range in clean_hub.file_gets(mark)
              if (repo_id, path) == (EDIT_REPO, TEXT_ENCODER)]
    assert ranges == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
    assert (snapshot(tmp_path, EDIT_REPO) / TEXT_ENCODER).read_bytes() == source.read_bytes()


def test_a_running_download_logs_its_progress(clean_hub, tmp_path):
    clean_hub.slow[WEIGHTS] = 1.5
    done = run_fetch(hub_env(clean_hub, tmp_path, DOWNLOAD_MODELS="missing"), progress_every_s=0.25)
    assert done.returncode == 0, done.stderr
    assert re.search(rf"{re.escape(EDIT_REPO)}: \d+\.\d MB of \d+\.\d MB \(\d+%\), \d+\.\d [MG]B/s", done.stderr)
    assert "Fetching" not in done.stderr  # huggingface_hub's progress bars stay off in the log


def test_partial_files_of_a_dead_download_are_removed_and_live_ones_kept(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    dead = blobs / "abc.1a2b3c4d.incomplete"
    dead.write_bytes(b"x" * 1000)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    live = blobs / "abc.5e6f7a8b.incomplete"
    live.write_bytes(b"y" * 10)
    whole = blobs / "abc"
    whole.write_bytes(b"z")
    os.utime(whole, (old, old))
    assert remove_stale_partials(blobs) == 1000
    assert sorted(path.name for path in blobs.iterdir()) == ["abc", live.name]
    assert remove_stale_partials(tmp_path / "absent") == 0


# -- What counts as missing, offline ---------------------------------------------------------------


def test_the_tiny_cache_holds_everything(hf_home, lora_dir):
    """A cache written without huggingface_hub's listings (tools/make_tiny_models.py) counts as
    whole once its snapshots exist, as the worker sees it; Layered borrows what it lacks."""
    assert missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, hf_home / "hub") == []


def test_a_missing_lightning_file_or_model_is_found_offline(hf_home, lora_dir, tmp_path):
    shutil.copytree(hf_home / "hub", tmp_path / "hub")
    (snapshot(tmp_path, DEFAULT_LIGHTNING_REPO) / DEFAULT_LIGHTNING_FILES[8]).unlink()
    shutil.rmtree(snapshot(tmp_path, LAYERED_REPO) / "text_encoder")  # borrowed: not missing
    missing = missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, tmp_path / "hub")
    assert [(d.name, d.allow_patterns) for d in missing] == [("lightning", tuple(sorted(LIGHTNING[1])))]
    shutil.rmtree(repo_folder(tmp_path, LAYERED_REPO))
    assert [d.repo_id for d in missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, tmp_path / "hub")] == [
        LAYERED_REPO, DEFAULT_LIGHTNING_REPO]
    assert len(missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, tmp_path / "empty")) == 3


def test_the_offline_switch_is_lifted_for_the_download_alone(clean_hub, monkeypatch):
    """huggingface_hub 2.4 reads HF_HUB_OFFLINE once, at import, and its client refuses requests
    while the constant is true: the worker's state after the start (handler.py sets it first)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    url = f"{clean_hub.url}/api/models/{EDIT_REPO}"
    with pytest.raises(OfflineModeIsEnabled):
        get_session().get(url)
    with hub_online():
        assert get_session().get(url).status_code == 200
    assert constants.HF_HUB_OFFLINE is True
    with pytest.raises(OfflineModeIsEnabled):
        get_session().get(url)


# -- tools/download_models.py ----------------------------------------------------------------------


def test_the_tool_fills_an_hf_home_through_the_same_module(clean_hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": clean_hub.url, "HF_HUB_OFFLINE": "1"}
    tool = [sys.executable, "tools/download_models.py", "--hf-home", str(tmp_path), "--lightning"]
    dry = subprocess.run([*tool, "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "layered  text_encoder/: same files as" in dry.stdout and "to download: " in dry.stdout
    assert not list((tmp_path / "hub").glob("models--*/snapshots"))
    done = subprocess.run(tool, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "done: " in done.stdout
    assert missing_downloads(EDIT_REPO, LAYERED_REPO, LIGHTNING, tmp_path / "hub") == []
    missing = subprocess.run([*tool, "--edit-model", "Qwen/Not-There", "--only", "edit"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: RepositoryNotFoundError: ")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_the_tools_lightning_defaults_are_the_workers():
    from tools.download_models import DEFAULT_LIGHTNING_FILES as TOOL_FILES
    from tools.download_models import DEFAULT_LIGHTNING_REPO as TOOL_REPO

    assert (TOOL_REPO, TOOL_FILES) == (DEFAULT_LIGHTNING_REPO, DEFAULT_LIGHTNING_FILES)
    settings = Settings.from_env({})
    assert (settings.lightning_repo, settings.lightning_files) == (TOOL_REPO, TOOL_FILES)


def test_a_lora_repo_missing_from_the_cache_says_the_command_that_fetches_it_and_that_command_works(
        clean_hub, hf_home, tmp_path):
    """The job's error names tools/download_models.py with the right arguments; run as written
    (against the loopback hub), it puts the file where the same source then resolves."""
    import shlex

    from src.models.lora.sources import LoraCache, LoraError, http_limits, resolve
    from src.plumbing.url_guard import AddressPolicy

    repo, file = LIGHTNING[0], LIGHTNING[1][0]
    home = tmp_path / "hf"
    lookup = dict(roots=(tmp_path,), hf_home=home, policy=AddressPolicy(), limits=http_limits(2**20, 5, 5),
                  cache=LoraCache(tmp_path / "lora-cache", max_bytes=2**30, max_files=5, max_download_bytes=2**30))
    with pytest.raises(LoraError) as caught:
        resolve(repo, file, "loras[0].source", **lookup)
    command = f"python tools/download_models.py --hf-home {home} --only loras --lora {repo}/{file}"
    assert str(caught.value) == (
        f"loras[0].source: '{repo}' is not in the Hugging Face cache at {home}/hub, and jobs never download from "
        f"the hub; put it there with '{command}', or give an https:// or s3:// URL of the file")
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_ENDPOINT": clean_hub.url, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    found = resolve(repo, file, "loras[0].source", **lookup)
    assert found.path.read_bytes() == (snapshot(hf_home, repo) / file).read_bytes()
    assert not (home / "hub" / "models--Qwen--Qwen-Image-Edit-2511").exists()  # --only loras: no model
