"""LoRA adapters on the tiny edit model: custom LoRAs in both key formats, Lightning
presets, URL and S3 sources with the download cache, and their errors."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import requests
import torch

from src.models.lora.adapters import LIGHTNING_SCHEDULER_CONFIG
from src.models.files.snapshots import repo_folder, snapshot_dir, write_ref
from tests.conftest import image_from_b64, png_b64, reference_edit_pipeline, sample_image

FAST = {"num_inference_steps": 2, "width": 256, "height": 256}


def edit(worker, job_id="lora-job", **extra) -> dict:
    job = {"operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "a hat", "seed": 5,
           "return_base64": True, **FAST, **extra}
    return worker.handle({"id": job_id, "input": job})


def pixels(out: dict) -> bytes:
    assert "error" not in out, out
    return image_from_b64(out["edited_image_base64"]).tobytes()


def direct(pipeline, steps=2, cfg=4.0) -> bytes:
    return pipeline(image=[sample_image()], prompt="a hat", negative_prompt=" ", true_cfg_scale=cfg,
                    guidance_scale=1.0, num_inference_steps=steps, width=256, height=256,
                    generator=torch.Generator("cpu").manual_seed(5)).images[0].tobytes()


@pytest.fixture
def fresh_pipeline(worker):
    """A second edit pipeline loaded by diffusers itself, for the fidelity checks (fresh
    per test: diffusers' own unfuse does not restore weights exactly)."""
    return reference_edit_pipeline(worker.host.edit_ref.path)


def test_lora_changes_the_output_repeats_exactly_and_leaves_the_base_clean(worker, lora_dir):
    base = pixels(edit(worker))
    lora = {"source": str(lora_dir / "tiny_lora_diffusers.safetensors"), "scale": 1.0}
    first = edit(worker, loras=[lora])
    assert pixels(first) != base
    assert first["timings_ms"]["lora"] > 0
    assert first["loras"] == [{"source": lora["source"], "scale": 1.0, "file": "tiny_lora_diffusers.safetensors",
                               "sha256": hashlib.sha256(Path(lora["source"]).read_bytes()).hexdigest()}]
    again = edit(worker, loras=[lora])
    assert pixels(again) == pixels(first)
    assert "lora" not in again["timings_ms"]  # the same set stays fused
    half = edit(worker, loras=[{**lora, "scale": 0.5}])
    assert pixels(half) not in (base, pixels(first))
    after = edit(worker)
    assert pixels(after) == base and after["timings_ms"]["lora"] > 0  # base weights restored exactly


def test_lora_output_equals_diffusers_own_lora_loading(worker, fresh_pipeline, lora_dir):
    path = lora_dir / "tiny_lora_diffusers.safetensors"
    out = edit(worker, loras=[{"source": str(path), "scale": 0.8}])
    fresh_pipeline.load_lora_weights(str(path), adapter_name="check")
    fresh_pipeline.set_adapters(["check"], adapter_weights=[0.8])
    fresh_pipeline.fuse_lora(adapter_names=["check"], lora_scale=1.0)
    assert pixels(out) == direct(fresh_pipeline)


def test_ai_toolkit_format_equals_diffusers_own_loading_and_the_diffusers_format(worker, fresh_pipeline, lora_dir):
    """The ai-toolkit file holds the diffusers file's tensors under other names. Its image is
    diffusers' own for that file, and the diffusers file's image, each within one 8-bit level
    on at most 0.1% of the values: the files place their tensors at other offsets, and on some
    CPUs the kernels round differently on differently aligned memory (diffusers' own loading
    too; on 2026-12-05's development machine one value of 196,608 differed by one level)."""
    path = lora_dir / "tiny_lora_aitoolkit.safetensors"
    as_aitoolkit = pixels(edit(worker, loras=[{"source": str(path)}]))
    fresh_pipeline.load_lora_weights(str(path), adapter_name="check")
    fresh_pipeline.fuse_lora(adapter_names=["check"], lora_scale=1.0)
    as_diffusers = pixels(edit(worker, loras=[{"source": str(lora_dir / "tiny_lora_diffusers.safetensors")}]))
    for other in (direct(fresh_pipeline), as_diffusers):
        levels = [abs(a - b) for a, b in zip(other, as_aitoolkit)]
        assert len(other) == len(as_aitoolkit) and max(levels) <= 1 and sum(levels) <= len(levels) // 1000


def test_lightning_preset_runs_its_steps_scheduler_and_no_cfg(worker, fresh_pipeline, hf_home):
    out = edit(worker, lightning=4, num_inference_steps=None)
    assert out["num_inference_steps"] == 4 and out["true_cfg_scale"] == 1.0
    assert out["lightning"]["steps"] == 4 and out["lightning"]["repo"] == worker.settings.lightning_repo
    assert out["lightning"]["file"] == worker.settings.lightning_files[4]
    # Fidelity: diffusers' own LoRA loading with the published scheduler.
    from diffusers import FlowMatchEulerDiscreteScheduler

    lightning_file = next(hf_home.glob(f"hub/models--lightx2v--*/snapshots/*/{worker.settings.lightning_files[4]}"))
    fresh_pipeline.load_lora_weights(str(lightning_file), adapter_name="lightning")
    fresh_pipeline.fuse_lora(adapter_names=["lightning"], lora_scale=1.0)
    fresh_pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    assert pixels(out) == direct(fresh_pipeline, steps=4, cfg=1.0)


def test_lightning_and_custom_loras_combine(worker, lora_dir):
    both = edit(worker, lightning=8, num_inference_steps=None,
                loras=[{"source": str(lora_dir / "tiny_lora_diffusers.safetensors")}])
    alone = edit(worker, lightning=8, num_inference_steps=None)
    assert both["num_inference_steps"] == 8 and len(both["loras"]) == 1
    assert pixels(both) != pixels(alone)


def test_url_source_is_downloaded_once_into_the_cache(worker, lora_file_server, lora_dir):
    url = f"{lora_file_server.url}/tiny_lora_aitoolkit.safetensors"
    first = edit(worker, "url-1", loras=[{"source": url}])
    second = edit(worker, "url-2", loras=[{"source": url}])
    assert pixels(first) == pixels(second)
    assert lora_file_server.gets.count("/tiny_lora_aitoolkit.safetensors") == 1
    assert first["loras"][0]["sha256"] == hashlib.sha256((lora_dir / "tiny_lora_aitoolkit.safetensors").read_bytes()).hexdigest()
    assert "lora_resolve" in first["timings_ms"]


def test_s3_source_uses_the_bucket_credentials(worker, s3, lora_dir):
    s3.client().put_object(Bucket=s3.bucket, Key="loras/style.safetensors",
                           Body=(lora_dir / "tiny_lora_diffusers.safetensors").read_bytes())
    from_s3 = edit(worker, loras=[{"source": f"s3://{s3.bucket}/loras/style.safetensors"}])
    from_disk = edit(worker, loras=[{"source": str(lora_dir / "tiny_lora_diffusers.safetensors")}])
    assert pixels(from_s3) == pixels(from_disk)


def test_snap_32_matches_ai_toolkit_previews(worker):
    assert edit(worker, snap=32, width=1000, height=300, num_inference_steps=1)["image_size"] == [992, 288]


@pytest.mark.parametrize("name, expected", [
    ("not_a_lora.safetensors", "is not a LoRA: none of its"),
    ("tiny_lora_wrong_model.safetensors", "does not fit Qwen/Qwen-Image-Edit-2511"),
])
def test_files_that_are_not_loras_for_this_model(worker, lora_dir, name, expected):
    out = edit(worker, loras=[{"source": str(lora_dir / name)}])
    assert out["error"].startswith(f"loras[0].source: '{lora_dir / name}'") and expected in out["error"]
    assert pixels(edit(worker)) == pixels(edit(worker))  # the worker goes on, base clean


def test_lora_errors_name_the_key(worker, lora_dir, lora_file_server, tmp_path):
    good = {"source": str(lora_dir / "tiny_lora_diffusers.safetensors")}
    too_many = edit(worker, lightning=4, num_inference_steps=None, loras=[good, good, good])
    assert too_many["error"] == "loras: 4 adapters in this job with lightning; at most 3 allowed (MAX_LORAS)"
    outside = edit(worker, loras=[{"source": "/etc/hostname"}])
    assert outside["error"].startswith("loras[0].source: '/etc/hostname' is outside the folders LoRAs may be read from")
    missing_repo = edit(worker, loras=[{"source": "someone/not-cached-lora", "weight_name": "style.safetensors"}])
    hf_home = worker.settings.hf_home
    assert missing_repo["error"] == (
        f"loras[0].source: 'someone/not-cached-lora' is not in the Hugging Face cache at {hf_home}/hub, and jobs "
        f"never download from the hub; put it there with 'python tools/download_models.py --hf-home {hf_home} "
        "--only loras --lora someone/not-cached-lora/style.safetensors', or give an https:// or s3:// URL of the file")
    bare = edit(worker, loras=[{"source": "my_style.safetensors"}])
    assert bare["error"] == (
        f"loras[0].source: no file 'my_style.safetensors' in '{lora_dir}', where a relative path is read from (the "
        "first of LORA_ROOTS, which sets the folders LoRAs may be read from); give an absolute path on the volume, "
        "a repo id in the HF cache (owner/name), or an https:// or s3:// URL")
    lightning_repo = worker.settings.lightning_repo
    held = sorted(path.name for path in repo_folder(hf_home, lightning_repo).glob("snapshots/*/*.safetensors"))
    no_such_file = edit(worker, loras=[{"source": lightning_repo, "weight_name": "other.safetensors"}])
    assert no_such_file["error"] == (
        f"loras[0].source: '{lightning_repo}' has no file 'other.safetensors' in its cached snapshot (it holds "
        f"{', '.join(held[:5])}); fetch it with 'python tools/download_models.py --hf-home {hf_home} --only loras "
        f"--lora {lightning_repo}/other.safetensors'")
    base_url = lora_file_server.url
    not_found = edit(worker, loras=[{"source": f"{base_url}/nothing.safetensors?X-Amz-Signature=secret"}])
    assert not_found["error"] == f"loras[0].source: downloading '{base_url}/nothing.safetensors' failed: HTTP 404"
    small_cap = dataclasses.replace(worker, settings=dataclasses.replace(
        worker.settings, lora_max_download_bytes=1024, lora_cache_dir=tmp_path))
    too_big = edit(small_cap, loras=[{"source": f"{base_url}/tiny_lora_diffusers.safetensors"}])
    size = (lora_dir / "tiny_lora_diffusers.safetensors").stat().st_size
    assert too_big["error"] == (f"loras[0].source: '{base_url}/tiny_lora_diffusers.safetensors' is {size} bytes "
                                "(Content-Length), larger than 1024 bytes (LORA_MAX_DOWNLOAD_BYTES)")
    assert not list(tmp_path.iterdir())  # no partial file left behind
    decompose = worker.handle({"id": "x", "input": {"operation": "decompose", "image_base64": png_b64(sample_image()),
                                                    "loras": [good]}})
    assert decompose["error"].startswith("loras: not used by decompose")


def test_url_source_on_a_private_address_is_refused_before_connecting(worker, lora_file_server):
    """The session worker allows private URLs (its test servers are on loopback); a
    worker with the default policy, sharing the loaded pipelines, refuses them."""
    from src.serving.worker import Worker

    strict = Worker(settings=dataclasses.replace(worker.settings, allow_private_urls=False), host=worker.host,
                    price=worker.price, loras=worker.loras)
    before = lora_file_server.seen()
    refused = edit(strict, loras=[{"source": f"{lora_file_server.url}/tiny_lora_diffusers.safetensors?X-Amz-Signature=secret"}])
    assert refused["error"] == ("loras[0].source: host '127.0.0.1' resolves to 127.0.0.1, a loopback address; "
                                "set ALLOW_PRIVATE_URLS=true to allow it")
    assert lora_file_server.seen() == before  # not one connection
    assert pixels(edit(strict)) == pixels(edit(worker))  # the next job is served


def test_url_source_redirecting_to_a_private_address_is_refused_before_connecting(worker, lora_file_server):
    """A first hop the policy lets through (a deployment's own network, 127.0.0.2 here)
    that redirects to loopback: the redirect target is checked before any connection."""
    import ipaddress

    from src.serving.worker import Worker

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"{lora_file_server.url}/tiny_lora_diffusers.safetensors")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    first_hop = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Redirect)
    threading.Thread(target=first_hop.serve_forever, daemon=True).start()
    settings = dataclasses.replace(worker.settings, allow_private_urls=False,
                                   allowed_private_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    guarded = Worker(settings=settings, host=worker.host, price=worker.price, loras=worker.loras)
    before = lora_file_server.seen()
    try:
        refused = edit(guarded, loras=[{"source": f"http://127.0.0.2:{first_hop.server_port}/style.safetensors"}])
    finally:
        first_hop.shutdown()
    assert refused["error"].startswith("loras[0].source: ") and "redirects to" in refused["error"]
    assert "a loopback address; set ALLOW_PRIVATE_URLS=true to allow it" in refused["error"]
    assert lora_file_server.seen() == before


def test_lora_job_through_the_local_api(api, lora_dir):
    reply = requests.post(f"{api.url}/runsync", timeout=600, json={"input": {
        "operation": "edit", "image_base64": png_b64(sample_image()), "prompt": "x", "lightning": 4,
        "loras": [{"source": str(lora_dir / "tiny_lora_aitoolkit.safetensors"), "scale": 0.7}],
        "width": 256, "height": 256}}).json()
    assert reply["status"] == "COMPLETED", reply
    assert reply["output"]["lightning"]["steps"] == 4 and reply["output"]["loras"][0]["scale"] == 0.7


# --- malformed LoRA files: refused before they touch the model -----------------------

FIRST_A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
FIRST_B = FIRST_A.replace("lora_A", "lora_B")


def _changed(tensors: dict, **replaced) -> dict:
    """The tiny diffusers LoRA with the first attention layer's A and/or B replaced (None: left out)."""
    changed = {**tensors, **{FIRST_A if part == "A" else FIRST_B: value for part, value in replaced.items()}}
    return {name: value.contiguous() for name, value in changed.items() if value is not None}


MALFORMED = {
    "ranks of A and B differ": (lambda a, b: dict(A=a[:2]), "lora_A has rank 2 and lora_B rank 4; they must agree"),
    "A of three dimensions": (lambda a, b: dict(A=a[None]), ".lora_A has 3 dimensions; LoRA factors are matrices (2)"),
    "B of one dimension": (lambda a, b: dict(B=b[:, 0]), ".lora_B has 1 dimensions; LoRA factors are matrices (2)"),
    "integer A": (lambda a, b: dict(A=a.to(torch.int32)), ".lora_A is int32; LoRA factors are float32, bfloat16"),
    "boolean B": (lambda a, b: dict(B=b > 0), ".lora_B is bool; LoRA factors are float32"),
    "A without B": (lambda a, b: dict(B=None), " has lora_A but no lora_B"),
    "B without A": (lambda a, b: dict(A=None), " has lora_B but no lora_A"),
    "rank 0": (lambda a, b: dict(A=a[:0], B=b[:, :0]), " has rank 0"),
    "NaN in B": (lambda a, b: dict(B=b * float("nan")), ".lora_B holds NaN or infinite values"),
    "infinity in A": (lambda a, b: dict(A=torch.where(a > 0, float("inf"), a)), ".lora_A holds NaN or infinite"),
    "A one feature too wide": (lambda a, b: dict(A=torch.cat([a, a[:, :1]], dim=1)), " takes 32 features, the LoRA 33"),
    "B one feature too tall": (lambda a, b: dict(B=torch.cat([b, b[:1]])), " gives 32 features, the LoRA 33"),
}


def _write_malformed(lora_dir: Path, folder: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_dir / "tiny_lora_diffusers.safetensors"))
    path = folder / f"{name.replace(' ', '-')}.safetensors"
    save_file(_changed(tensors, **MALFORMED[name][0](tensors[FIRST_A], tensors[FIRST_B])), str(path))
    return path


