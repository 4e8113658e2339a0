"""The RunPod Hub files, .runpod/hub.json and .runpod/tests.json, against the structure RunPod's
publishing guide documents (https://docs.runpod.io/hub/publishing-guide), against what the worker
reads, and run: every tests.json input goes through handler.py behind the local API on the tiny
models and must return an image, as the Hub's test run expects of the real ones."""

from __future__ import annotations

import io
import json
import re
import tomllib

import pytest
import requests
from PIL import Image

from src.plumbing.config import ConfigError, Settings
from tests.conftest import REPO_ROOT, fetch_bytes, image_from_b64

HUB = json.loads((REPO_ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((REPO_ROOT / ".runpod" / "tests.json").read_text())

# The publishing guide's values (hub.json reference, "General metadata" and "Runpod configuration";
# environment variable inputs; tests.json reference).
CATEGORIES = {"audio", "embedding", "language", "video", "image"}
INPUT_TYPES = {"string", "number", "boolean", "huggingface"}
# https://docs.runpod.io/references/gpu-types: the GPU pools gpuIds takes, and the GPU ids
# (gpuTypeId, and gpuIds' "-<GPU ID>" negations) of the cards this worker can run on.
GPU_POOLS = {"AMPERE_16", "AMPERE_24", "ADA_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141"}
POOL_MEMORY_GB = {"AMPERE_16": 16, "AMPERE_24": 24, "ADA_24": 24, "AMPERE_48": 48, "ADA_48_PRO": 48,
                  "AMPERE_80": 80, "ADA_80_PRO": 80, "HOPPER_141": 141}
POOL_GPUS = {"AMPERE_80": {"NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"},
             "ADA_80_PRO": {"NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"},
             "HOPPER_141": {"NVIDIA H200"},
             "ADA_48_PRO": {"NVIDIA L40", "NVIDIA L40S", "NVIDIA RTX 6000 Ada Generation"},
             "AMPERE_48": {"NVIDIA RTX A6000", "NVIDIA A40"}}
GPU_IDS = set().union(*POOL_GPUS.values())
# The edit pipeline in bf16 needs about 58 GB on the GPU (README, Deploy on RunPod): the default
# settings run resident on these pools.
MIN_POOL_MEMORY_GB = 80


def worker_variables() -> set[str]:
    """Environment variables the worker reads: every name src/plumbing/config.py reads, and handler.py's."""
    names = set()
    for source in ("src/plumbing/config.py", "handler.py"):
        names |= set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', (REPO_ROOT / source).read_text()))
    return names - {"RUNPOD_VOLUME"}


def dockerfile_cuda() -> tuple[int, int]:
    """major.minor of the CUDA the Dockerfile's base image is built for (its FROM tag)."""
    base = re.search(r"^FROM\s+\S+", (REPO_ROOT / "Dockerfile").read_text(), flags=re.M).group(0)
    major, minor = re.search(r"cuda(\d+)\.(\d+)", base).groups()
    return int(major), int(minor)


def check_cuda_versions(versions) -> None:
    """Hosts whose driver runs the image's CUDA: its version and newer ones, none older."""
    assert isinstance(versions, list) and versions
    assert all(isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v) for v in versions), versions
    cuda = dockerfile_cuda()
    parsed = {tuple(int(part) for part in v.split(".")) for v in versions}
    assert cuda in parsed, f"the image's CUDA {cuda} is not allowed: {versions}"
    assert all(v >= cuda for v in parsed), f"a host older than the image's CUDA {cuda} is allowed: {versions}"
    assert len(parsed) == len(versions)


def env_entries() -> list[dict]:
    return HUB["config"]["env"]


def env_defaults() -> dict[str, str]:
    """The environment a Hub deployment gets when nothing is changed, as strings."""
    values = {}
    for entry in env_entries():
        value = entry["value"] if "value" in entry else entry["input"].get("default")
        if isinstance(value, bool):
            value = entry["input"]["trueValue" if value else "falseValue"]
        values[entry["key"]] = "" if value is None else str(value)
    return values


# -- hub.json --------------------------------------------------------------------------------------


def test_hub_json_general_metadata():
    assert set(HUB) <= {"title", "description", "type", "category", "iconUrl", "config"}
    assert isinstance(HUB["title"], str) and HUB["title"].strip()
    assert isinstance(HUB["description"], str) and HUB["description"].strip()
    assert HUB["type"] == "serverless"
    assert HUB["category"] in CATEGORIES and HUB["category"] == "image"
    assert "iconUrl" not in HUB or HUB["iconUrl"].startswith("https://")


def test_hub_json_runs_on_gpus_that_hold_the_default_settings():
    config = HUB["config"]
    assert set(config) <= {"runsOn", "containerDiskInGb", "cpuFlavor", "gpuCount", "gpuIds",
                           "allowedCudaVersions", "env", "presets"}
    assert config["runsOn"] == "GPU" and "cpuFlavor" not in config
    assert isinstance(config["containerDiskInGb"], int) and not isinstance(config["containerDiskInGb"], bool)
    # Room for every model on the container disk when no network volume is attached (DOWNLOAD_MODELS=missing
    # then fetches them there): about 58 GB of edit model and 41 GB of Layered.
    assert config["containerDiskInGb"] >= 120
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] == 1
    tokens = [token.strip() for token in config["gpuIds"].split(",")]
    pools = [token for token in tokens if not token.startswith("-")]
    assert pools and set(pools) <= GPU_POOLS, tokens
    assert all(POOL_MEMORY_GB[pool] >= MIN_POOL_MEMORY_GB for pool in pools)
    assert all(token[1:] in GPU_IDS for token in tokens if token.startswith("-"))
    check_cuda_versions(config["allowedCudaVersions"])


