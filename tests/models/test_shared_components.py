"""src/models/files/shared_components.py and tools/download_models.py's plan: Layered borrows the edit model's
text encoder, tokenizer and processor only where they are the same files, by the hashes the hub
reports, read from hub metadata or from a snapshot's links into blobs/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from huggingface_hub.utils import filter_repo_objects

from src.models.files.shared_components import (SHARED_COMPONENTS, compare_components, hub_file_hashes, own_components,
                                          snapshot_file_hashes)
from src.models.files.snapshots import main_snapshot, repo_folder
from tools.download_models import (borrowed_patterns, comparison_lines, needs_comparison, parse_args,
                                   plan)

EDIT_REPO = "Qwen/Qwen-Image-Edit-2511"
LAYERED_REPO = "Qwen/Qwen-Image-Layered"

# The shared folders of a pipeline repo, small: path in the repo -> content.
PIPELINE_FILES = {
    "text_encoder/config.json": b'{"hidden_size": 8}',
    "text_encoder/model.safetensors": b"weights of the text encoder",
    "tokenizer/vocab.json": b'{"a": 0}',
    "tokenizer/merges.txt": b"#version: 0.2\n",
    "processor/preprocessor_config.json": b'{"patch_size": 14}',
    "processor/tokenizer.json": b'{"model": {}}',
    "transformer/config.json": b'{"num_layers": 2}',
}
LFS_FILES = {"text_encoder/model.safetensors"}


def write_plain_snapshot(snapshot: Path, files: dict[str, bytes]) -> Path:
    """Plain files, as tools/make_tiny_models.py writes them."""
    for path, content in files.items():
        (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / path).write_bytes(content)
    return snapshot


def write_cache_snapshot(repo_dir: Path, files: dict[str, str], blob_content: bytes = b"") -> Path:
    """The hub cache's layout for {path: hash}: blobs/<hash>, and snapshots/<rev>/<path> a relative
    link to ../../blobs/<hash> (one ../ more per folder level), as huggingface_hub writes it."""
    snapshot = repo_dir / "snapshots" / "0123abcd"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path, file_hash in files.items():
        (repo_dir / "blobs" / file_hash).write_bytes(blob_content)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(path).parts) + 1), "blobs", file_hash))
    return snapshot


def hub_hash(path: str, content: bytes) -> str:
    """The hash the hub reports: sha256 for LFS files, the git blob id for the others."""
    if path in LFS_FILES:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def siblings(files: dict[str, bytes]) -> list[RepoSibling]:
    """What HfApi().model_info(repo, files_metadata=True).siblings holds for these files."""
    result = []
    for path, content in files.items():
        lfs = (BlobLfsInfo(size=len(content), sha256=hub_hash(path, content), pointer_size=134)
               if path in LFS_FILES else None)
        # An LFS file's git blob id is that of its pointer file, not of its content.
        blob_id = hub_hash("pointer", b"pointer " + content) if lfs else hub_hash(path, content)
        result.append(RepoSibling(rfilename=path, size=len(content), blob_id=blob_id, lfs=lfs))
    return result


def listing(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hub_hash(path, content) for path, content in files.items()}


def with_changed_processor_config(files: dict[str, bytes]) -> dict[str, bytes]:
    return {**files, "processor/preprocessor_config.json": b'{"patch_size": 16}'}


# -- local snapshots, plain files ------------------------------------------------------------------


def test_identical_plain_folders_are_borrowed(tmp_path):
    edit = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    layered = write_plain_snapshot(tmp_path / "layered", PIPELINE_FILES)
    assert own_components(edit, layered) == ()


def test_a_differing_processor_config_makes_processor_layereds_own(tmp_path):
    edit = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    layered = write_plain_snapshot(tmp_path / "layered", with_changed_processor_config(PIPELINE_FILES))
    assert own_components(edit, layered) == ("processor",)


def test_a_file_only_layered_holds_makes_the_folder_its_own(tmp_path):
    edit = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    layered = write_plain_snapshot(tmp_path / "layered", {**PIPELINE_FILES, "tokenizer/added_tokens.json": b"{}"})
    assert own_components(edit, layered) == ("tokenizer",)


def test_a_file_layered_lacks_makes_the_folder_its_own(tmp_path):
    edit = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    layered = write_plain_snapshot(tmp_path / "layered",
                                   {p: c for p, c in PIPELINE_FILES.items() if p != "tokenizer/merges.txt"})
    assert own_components(edit, layered) == ("tokenizer",)


def test_folders_layered_does_not_hold_are_borrowed(tmp_path):
    edit = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    layered = write_plain_snapshot(tmp_path / "layered", {"transformer/config.json": b'{"num_layers": 9}'})
    (layered / "processor").mkdir()  # an empty folder holds nothing of Layered's own either
    assert own_components(edit, layered) == ()


def test_differences_outside_the_shared_folders_do_not_count(tmp_path):
    edit = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    layered = write_plain_snapshot(tmp_path / "layered", {**PIPELINE_FILES, "transformer/config.json": b"other"})
    assert own_components(edit, layered) == ()


def test_snapshot_file_hashes_are_the_repo_paths_and_content_sha256_for_plain_files(tmp_path):
    snapshot = write_plain_snapshot(tmp_path / "edit", PIPELINE_FILES)
    assert snapshot_file_hashes(snapshot, "tokenizer") == {
        "tokenizer/merges.txt": hashlib.sha256(b"#version: 0.2\n").hexdigest(),
        "tokenizer/vocab.json": hashlib.sha256(b'{"a": 0}').hexdigest(),
    }
    assert snapshot_file_hashes(snapshot, "nothing_here") == {}


# -- local snapshots, hub-cache layout -------------------------------------------------------------


def test_same_blob_names_are_borrowed_without_reading_the_blobs(tmp_path):
    hashes = listing(PIPELINE_FILES)
    # Blob contents unlike each other and unlike their names: only the names can make these equal.
    edit = write_cache_snapshot(tmp_path / "models--edit", hashes, blob_content=b"edit's bytes")
    layered = write_cache_snapshot(tmp_path / "models--layered", hashes, blob_content=b"layered's bytes")
    assert (edit / "text_encoder" / "model.safetensors").read_bytes() != \
        (layered / "text_encoder" / "model.safetensors").read_bytes()
    assert own_components(edit, layered) == ()


def test_a_differing_blob_name_makes_the_folder_layereds_own_even_with_equal_bytes(tmp_path):
    edit = write_cache_snapshot(tmp_path / "models--edit", listing(PIPELINE_FILES))
    layered = write_cache_snapshot(tmp_path / "models--layered",
                                   listing(with_changed_processor_config(PIPELINE_FILES)))
    assert own_components(edit, layered) == ("processor",)


def test_links_whose_blobs_are_gone_are_still_compared_by_name(tmp_path):
    hashes = listing(PIPELINE_FILES)
    edit = write_cache_snapshot(tmp_path / "models--edit", hashes)
    layered = write_cache_snapshot(tmp_path / "models--layered", hashes)
    for blob in (tmp_path / "models--layered" / "blobs").iterdir():
        blob.unlink()
    assert snapshot_file_hashes(layered, "text_encoder") == {
        "text_encoder/config.json": hashes["text_encoder/config.json"],
        "text_encoder/model.safetensors": hashes["text_encoder/model.safetensors"]}
    assert own_components(edit, layered) == ()


def test_a_snapshot_names_its_files_with_the_hubs_hashes(tmp_path):
    """The link's blob name and hub_file_hashes agree: one identity, read from either side."""
    snapshot = write_cache_snapshot(tmp_path / "models--edit", listing(PIPELINE_FILES))
    from_hub = hub_file_hashes(siblings(PIPELINE_FILES))
    for component in SHARED_COMPONENTS:
        local = snapshot_file_hashes(snapshot, component)
        assert local and local == {p: h for p, h in from_hub.items() if p.startswith(f"{component}/")}