@pytest.fixture
def malformed(worker, lora_dir, tmp_path):
    """The session's worker with LORA_ROOTS at a folder of the malformed files."""
    for name in MALFORMED:
        _write_malformed(lora_dir, tmp_path, name)
    confined = dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, lora_roots=(tmp_path,)))
    return confined, tmp_path


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_lora_is_refused_naming_what_is_wrong(malformed, name):
    worker, folder = malformed
    started = time.perf_counter()
    out = edit(worker, loras=[{"source": f"{name.replace(' ', '-')}.safetensors"}])
    assert time.perf_counter() - started < 2.0
    error = out["error"]
    assert error.startswith(f"loras[0].source: '{name.replace(' ', '-')}.safetensors' does not fit "
                            "Qwen/Qwen-Image-Edit-2511: 1 of 14 layers do not match (first: "
                            "transformer_blocks.0.attn.to_q"), error
    assert MALFORMED[name][1] in error and len(error) < 300, error


def test_after_malformed_loras_the_next_job_sees_the_base_model(malformed, worker):
    """They are refused before any fuse or branch: the model is never touched."""
    confined, _ = malformed
    base = pixels(edit(worker))
    for name in MALFORMED:
        assert "error" in edit(confined, loras=[{"source": f"{name.replace(' ', '-')}.safetensors", "scale": 0.5}])
    assert pixels(edit(worker)) == base


