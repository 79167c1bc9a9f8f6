"""The README's CPU commands, run as written and in the README's order, on a small demo output.

Every command of a ```bash block of README.md that runs a job (`python jobs/...` or `instructrag-ray ...`)
on the demo's paths (`demo_out/`, `out/`) only, with nothing that needs a cluster, a GPU model, object
storage or ../shared, is run in a fresh directory. The README's words are kept; only the sizes are cut
(SIZES: a few rows and tokens appended as overrides) so the chain fits the suite. `demo_out/` is made
first the way `make demo` makes it, with the template baseline standing in for the model (the real
demo's model output is tested in tests/integration/test_smollm2.py), so that training finds
consistent rationales."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# appended to each job's command: small data, same commands (a synthesis command also names the stand-in
# demo output's engine, or it would be refused as a run with other settings)
SIZES = {"synthesize": ["generation.engine=template-baseline", "limit=60"], "train": [],
         "evaluate": ["limit=4", "generation.max_new_tokens=8"]}
SKIP = ("ray job", "ray start", "ray stop", "s3://", "gs://", "/models/", "../shared", "passages.jsonl", " qa.jsonl")


def readme_commands(text: str) -> list[str]:
    """Job commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if re.match(r"(python jobs/|instructrag-ray )", line) and "demo_out/" in line \
                    and not any(s in line for s in SKIP):
                commands.append(line)
    return commands


def job_of(argv: list[str]) -> str:
    return Path(argv[1]).stem if argv[0] == "python" else argv[1]


def test_the_readme_chain_runs_as_written(tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text())
    jobs = [job_of(shlex.split(c)) for c in commands]
    assert jobs.count("train") >= 2 and jobs.count("evaluate") >= 2 and "synthesize" in jobs, commands
    for name in ("jobs", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    bin_dir = Path(sys.executable).parent

    def run(argv: list[str]) -> None:
        if argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        elif argv[0] == "instructrag-ray":
            argv = [str(bin_dir / "instructrag-ray"), *argv[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(argv)}\n{(done.stdout + done.stderr)[-3000:]}"

    # what `make demo` leaves behind (Makefile), the template baseline in place of the model
    run(["python", "-m", "instructrag_ray.testing.synthetic", "demo_out/world", "--questions", "120"])
    run(["python", "jobs/build_index.py", "--corpus", "demo_out/world/corpus.jsonl", "--index", "demo_out/index",
         "overwrite=true"])
    run(["python", "jobs/synthesize.py", "--config", "configs/demo.yaml", "--input", "demo_out/world/qa.jsonl",
         "--output", "demo_out/synthesis", "retrieval.index_path=demo_out/index",
         "generation.engine=template-baseline", "limit=60"])
    for command in commands:
        argv = shlex.split(command)
        run(argv + SIZES.get(job_of(argv), []))
    assert (tmp_path / "out" / "sft" / "model" / "config.json").exists()
    assert (tmp_path / "out" / "sft-answers" / "model" / "config.json").exists()
    assert (tmp_path / "out" / "eval-sft" / "metrics.json").exists()
