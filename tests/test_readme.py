"""README.md is the reference: its tables must cover the schema and the settings."""

import ast
import re
from pathlib import Path

from src.job.schema import MAX_ASPECT_RATIO, JobRequest
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_every_input_key_is_documented():
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", README, flags=re.M))
    names = {name for pair in documented for name in pair if name}
    assert set(JobRequest.model_fields) <= names


_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]{2,}")
# Where a name is read: an env mapping (os.environ, env, reader.env) or Settings' reader.
_ENV_HOLDER = re.compile(r"\b(environ|env|reader)\b")
_READ_METHODS = {"get", "setdefault", "pop", "text", "integer", "number", "choice", "names", "networks", "flag"}


def env_reads(path) -> set[str]:
    """The variable names a Python file reads from the environment: `os.environ.get("X")`,
    `env["X"]`, `reader.integer("X", ...)`, `{"X", "Y"} & os.environ.keys()`, `"X" in os.environ`."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and _ENV_NAME.fullmatch(node.value)):
            continue
        parent = parents.get(node)
        while isinstance(parent, (ast.Set, ast.Tuple, ast.List)):  # {"A", "B"} & os.environ.keys()
            parent = parents.get(parent)
        if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute):
            reads = parent.func.attr in _READ_METHODS and parent.args and parent.args[0] is node and \
                _ENV_HOLDER.search(ast.unparse(parent.func.value))
        elif isinstance(parent, ast.Subscript):
            reads = parent.slice is node and _ENV_HOLDER.search(ast.unparse(parent.value))
        elif isinstance(parent, (ast.BinOp, ast.Compare)):
            reads = "environ" in ast.unparse(parent)
        else:
            reads = False
        if reads:
            found.add(node.value)
    return found


def worker_env_reads() -> dict[str, set[str]]:
    """{variable: files reading it} over src/ and handler.py."""
    reads: dict[str, set[str]] = {}
    for path in [REPO_ROOT / "handler.py", *sorted((REPO_ROOT / "src").rglob("*.py"))]:
        for name in env_reads(path):
            reads.setdefault(name, set()).add(str(path.relative_to(REPO_ROOT)))
    return reads


def configuration_table() -> set[str]:
    section = README.split("## Configuration (environment)", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ", 1)[0] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def test_every_environment_variable_the_worker_reads_is_in_the_configuration_table():
    reads = worker_env_reads()
    missing = {name: sorted(files) for name, files in reads.items() if name not in configuration_table()}
    assert not missing, f"read but not in README's configuration table: {missing}"


def test_the_env_scan_finds_each_way_the_worker_reads_a_variable():
    """The scan is what keeps the table whole: it must see every form the code uses."""
    reads = worker_env_reads()
    assert {"EDIT_MODEL", "BUCKET_SECRET_ACCESS_KEY", "HF_HOME", "PARALLEL", "LOG_LEVEL", "HF_TOKEN",
            "HF_HUB_OFFLINE", "RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL", "RUNPOD_WEBHOOK_POST_STREAM"} <= set(reads)
    assert "NCCL_NVLS_ENABLE" not in reads  # set for NCCL, never read
    assert "RUNPOD_VOLUME" not in reads  # a path constant's name, not a variable


def test_the_two_commands_lead_the_readme():
    assert README.split("```bash\n", 1)[1].startswith("make demo")
    assert "make test" in README.split("```", 2)[1]


# The runpod SDK's variables the worker relies on: its log level (the worker lowers the SDK's
# DEBUG default unless one is set) and the stream RunPod sets, which routes progress updates.
SDK_VARIABLES = {"RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL", "RUNPOD_WEBHOOK_POST_STREAM"}


def test_the_sdk_variables_the_worker_relies_on_are_read_by_the_pinned_sdk_and_documented():
    import runpod

    sdk_source = "".join(path.read_text() for path in Path(runpod.__file__).parent.rglob("*.py"))
    assert {name for name in SDK_VARIABLES if f'"{name}"' not in sdk_source} == set()
    assert SDK_VARIABLES <= configuration_table()


def test_the_image_shape_limits_are_stated():
    row = next(line for line in README.splitlines() if line.startswith("| `image_base64` |"))
    for operation, limit in MAX_ASPECT_RATIO.items():
        assert f"**{limit}:1**" in row and f"`{operation}`" in row