# --- paths stay inside their roots ---------------------------------------------------

def _refusal(worker, source: str, **lora) -> str:
    """The error a job gets for this LoRA, with the source as echoed replaced by <source>."""
    from src.job.schema import echo

    out = edit(worker, "paths", loras=[{"source": source, **lora}])
    assert set(out) == {"error"}, out
    return out["error"].replace(echo(source), "<source>")


@pytest.fixture
def volume(worker, lora_dir, tmp_path):
    """A worker whose LORA_ROOTS is `root`, beside a folder `outside` holding a real LoRA;
    in the root, links to it, to a missing file next to it, and a real LoRA of its own."""
    import shutil

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    shutil.copy(lora_dir / "tiny_lora_diffusers.safetensors", outside / "real.safetensors")
    shutil.copy(lora_dir / "tiny_lora_diffusers.safetensors", root / "own.safetensors")
    (root / "to-real.safetensors").symlink_to(outside / "real.safetensors")
    (root / "to-missing.safetensors").symlink_to(outside / "missing.safetensors")
    (root / "alias.safetensors").symlink_to(root / "own.safetensors")
    (root / "outside-folder").symlink_to(outside)
    for folder, target in (("holds-real", "real"), ("holds-missing", "missing")):
        (root / folder).mkdir()
        (root / folder / "only.safetensors").symlink_to(outside / f"{target}.safetensors")
    confined = dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, lora_roots=(root,)))
    return confined, root, outside