def test_the_tiny_models_share_their_text_encoder_tokenizer_and_processor(hf_home):
    edit, layered = main_snapshot(hf_home, EDIT_REPO), main_snapshot(hf_home, LAYERED_REPO)
    assert all(snapshot_file_hashes(layered, component) for component in SHARED_COMPONENTS)
    assert own_components(edit, layered) == ()


# -- hub metadata ----------------------------------------------------------------------------------


def test_hub_file_hashes_take_the_lfs_sha256_else_the_git_blob_id():
    hashes = hub_file_hashes(siblings(PIPELINE_FILES))
    assert hashes["text_encoder/model.safetensors"] == hashlib.sha256(b"weights of the text encoder").hexdigest()
    assert hashes["tokenizer/vocab.json"] == hashlib.sha1(b'blob 8\0{"a": 0}').hexdigest()
    assert set(hashes) == set(PIPELINE_FILES)


def test_hub_file_hashes_refuse_a_listing_without_file_metadata():
    names_only = [RepoSibling(rfilename="processor/preprocessor_config.json")]
    with pytest.raises(ValueError, match="processor/preprocessor_config.json.*files_metadata=True"):
        hub_file_hashes(names_only)


def test_compare_components_on_the_hubs_listings():
    edit = hub_file_hashes(siblings(PIPELINE_FILES))
    same = hub_file_hashes(siblings({**PIPELINE_FILES, "transformer/config.json": b"other"}))
    assert compare_components(edit, same) == {"text_encoder": (), "tokenizer": (), "processor": ()}

    changed = hub_file_hashes(siblings(with_changed_processor_config(PIPELINE_FILES)))
    assert compare_components(edit, changed) == {"text_encoder": (), "tokenizer": (),
                                                 "processor": ("processor/preprocessor_config.json",)}

    new_weights = {**PIPELINE_FILES, "text_encoder/model.safetensors": b"other weights",
                   "text_encoder/model-2.safetensors": b"more"}
    assert compare_components(edit, hub_file_hashes(siblings(new_weights)))["text_encoder"] == (
        "text_encoder/model-2.safetensors", "text_encoder/model.safetensors")


