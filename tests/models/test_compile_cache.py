"""The compile cache's file handling (src/models/compile_cache.py): keyed by the setup,
written whole or not at all, and a file that does not check out ignored (the start then
compiles) instead of failing the start. torch's own save and load run for real; what they
carry is measured on the GPU (tools/start_bench.py)."""

from __future__ import annotations

import logging
import threading

import pytest

from src.models import compile_cache
from src.models.compile_cache import CacheKey, CorruptCache
from src.plumbing.config import Settings


def key(**changes) -> CacheKey:
    fields = {"gpu": "NVIDIA H200", "capability": (9, 0), "models": ["Qwen/Qwen-Image-Edit-2511@abc"],
              "settings": {"quantize": "fp8", "attention_backend": "sdpa"}, **changes}
    return CacheKey.for_setup(**fields)


def test_the_key_changes_with_whatever_changes_the_compiled_code():
    base = key()
    assert key().digest == base.digest  # the same setup finds its file
    others = [key(gpu="NVIDIA A100-SXM4-80GB"), key(capability=(8, 0)),
              key(models=["Qwen/Qwen-Image-Edit-2511@def"]),
              key(settings={"quantize": "none", "attention_backend": "sdpa"}),
              CacheKey({**base.fields, "torch": "2.12.0"}), CacheKey({**base.fields, "triton": "3.7.0"})]
    assert len({other.digest for other in others} | {base.digest}) == len(others) + 1
    assert base.fields["torch"] and "diffusers" in base.fields and "cuda" in base.fields


def test_a_file_reads_back_only_whole_and_for_its_own_key(tmp_path):
    path = key().path_in(tmp_path)
    compile_cache.write_file(path, key(), b"payload" * 1000)
    assert compile_cache.read_file(path, key()) == b"payload" * 1000
    with pytest.raises(CorruptCache, match="another setup"):
        compile_cache.read_file(path, key(gpu="NVIDIA L40S"))
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # cut short
    with pytest.raises(CorruptCache, match="damaged"):
        compile_cache.read_file(path, key())
    path.write_bytes(data[:-1] + b"X")  # one byte changed
    with pytest.raises(CorruptCache, match="damaged"):
        compile_cache.read_file(path, key())
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CorruptCache, match="header"):
        compile_cache.read_file(path, key())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_two_writers_at_once_leave_one_whole_file(tmp_path):
    path = key().path_in(tmp_path)
    payloads = [bytes([n]) * 3_000_000 for n in range(6)]
    threads = [threading.Thread(target=compile_cache.write_file, args=(path, key(), payload)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert compile_cache.read_file(path, key()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_bad_file_is_ignored_with_one_line_and_the_start_compiles(tmp_path, caplog):
    assert compile_cache.load(tmp_path, key()) == "cold"  # none yet
    path = key().path_in(tmp_path)
    path.write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING, logger="src.models.compile_cache"):
        assert compile_cache.load(tmp_path, key()) == "cold"
    assert len(caplog.records) == 1 and "ignored" in caplog.records[0].getMessage()
    caplog.clear()
    compile_cache.write_file(path, key(), b"checks out, but is no torch artifact")
    with caplog.at_level(logging.WARNING, logger="src.models.compile_cache"):
        assert compile_cache.load(tmp_path, key()) == "cold"
    ours = [record for record in caplog.records if record.name == "src.models.compile_cache"]
    assert len(ours) == 1 and "torch could not load it" in ours[0].getMessage()


def test_an_unwritable_folder_does_not_fail_the_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    assert compile_cache.save(blocker / "cache", key()) is False  # nothing compiled, or not writable: no raise


def test_the_folder_defaults_under_hf_home_and_can_be_turned_off(tmp_path):
    assert Settings.from_env({"HF_HOME": str(tmp_path)}).compile_cache_dir == tmp_path / "torch-compile-cache"
    assert Settings.from_env({"HF_HOME": str(tmp_path), "COMPILE_CACHE_DIR": "/volume/cc"}).compile_cache_dir \
        .as_posix() == "/volume/cc"
    assert Settings.from_env({"HF_HOME": str(tmp_path), "COMPILE_CACHE_DIR": "off"}).compile_cache_dir is None