@pytest.mark.parametrize("real, missing", [
    (("{outside}/real.safetensors", {}), ("{outside}/missing.safetensors", {})),
    (("../outside/real.safetensors", {}), ("../outside/missing.safetensors", {})),
    (("{root}/../outside/real.safetensors", {}), ("{root}/../outside/missing.safetensors", {})),
    (("to-real.safetensors", {}), ("to-missing.safetensors", {})),
    (("{root}/outside-folder/real.safetensors", {}), ("{root}/outside-folder/missing.safetensors", {})),
    (("outside-folder", {"weight_name": "real.safetensors"}),
     ("outside-folder", {"weight_name": "missing.safetensors"})),
    (("{root}", {"weight_name": "to-real.safetensors"}), ("{root}", {"weight_name": "to-missing.safetensors"})),
    (("holds-real", {}), ("holds-missing", {})),
], ids=["absolute", "relative climbing", "root then climbing", "link", "linked folder",
        "weight_name in a linked folder", "weight_name a link", "folder holding a link"])
def test_volume_paths_outside_lora_roots_are_refused_alike_whether_or_not_they_exist(volume, real, missing):
    worker, root, outside = volume
    errors = [_refusal(worker, source.format(root=root, outside=outside), **lora) for source, lora in (real, missing)]
    assert errors[0] == errors[1] == (f"loras[0].source: <source> is outside the folders LoRAs may be read from "
                                      f"({root}; LORA_ROOTS)")


