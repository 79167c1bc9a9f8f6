"""The command line: overrides anywhere, one-line errors with exit status 2 (malformed YAML/JSON, a
section given a value, a refused flag), --dry-run, the `instructrag-ray` dispatcher and `python -m`."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from instructrag_ray import cli
from instructrag_ray.config import BuildIndexConfig, ConfigError, SynthesizeConfig, TrainConfig, describe, load_config

ROOT = Path(__file__).resolve().parents[2]
SHORT = {"input": "input", "output": "output"}


def parse(*argv, cls=SynthesizeConfig):
    return cli.parse_job_args(cls, "d", SHORT, list(argv))


def test_overrides_and_flags_in_any_order():
    cfg, dry = parse("limit=3", "--input", "q.jsonl", "generation.batch_size=2", "--dry-run", "--output", "o",
                     "prompt.num_docs=2")
    assert (cfg.input, cfg.output, cfg.limit, cfg.generation.batch_size, cfg.prompt.num_docs) == ("q.jsonl", "o", 3, 2, 2)
    assert dry is True and parse("--input", "q", "--output", "o")[1] is False


def test_a_refused_command_line_is_one_config_error():
    with pytest.raises(ConfigError, match=r"unrecognized arguments: --bogus \(see .* --help\)"):
        parse("--input", "q", "--output", "o", "--bogus")


@pytest.mark.parametrize("name,text,message", [
    ("c.yaml", "limit: 3\ngeneration:\n  max_new_tokens: [1, 2\n", r"c\.yaml is not valid YAML: line 4, column 1: "),
    ("c.yaml", "limit: 3\n  bad: indent\n", r"c\.yaml is not valid YAML: line 2, column 6: "),
    ("c.json", '{"limit": 3,}', r"c\.json is not valid JSON: line 1, column 13: "),
])
def test_malformed_config_file_is_one_line_naming_file_line_and_column(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(SynthesizeConfig, str(f), ["input=i", "output=o"])
    assert "\n" not in str(e.value)


def test_a_section_given_a_value_names_its_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"^generation is a section \(from command line\); set one of its keys, "
                                          r"e\.g\. generation\.engine=\.\.\."):
        load_config(SynthesizeConfig, None, ["input=i", "output=o", "generation=3"])
    f = tmp_path / "c.yaml"
    f.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"optim is a section \(from .*c\.yaml\).*optim\.learning_rate"):
        load_config(TrainConfig, str(f), ["input=i", "output=o"])


def test_help_examples_are_keys_of_each_job(capsys):
    for name, job in cli.JOBS.items():
        key = job.config.EXAMPLE.partition("=")[0]
        assert key in {k for k, _, _ in describe(job.config)}
        with pytest.raises(SystemExit) as e:
            cli.job_main(name, ["--help"])
        assert e.value.code == 0
        assert f"e.g. {job.config.EXAMPLE}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"e\.g\. heap_mb=512"):
        load_config(BuildIndexConfig, None, ["corpus=c", "index=i", "novalue"])


def test_dispatcher_lists_jobs_and_refuses_an_unknown_one_in_one_line(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.JOBS)
    with pytest.raises(SystemExit) as e:
        cli.main(["synthesise"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'synthesize'?" in err


def test_an_error_is_one_line_and_exit_status_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["synthesize", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: input {tmp_path / 'missing.jsonl'} does not exist; pass --input with a QA file or directory\n"


def test_console_script_and_python_dash_m():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"instructrag-ray": "instructrag_ray.cli:main"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (["-m", "instructrag_ray.synthesize", "--help"], ["-m", "instructrag_ray", "evaluate", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and "--dry-run" in out.stdout and "config keys" in out.stdout, out.stderr
