"""The import rule of docs/architecture.md, on every module under src/ (read with ast, nothing
imported): each package imports only from itself and the packages below it, and no module
imports itself back through others. Imports inside functions and under TYPE_CHECKING count
too: moving an import into a function hides a cycle from Python at import time, not from this
test. The table in docs/architecture.md names every module of every package, and no doc or
comment names a module by its old flat path (src/worker.py, src.worker)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
# Bottom to top: a package may import from those before it, never from those after it.
LAYERS = ("job", "plumbing", "models", "serving")

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
                     modules: set[str]) -> set[str]:
    """The modules of ours that one import statement names (`from src.models.fp8 import linear` names
    src.models.fp8.linear; `from src.models.fp8.linear import Fp8Linear` names src.models.fp8.linear)."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return {base for base in bases if base in modules}
    if node.level:  # relative: from the importer's package, one level up per extra dot
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    named = {f"{base}.{alias.name}" for alias in node.names} & modules
    return named or ({base} & modules)


def import_graph(root: Path) -> Graph:
    """Each module under `root` (a package folder) and the modules of `root` it imports."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    modules = set(paths)
    graph: Graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= imported_modules(node, name, is_package, modules) - {name}
    return graph


def package_of(module: str) -> str | None:
    """The layer package of `src.<package>.<module>`; None for src itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: Graph, layers: tuple[str, ...]) -> list[str]:
    """Each import from a package into one above it (or outside the layers), as 'a -> b'."""
    rank = {package: index for index, package in enumerate(layers)}
    wrong = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            low, high = package_of(importer), package_of(target)
            if high is None:
                continue  # the root package src holds nothing
            if low not in rank or high not in rank or rank[high] > rank[low]:
                wrong.append(f"{importer} -> {target}")
    return wrong


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all below it are
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def documented_modules(text: str) -> dict[str, set[str]]:
    """docs/architecture.md's table of modules: package -> its modules with a row."""
    documented: dict[str, set[str]] = {}
    for package, module in re.findall(r"^\| `src/(\w+)/([\w/]+)\.py` \|", text, flags=re.M):
        documented.setdefault(package, set()).add(module)
    return documented


# ----------------------------------------------------------------------------
# The rule on src/.

def test_every_module_lives_in_a_layer_package():
    loose = [path.name for path in SRC.glob("*.py") if path.name != "__init__.py"]
    assert not loose, f"modules directly in src/: {loose}; put each in one of {LAYERS}"
    assert sorted(folder.name for folder in SRC.iterdir() if folder.is_dir() and folder.name != "__pycache__") \
        == sorted(LAYERS)


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph(SRC), LAYERS) == []


def test_no_module_imports_itself_back():
    assert find_cycle(import_graph(SRC)) is None


def test_the_architecture_note_names_every_module():
    on_disk = {package: {path.relative_to(SRC / package).with_suffix("").as_posix()
                         for path in (SRC / package).rglob("*.py") if path.stem != "__init__"}
               for package in LAYERS}
    assert documented_modules(ARCHITECTURE.read_text()) == on_disk


# Text that names files and modules: docs, comments, docstrings, deploy files.
TEXT_FILES = ["README.md", "handler.py", "runpod.toml", "Dockerfile", "Makefile", ".runpod/hub.json",
              "docs/*.md", "src/**/*.py", "tests/**/*.py", "tools/*.py"]


def flat_names(text: str, modules: set[str], tests: set[str]) -> set[str]:
    """Where `text` names one of our modules or tests by its place in the flat layout
    (src/worker.py, src.worker, tests/test_worker.py), which no longer exists."""
    paths = {f"src/{name}.py" for name in re.findall(r"\bsrc/(\w+)\.py\b", text) if name in modules}
    dotted = {f"src.{name}" for name in re.findall(r"\bsrc\.(\w+)\b", text) if name in modules}
    test_paths = {f"tests/{name}.py" for name in re.findall(r"\btests/(\w+)\.py\b", text) if name in tests}
    return paths | dotted | test_paths


def named_paths_missing(text: str) -> set[str]:
    """The `src/<package>/….py` paths and `src.<package>.<module>` names in `text` that name no module
    on disk (a module moved into a sub-package, say src/models/fp8_cache.py after it became fp8/cache.py)."""
    layers = "|".join(LAYERS)
    paths = {path for path in re.findall(rf"(?<![\w/])src/(?:{layers})/[\w/]+\.py\b", text)
             if not (REPO_ROOT / path).is_file()}
    dotted = {f"src.{package}.{module}" for package, module in re.findall(r"\bsrc\.(\w+)\.(\w+)\b", text)
              if package in LAYERS and not (SRC / package / f"{module}.py").is_file()
              and not (SRC / package / module / "__init__.py").is_file()}
    return paths | dotted