def _resolved(worker, source: str, weight_name: str | None = None):
    """The file a LoRA source resolves to under the worker's settings (no inference)."""
    from src.models.lora.sources import LoraCache, http_limits, resolve

    settings = worker.settings
    cache = LoraCache(settings.lora_cache_dir, settings.lora_cache_max_bytes, settings.lora_cache_max_files,
                      settings.lora_max_download_bytes)
    return resolve(source, weight_name, "loras[0].source", roots=settings.lora_roots, hf_home=settings.hf_home,
                   cache=cache, policy=settings.address_policy, limits=http_limits(1, 1.0, 1.0))


def test_links_and_folders_inside_lora_roots_are_served(volume):
    worker, root, _ = volume
    own = _resolved(worker, str(root / "own.safetensors"))
    for source in ("alias.safetensors", f"{root}/holds-real/../own.safetensors", "./own.safetensors"):
        assert _resolved(worker, source).path == own.path == root / "own.safetensors"
    from src.job.schema import echo

    missing = edit(worker, loras=[{"source": "nothing-here.safetensors"}])["error"]
    assert missing.startswith(f"loras[0].source: no file {echo('nothing-here.safetensors')} in {str(root)!r}")


@pytest.fixture
def hub(worker, lora_dir, tmp_path):
    """A worker whose HF cache holds repos owner/style (a LoRA by its blob, also in a
    subfolder, and links leading out) and owner/other, made as huggingface_hub lays them out."""
    import shutil

    hf_home, outside = tmp_path / "hf", tmp_path / "outside"
    outside.mkdir()
    shutil.copy(lora_dir / "tiny_lora_diffusers.safetensors", outside / "real.safetensors")
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshots = {}
    for repo in ("owner/style", "owner/other"):
        write_ref(hf_home, repo, revision)
        blobs = repo_folder(hf_home, repo) / "blobs"
        blobs.mkdir()
        blob = blobs / hashlib.sha256(repo.encode()).hexdigest()
        shutil.copy(lora_dir / "tiny_lora_diffusers.safetensors", blob)
        snapshot = snapshot_dir(hf_home, repo, revision)
        (snapshot / "sub").mkdir(parents=True)
        (snapshot / "style.safetensors").symlink_to(Path("..", "..", "blobs", blob.name))
        (snapshot / "sub" / "style.safetensors").symlink_to(Path("..", "..", "..", "blobs", blob.name))
        (snapshot / "to-real.safetensors").symlink_to(outside / "real.safetensors")
        (snapshot / "to-missing.safetensors").symlink_to(outside / "missing.safetensors")
        snapshots[repo] = snapshot
    (snapshots["owner/style"] / "to-other-repo.safetensors").symlink_to(
        next((snapshots["owner/other"].parent.parent / "blobs").iterdir()))
    cached = dataclasses.replace(worker, settings=dataclasses.replace(worker.settings, hf_home=hf_home))
    return cached, snapshots