def test_compare_components_leaves_out_folders_layered_does_not_hold():
    edit = listing(PIPELINE_FILES)
    layered = listing({"transformer/config.json": b"x", "tokenizer/vocab.json": b'{"a": 0}'})
    assert compare_components(edit, layered) == {"tokenizer": ("tokenizer/merges.txt",)}


def test_what_the_hub_comparison_downloads_is_what_the_worker_then_loads(tmp_path):
    """download_models skips the folders the hub shows the same; in the snapshot it leaves, the
    worker finds exactly the others to be Layered's own."""
    layered_files = with_changed_processor_config(PIPELINE_FILES)
    comparison = compare_components(hub_file_hashes(siblings(PIPELINE_FILES)), hub_file_hashes(siblings(layered_files)))
    kept = set(filter_repo_objects(layered_files, ignore_patterns=list(borrowed_patterns(comparison))))
    edit = write_cache_snapshot(tmp_path / "models--edit", listing(PIPELINE_FILES))
    layered = write_cache_snapshot(tmp_path / "models--layered",
                                   {path: h for path, h in listing(layered_files).items() if path in kept})
    assert own_components(edit, layered) == ("processor",)
    assert not (layered / "text_encoder").exists()


# -- tools/download_models.py ----------------------------------------------------------------------


def args_for(*argv: str):
    return parse_args(list(argv), env={})


def layered_skip(downloads) -> tuple[str, ...]:
    return next(item.ignore_patterns for item in downloads if item.name == "layered")


SOME_DIFFER = {"text_encoder": (), "tokenizer": (), "processor": ("processor/preprocessor_config.json",)}


def test_the_comparison_is_needed_whenever_layered_is_downloaded_not_whole():
    assert needs_comparison(args_for())
    assert needs_comparison(args_for("--only", "layered"))
    assert not needs_comparison(args_for("--only", "edit"))
    assert not needs_comparison(args_for("--full"))
    assert needs_comparison(args_for("--dry-run"))


def test_plan_skips_only_the_folders_with_the_same_files():
    downloads = plan(args_for(), SOME_DIFFER)
    assert [(item.name, item.repo_id) for item in downloads] == [("edit", EDIT_REPO), ("layered", LAYERED_REPO)]
    assert layered_skip(downloads) == ("text_encoder/*", "tokenizer/*")
    assert layered_skip(plan(args_for("--only", "layered"), SOME_DIFFER)) == ("text_encoder/*", "tokenizer/*")


def test_plan_skips_all_three_when_all_are_the_same_and_none_when_all_differ():
    all_same = {component: () for component in SHARED_COMPONENTS}
    assert layered_skip(plan(args_for(), all_same)) == ("text_encoder/*", "tokenizer/*", "processor/*")
    all_differ = {component: (f"{component}/x",) for component in SHARED_COMPONENTS}
    assert layered_skip(plan(args_for(), all_differ)) == ()


def test_plan_downloads_everything_of_layered_when_nothing_was_compared_or_full():
    assert layered_skip(plan(args_for(), {})) == ()
    all_same = {component: () for component in SHARED_COMPONENTS}
    assert layered_skip(plan(args_for("--full"), all_same)) == ()


def test_plan_for_the_edit_model_alone():
    assert plan(args_for("--only", "edit"), {}) == plan(args_for("--only", "edit"), SOME_DIFFER)
    assert [item.name for item in plan(args_for("--only", "edit"), {})] == ["edit"]
    assert plan(args_for("--only", "edit"), {})[0].ignore_patterns == ()


