"""The README must match the code: the two fresh-machine commands, every config key, every schema."""

import re
from pathlib import Path

from instructrag_ray.config import JOB_CONFIGS, describe

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_fresh_machine_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_config_key_is_documented():
    for job, cls in JOB_CONFIGS.items():
        assert f"### `{job}`" in README, job
        for key, _, _ in describe(cls):
            assert f"`{key}`" in README, f"{job}: config key {key} is not in the README"


def test_every_schema_is_documented():
    for schema in (ROOT / "schemas").glob("*.json"):
        assert f"schemas/{schema.name}" in README, schema.name
