"""WEIGHTS_PREFETCH (src/models/files/tensors.py): which filesystems count as network storage (`auto`),
and a start that reads ahead reads every weight file the worker loads, and only those."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.models.files import tensors as weights
from src.models.host import ModelHost
from src.plumbing.config import Settings

MOUNTS = """overlay / overlay rw,relatime 0 0
/dev/nvme0n1p1 /workspace ext4 rw 0 0
mfs#eu-ro-1.runpod.net:9421 /runpod-volume fuse rw,nosuid 0 0
server:/export /mnt/nfs nfs4 rw 0 0
juicefs /mnt/jfs fuse.juicefs rw 0 0
/dev/sdb /mnt/nfs/local ext4 rw 0 0
/dev/sdc /mnt/with\\040space xfs rw 0 0
"""


@pytest.mark.parametrize("path, filesystem, network", [
    ("/runpod-volume/huggingface-cache", "fuse", True),
    ("/mnt/nfs/models", "nfs4", True),
    ("/mnt/jfs/hub", "fuse.juicefs", True),
    ("/mnt/nfs/local/hub", "ext4", False),  # the longest mount point wins
    ("/mnt/with space/hub", "xfs", False),
    ("/workspace/hf", "ext4", False),
    ("/root/.cache/huggingface", "overlay", False),
])
def test_filesystem_of_a_path(path, filesystem, network):
    assert weights.filesystem_of(Path(path), MOUNTS) == filesystem
    assert weights.is_network(filesystem) is network
    assert weights.should_prefetch("auto", Path(path), MOUNTS) is network


def test_on_and_off_override_the_filesystem():
    assert weights.should_prefetch("on", Path("/workspace/hf"), MOUNTS)
    assert not weights.should_prefetch("off", Path("/runpod-volume/hub"), MOUNTS)


def test_a_prefetching_start_reads_the_files_it_loads(hf_home):
    settings = Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cpu", "WEIGHTS_PREFETCH": "on",
                                  "PRELOAD": "edit,layered"})
    host = ModelHost(settings)
    host.load()
    edit_files = weights.weight_files(host.edit_ref.path)
    layered_files = weights.weight_files(host.layered_ref.path / "transformer", host.layered_ref.path / "vae")
    assert {path.name for path in edit_files} >= {"diffusion_pytorch_model.safetensors", "model.safetensors"}
    assert [(report["files"], report["bytes"]) for report in host.prefetched] == [
        (len(files), sum(path.stat().st_size for path in files)) for files in (edit_files, layered_files)]
    # Layered's own text encoder, which the worker never loads, is not read.
    assert all("text_encoder" not in path.parts for path in layered_files)


def test_auto_reads_nothing_ahead_off_network_storage(hf_home):
    if weights.should_prefetch("auto", hf_home):
        pytest.skip(f"{hf_home} is on network storage here")
    host = ModelHost(Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cpu", "WEIGHTS_PREFETCH": "auto"}))
    host.load()
    assert host.prefetched == []


def test_the_default_reads_ahead_on_any_storage(hf_home):
    """On the H100's local disk the read-ahead took the cold start from 1.28x to 1.15x a
    plain read (docs/performance.md), so it is on unless turned off."""
    host = ModelHost(Settings.from_env({"HF_HOME": str(hf_home), "DEVICE": "cpu"}))
    host.load()
    edit_files = weights.weight_files(host.edit_ref.path)
    assert [report["bytes"] for report in host.prefetched] == [sum(path.stat().st_size for path in edit_files)]