def test_the_skip_patterns_take_nested_files_and_leave_the_rest():
    kept = set(filter_repo_objects([*PIPELINE_FILES, "text_encoder/sub/deep.bin", "model_index.json"],
                                   ignore_patterns=list(borrowed_patterns(SOME_DIFFER))))
    assert kept == {"processor/preprocessor_config.json", "processor/tokenizer.json",
                    "transformer/config.json", "model_index.json"}


def test_comparison_lines_say_borrowed_or_downloaded_per_folder():
    lines = comparison_lines({"text_encoder": (), "processor": ("processor/a", "processor/b")},
                             EDIT_REPO, LAYERED_REPO)
    assert lines == [
        f"layered  text_encoder/: same files as {EDIT_REPO}: borrowed",
        f"layered  tokenizer/: not in {LAYERED_REPO}: borrowed",
        f"layered  processor/: differs from {EDIT_REPO} (2 files differ): downloading Layered's own",
    ]
    one = comparison_lines({"tokenizer": ("tokenizer/vocab.json",)}, EDIT_REPO, LAYERED_REPO)
    assert "(1 file differs)" in one[1]


def test_the_siblings_stand_in_is_what_model_info_builds():
    """siblings() above mirrors huggingface_hub's ModelInfo parsing of files_metadata=True."""
    from huggingface_hub.hf_api import ModelInfo
    info = ModelInfo(id=EDIT_REPO, siblings=[
        {"rfilename": "text_encoder/model.safetensors", "size": 27, "blobId": "ab" * 20,
         "lfs": {"size": 27, "sha256": "cd" * 32, "pointerSize": 134}},
        {"rfilename": "tokenizer/vocab.json", "size": 8, "blobId": "ef" * 20},
    ])
    assert hub_file_hashes(info.siblings) == {"text_encoder/model.safetensors": "cd" * 32,
                                              "tokenizer/vocab.json": "ef" * 20}


def test_the_worker_loads_layereds_own_processor_when_its_files_differ(hf_home, tmp_path):
    """A copy of the tiny cache whose Layered processor asks for fewer image pixels: the
    worker's Layered pipeline takes that processor and still borrows the text encoder."""
    import json
    import shutil

    from src.models.host import ModelHost
    from src.plumbing.config import Settings

    copy = tmp_path / "hf"
    shutil.copytree(hf_home / "hub", copy / "hub", symlinks=True)
    layered = main_snapshot(copy, LAYERED_REPO)
    config_path = layered / "processor" / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["max_pixels"] = config["min_pixels"]
    config_path.unlink()  # a link into blobs/ in a real cache: replace it, never write through it
    config_path.write_text(json.dumps(config))

    host = ModelHost(Settings.from_env({"HF_HOME": str(copy), "HF_HUB_OFFLINE": "1", "DEVICE": "cpu",
                                         "WEIGHTS_PREFETCH": "off"}))
    host.load()
    pipeline = host.layered()
    assert host.layered_own_components == ("processor",)
    assert pipeline.processor is not host.edit.processor
    assert pipeline.processor.image_processor.size["longest_edge"] == config["min_pixels"]
    assert pipeline.text_encoder is host.edit.text_encoder and pipeline.tokenizer is host.edit.tokenizer


def test_a_layered_snapshot_without_its_borrowed_folders_loads_despite_the_caches_listing(hf_home, tmp_path):
    """A volume filled by an earlier download tool: Layered without the folders it borrows,
    and huggingface_hub's listing of the whole repo beside it (`trees/<commit>.json`), which
    makes its offline lookup call the snapshot incomplete. The worker uses it all the same."""
    import shutil

    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from src.models.host import ModelHost
    from src.models.files.tensors import locate
    from src.plumbing.config import Settings

    copy = tmp_path / "hf"
    shutil.copytree(hf_home / "hub", copy / "hub", symlinks=True)
    repo = repo_folder(copy, LAYERED_REPO)
    snapshot = main_snapshot(copy, LAYERED_REPO)
    listing = {path.relative_to(snapshot).as_posix(): TreeCacheEntry(size=1, blob_id="0" * 40)
               for path in snapshot.rglob("*") if path.is_file()}
    write_tree_cache(str(repo), snapshot.name, listing)
    for folder in SHARED_COMPONENTS:
        shutil.rmtree(snapshot / folder, ignore_errors=True)

    assert locate("Qwen/Qwen-Image-Layered", copy).path == snapshot
    host = ModelHost(Settings.from_env({"HF_HOME": str(copy), "HF_HUB_OFFLINE": "1", "DEVICE": "cpu",
                                         "WEIGHTS_PREFETCH": "off", "PRELOAD": "edit,layered"}))
    host.load()
    assert host.layered().text_encoder is host.edit.text_encoder