def test_no_text_names_a_module_that_is_not_there():
    missing = {}
    for pattern in TEXT_FILES:
        for path in sorted(REPO_ROOT.glob(pattern)):
            if path.is_file() and path != Path(__file__).resolve() and "__pycache__" not in path.parts:
                if names := named_paths_missing(path.read_text()):
                    missing[str(path.relative_to(REPO_ROOT))] = sorted(names)
    assert missing == {}, "name each module where it lives now"


def test_no_text_names_a_module_by_its_flat_path():
    modules = {path.stem for path in SRC.glob("*/*.py") if path.stem != "__init__"}
    tests = {path.stem for path in (REPO_ROOT / "tests").glob("*/test_*.py")}
    stale = {}
    for pattern in TEXT_FILES:
        for path in sorted(REPO_ROOT.glob(pattern)):
            if path.is_file() and path != Path(__file__).resolve() and "__pycache__" not in path.parts:
                if names := flat_names(path.read_text(), modules, tests):
                    stale[str(path.relative_to(REPO_ROOT))] = sorted(names)
    assert stale == {}, "name them by their package (src/<package>/<module>.py, tests/<package>/...)"


# ----------------------------------------------------------------------------
# The checks themselves fail where they should: on the flat layout's cycles (issue 17) and
# on a graph written out as files.

FLAT_LAYOUT_CYCLES = {  # src/ before the packages, the five modules of the two cycles
    "src.worker": {"src.pipelines"},
    "src.pipelines": {"src.loras", "src.parallel"},
    "src.loras": {"src.lora_sources"},
    "src.lora_sources": {"src.pipelines"},
    "src.parallel": {"src.worker"},
}


def test_find_cycle_finds_the_flat_layouts_cycles():
    cycle = find_cycle(FLAT_LAYOUT_CYCLES)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert all(b in FLAT_LAYOUT_CYCLES[a] for a, b in zip(cycle, cycle[1:]))
    # Either cycle alone is found too.
    for cut in (("src.loras", "src.lora_sources"), ("src.parallel", "src.worker")):
        graph = {module: targets - {cut[1]} if module == cut[0] else targets
                 for module, targets in FLAT_LAYOUT_CYCLES.items()}
        assert find_cycle(graph) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "src"


@pytest.mark.parametrize("files, cycle, upward", [
    pytest.param({"__init__.py": "", "job/__init__.py": "", "job/a.py": "from src.job import b\n",
                  "job/b.py": "def f():\n    from src.job.a import x\n"},
                 True, [], id="cycle-through-an-import-inside-a-function"),
    pytest.param({"__init__.py": "", "job/__init__.py": "", "serving/__init__.py": "",
                  "job/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from src.serving.w import W\n",
                  "serving/w.py": "from src.job.a import y\n"},
                 True, ["src.job.a -> src.serving.w"], id="upward-under-type-checking"),
    pytest.param({"__init__.py": "", "models/__init__.py": "", "plumbing/__init__.py": "",
                  "models/m.py": "from src.plumbing import c\nfrom . import n\n", "models/n.py": "",
                  "plumbing/c.py": "import src.models.n\n"},
                 False, ["src.plumbing.c -> src.models.n"], id="upward-plain-import"),
    pytest.param({"__init__.py": "", "misc.py": "", "job/__init__.py": "", "job/a.py": "from src import misc\n"},
                 False, ["src.job.a -> src.misc"], id="outside-the-layers"),
])
def test_checks_on_written_packages(tmp_path, files, cycle, upward):
    graph = import_graph(write_package(tmp_path, files))
    assert (find_cycle(graph) is not None) == cycle
    assert upward_imports(graph, LAYERS) == upward


def test_flat_names_are_found():
    text = "see src/worker.py, `src.pipelines.locate` and tests/test_worker.py; not src/app.py or src.models"
    assert flat_names(text, {"worker", "pipelines"}, {"test_worker"}) == {
        "src/worker.py", "src.pipelines", "tests/test_worker.py"}


def test_relative_imports_are_resolved(tmp_path):
    graph = import_graph(write_package(tmp_path, {
        "__init__.py": "", "models/__init__.py": "", "models/m.py": "from . import n\nfrom .n import x\n",
        "models/n.py": "from ..job import a\n", "job/__init__.py": "", "job/a.py": ""}))
    assert graph["src.models.m"] == {"src.models.n"}
    assert graph["src.models.n"] == {"src.job.a"}