def test_hub_json_env_entries_are_well_formed():
    keys = [entry["key"] for entry in env_entries()]
    assert len(keys) == len(set(keys))
    for entry in env_entries():
        assert set(entry) in ({"key", "value"}, {"key", "input"}), entry
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", entry["key"])
        if "value" in entry:
            assert isinstance(entry["value"], str)
            continue
        field = entry["input"]
        assert field["type"] in INPUT_TYPES, entry["key"]
        assert isinstance(field["name"], str) and field["name"].strip(), entry["key"]
        assert isinstance(field["description"], str) and field["description"].strip(), entry["key"]
        assert isinstance(field.get("advanced", False), bool)
        default = field.get("default")
        if field["type"] == "boolean":
            assert isinstance(default, bool)
            assert isinstance(field["trueValue"], str) and isinstance(field["falseValue"], str)
        elif field["type"] == "number":
            assert isinstance(default, (int, float)) and not isinstance(default, bool)
            assert field.get("min", default) <= default <= field.get("max", default), entry["key"]
        else:
            assert isinstance(default, str), entry["key"]
        if "options" in field:
            values = [option["value"] for option in field["options"]]
            assert all(set(option) == {"label", "value"} and isinstance(option["label"], str)
                       for option in field["options"])
            assert default in values, entry["key"]


def test_every_env_key_is_a_variable_the_worker_reads():
    unread = {entry["key"] for entry in env_entries()} - worker_variables()
    assert not unread, f"hub.json sets variables the worker never reads: {sorted(unread)}"


def test_the_hub_defaults_bucket_models_speed_and_downloads():
    keys = {entry["key"] for entry in env_entries()}
    assert {"BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME"} <= keys
    assert {"EDIT_MODEL", "LAYERED_MODEL", "PRELOAD", "QUANTIZE", "COMPILE", "MEMORY_MODE"} <= keys
    assert env_defaults()["DOWNLOAD_MODELS"] == "missing"
    assert {key for key in keys if key.startswith("BUCKET_")} <= {
        name for name in worker_variables() if name.startswith("BUCKET_")}


def test_the_default_environment_every_option_and_every_preset_start_the_worker():
    """Settings.from_env, the worker's start-up check, takes the defaults, each option alone and
    each preset: no value offered by the Hub form fails the start."""
    defaults = env_defaults()
    settings = Settings.from_env(defaults)
    assert settings.bucket is None and settings.download_models == "missing"
    for entry in env_entries():
        field = entry.get("input", {})
        for option in field.get("options", []):
            Settings.from_env({**defaults, entry["key"]: option["value"]})
        if field.get("type") == "boolean":
            for value in (field["trueValue"], field["falseValue"]):
                Settings.from_env({**defaults, entry["key"]: value})
    for preset in HUB["config"].get("presets", []):
        assert isinstance(preset["name"], str) and preset["name"].strip()
        inputs = {entry["key"]: entry["input"] for entry in env_entries() if "input" in entry}
        assert set(preset["defaults"]) <= set(inputs), preset["name"]
        values = {}
        for key, value in preset["defaults"].items():
            if inputs[key]["type"] == "boolean":
                assert isinstance(value, bool)
                value = inputs[key]["trueValue" if value else "falseValue"]
            values[key] = str(value)
        Settings.from_env({**defaults, **values})