def test_a_repo_weight_name_is_read_from_its_snapshot_subfolders_included(hub, lora_dir):
    worker, snapshots = hub
    expected = hashlib.sha256((lora_dir / "tiny_lora_diffusers.safetensors").read_bytes()).hexdigest()
    for weight_name in ("style.safetensors", "sub/style.safetensors"):
        file = _resolved(worker, "owner/style", weight_name)
        assert file.path == snapshots["owner/style"] / weight_name and file.sha256 == expected
    out = edit(worker, loras=[{"source": "owner/style", "weight_name": "sub/style.safetensors"}])
    assert out["loras"][0]["file"] == "style.safetensors" and out["loras"][0]["sha256"] == expected


@pytest.mark.parametrize("weight_name", ["to-real.safetensors", "to-missing.safetensors", "to-other-repo.safetensors"])
def test_a_repo_weight_name_leading_out_of_its_snapshot_is_refused_alike(hub, weight_name):
    worker, _ = hub
    assert _refusal(worker, "owner/style", weight_name=weight_name) == (
        f"loras[0].source: <source>: '{weight_name}' leads outside the repo's cached snapshot")


def test_a_weight_name_climbing_out_is_refused_by_the_schema(worker):
    for weight_name in ("../../../../../../etc/hostname", "../../../../../../etc/no-such-file"):
        out = edit(worker, loras=[{"source": "lightx2v/Qwen-Image-Edit-2511-Lightning", "weight_name": weight_name}])
        assert out["error"] == ("loras[0].weight_name: a file inside the source's folder or snapshot: no '..', '.' "
                                f"or empty parts; got '{weight_name}'")
