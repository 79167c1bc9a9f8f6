"""The demo as a user runs it (`jobs/synthesize.py --config configs/demo.yaml`, its own local Ray,
stdout and stderr pipes, not a TTY): at most 25 console lines, none of Ray Data's status blocks or the
known-harmless messages; then a rerun with nothing left to do and a dry run, both with an unreachable
RAY_ADDRESS, which they can only pass by never starting or connecting to Ray.

The template baseline stands in for smollm2-135m's generation (the same stages and actors, minutes
faster on 2 cores; the model's tokenizer still renders the prompts); the console line count of `make demo` itself is measured by hand (README)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructrag_ray.retrieval.corpus import read_corpus
from instructrag_ray.retrieval.tantivy_index import build_tantivy_index
from instructrag_ray.testing.synthetic import write_world

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("logging_progress", "streaming_executor", "Running Dataset", "core_worker", "available CPUs",
         "Progress bars disabled", "Started a local Ray", "Loading weights")


def run(argv, **env):
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "synthesize.py"), *argv], capture_output=True, text=True,
                         timeout=900, cwd=ROOT, env={**environment, **env})
    return out, (out.stdout + out.stderr).splitlines()


def test_demo_console_is_short_and_a_rerun_or_dry_run_never_starts_ray(tmp_path):
    world = write_world(tmp_path / "world")
    index = tmp_path / "index"
    build_tantivy_index(read_corpus(world["corpus"]), index)
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--input", str(world["qa"]), "--output",
            str(tmp_path / "synthesis"), f"retrieval.index_path={index}", "generation.engine=template-baseline"]

    first, lines = run(argv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(lines) <= 25, "\n".join(lines)
    assert not [line for line in lines if any(noise in line for noise in NOISE)], "\n".join(lines)
    assert "[synthesize] 12 input rows: 0 already in" in first.stdout and "[synthesize] done" in first.stdout

    again, lines = run(argv, RAY_ADDRESS="127.0.0.1:1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "12 already in" in again.stdout and "0 to process" in again.stdout

    dry, lines = run(argv[:5] + [str(tmp_path / "other")] + argv[6:] + ["--dry-run"], RAY_ADDRESS="127.0.0.1:1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "dry run: every check passed" in dry.stdout and "12 to process" in dry.stdout
    assert "the Ray cluster at 127.0.0.1:1" in dry.stdout and not (tmp_path / "other").exists()