def test_a_bad_value_would_fail_the_start():
    """The check above can fail: an option the worker does not know stops it."""
    with pytest.raises(ConfigError):
        Settings.from_env({**env_defaults(), "QUANTIZE": "int4"})


# -- tests.json ------------------------------------------------------------------------------------


def test_tests_json_is_well_formed():
    assert set(TESTS) == {"tests", "config"}
    names = [test["name"] for test in TESTS["tests"]]
    assert names and len(names) == len(set(names))
    for test in TESTS["tests"]:
        assert set(test) <= {"name", "input", "timeout"}
        assert isinstance(test["name"], str) and isinstance(test["input"], dict)
        assert isinstance(test.get("timeout", 1), int) and test.get("timeout", 1) > 0
    config = TESTS["config"]
    assert set(config) <= {"gpuTypeId", "gpuCount", "cpuFlavor", "env", "allowedCudaVersions"}
    assert config["gpuTypeId"] in GPU_IDS
    hub_pools = {token.strip() for token in HUB["config"]["gpuIds"].split(",")}
    assert any(config["gpuTypeId"] in POOL_GPUS.get(pool, ()) for pool in hub_pools), "test GPU outside hub gpuIds"
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] == HUB["config"]["gpuCount"]
    check_cuda_versions(config["allowedCudaVersions"])
    for entry in config.get("env", []):
        assert set(entry) == {"key", "value"} and isinstance(entry["value"], str)
    assert {entry["key"] for entry in config.get("env", [])} <= worker_variables()
    # The Hub's test endpoint has no network volume: the models must be fetched at start.
    assert {"key": "DOWNLOAD_MODELS", "value": "missing"} in config["env"]
    Settings.from_env({**env_defaults(), **{entry["key"]: entry["value"] for entry in config["env"]}})


def test_tests_json_holds_the_orchestrators_health_check_and_a_real_edit():
    """README, Compatibility with existing orchestrators: a 64x64 grey image, prompt "test", 1 step,
    no `operation`; and one edit with a few steps."""
    health, edit = TESTS["tests"]
    assert "operation" not in health["input"]
    grey = image_from_b64(health["input"]["image_base64"])
    assert grey.size == (64, 64) and set(grey.convert("RGB").getdata()) == {(128, 128, 128)}
    assert health["input"]["prompt"] == "test" and health["input"]["num_inference_steps"] == 1
    assert edit["input"]["operation"] == "edit" and 1 < edit["input"]["num_inference_steps"] <= 10
    assert image_from_b64(edit["input"]["image_base64"]).size == (256, 256)


@pytest.mark.parametrize("test", TESTS["tests"], ids=[test["name"] for test in TESTS["tests"]])
def test_every_tests_json_input_returns_an_image_through_the_local_api(api, test):
    reply = requests.post(f"{api.url}/runsync", json={"input": test["input"]}, timeout=600).json()
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert output["success"] is True and output["images"]
    image = Image.open(io.BytesIO(fetch_bytes(output["output_url"]).content))
    image.load()
    assert list(image.size) == output["image_size"]
    if "operation" not in test["input"]:  # an orchestrator's request always gets the base64 too
        assert image_from_b64(output["edited_image_base64"]).size == image.size


# -- runpod.toml (runpodctl's deprecated `project` commands) ---------------------------------------


def test_runpod_toml_agrees_with_the_hub_files():
    toml = tomllib.loads((REPO_ROOT / "runpod.toml").read_text())
    project = toml["project"]
    assert set(project["gpu_types"]) <= GPU_IDS
    hub_gpus = set().union(*(POOL_GPUS[token.strip()] for token in HUB["config"]["gpuIds"].split(",")))
    assert hub_gpus & set(project["gpu_types"])
    # runpodctl's dev-Pod settings, and huggingface_hub's offline switch, besides the worker's own.
    runpodctl = {"POD_INACTIVITY_TIMEOUT", "RUNPOD_DEBUG_LEVEL", "UVICORN_LOG_LEVEL", "HF_HUB_OFFLINE"}
    assert set(project["env_vars"]) - runpodctl <= worker_variables()
    assert toml["runtime"]["handler_path"] == "handler.py"
