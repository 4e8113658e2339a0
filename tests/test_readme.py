"""README.md is the reference: its tables must cover the schema and the settings."""

import re

from src.job.schema import MAX_ASPECT_RATIO, JobRequest
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_every_input_key_is_documented():
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", README, flags=re.M))
    names = {name for pair in documented for name in pair if name}
    assert set(JobRequest.model_fields) <= names


def test_every_environment_variable_is_documented():
    source = (REPO_ROOT / "src" / "plumbing" / "config.py").read_text()
    variables = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', source)) - {"RUNPOD_VOLUME"}
    missing = {name for name in variables if f"`{name}`" not in README}
    assert not missing


def test_the_two_commands_lead_the_readme():
    assert README.split("```bash\n", 1)[1].startswith("make demo")
    assert "make test" in README.split("```", 2)[1]


def test_the_image_shape_limits_are_stated():
    row = next(line for line in README.splitlines() if line.startswith("| `image_base64` |"))
    for operation, limit in MAX_ASPECT_RATIO.items():
        assert f"**{limit}:1**" in row and f"`{operation}`" in row
