"""The jobs' shared start-up: config flags and overrides, the one error handler, connecting to Ray.

Every job is `run_job(ConfigClass, description, shorthands, "module:function", argv)`: parse
`[--config FILE] [--<shorthand> VALUE ...] [--dry-run] [key=value ...]` (in any order) into a validated
config, import the job's function, run it, and turn any `JobError` (errors.py), wherever it was raised
(the driver, a Ray task, an actor), into one `error: ...` line and exit status 2. A command line that
argparse refuses is a ConfigError too (one line, exit 2).

Three ways to start the same job: `python jobs/<job>.py ...` (jobs/*.py, for `ray job submit`),
the console script `instructrag-ray <job> ...` (`main`), and `python -m instructrag_ray <job> ...`
or `python -m <the job's module> ...`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import math
import os
import sys
from dataclasses import dataclass

from . import console
from .config import BuildIndexConfig, EvaluateConfig, SynthesizeConfig, TrainConfig, describe, load_config
from .errors import ConfigError, job_error_in, one_line


@dataclass(frozen=True)
class Job:
    config: type
    shorthands: dict[str, str]
    target: str  # 'package.module:function'
    summary: str
    example: str  # one command line, after `instructrag-ray <job>`


JOBS = {
    "build_index": Job(BuildIndexConfig, {"corpus": "corpus", "index": "index", "output": "output"},
                       "instructrag_ray.retrieval.build:build_index",
                       "Build the BM25 passage index (tantivy, or Elasticsearch) that synthesis and evaluation search.",
                       "--corpus passages.jsonl --index out/index"),
    "synthesize": Job(SynthesizeConfig, {"input": "input", "output": "output"},
                      "instructrag_ray.synthesize:run_synthesis",
                      "Synthesize InstructRAG denoising rationales into Parquet.",
                      "--input qa.jsonl --output out/synthesis retrieval.index_path=out/index"),
    "train": Job(TrainConfig, {"input": "input", "output": "output"}, "instructrag_ray.sft.job:run_training",
                 "Fine-tune a model on synthesized rationales (InstructRAG-FT): Ray Train + DeepSpeed ZeRO.",
                 "--input out/synthesis --output out/sft"),
    "evaluate": Job(EvaluateConfig, {"input": "input", "output": "output"}, "instructrag_ray.evaluate:run_evaluation",
                    "Evaluate InstructRAG-FT and InstructRAG-ICL against baselines.",
                    "--input test.jsonl --output out/eval retrieval.index_path=out/index demos.path=out/synthesis "
                    "ft_model=out/sft/model"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused command line is a ConfigError: one `error:` line, exit status 2."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def parse_job_args(cls: type, description: str, shorthands: dict[str, str], argv: list[str] | None = None,
                   prog: str | None = None):
    """Parse the command line into (validated config, dry_run); raises ConfigError naming the field."""
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=default):\n" + "\n".join(f"  {k}={v!r}  {doc}" for k, v, doc in describe(cls)),
    )
    parser.add_argument("--config", help="YAML or JSON file of overrides")
    for flag, key in shorthands.items():
        parser.add_argument(f"--{flag}", dest=flag, help=f"same as {key}=VALUE")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check (config, input, output, model, index) and print what would run; "
                             "starts nothing")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {cls.EXAMPLE}")
    # intermixed: key=value overrides may come before, between or after the flags
    args = parser.parse_intermixed_args(argv)
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in shorthands.items() if getattr(args, flag) is not None]
    return load_config(cls, args.config, overrides + args.overrides), args.dry_run


def run_job(cls: type, description: str, shorthands: dict[str, str], target: str,
            argv: list[str] | None = None, prog: str | None = None, process: bool | None = None) -> object:
    """Parse the config, run `target` ('package.module:function') on it, return what it returns.

    A JobError anywhere in the exception chain becomes one line on stderr and exit status 2; any other
    exception is a bug and keeps its traceback. `process` (default: `argv` is None, this process's own
    command line) says the job owns this process: then, without verbose=true, Ray's known-harmless C++
    lines are filtered out of its stderr (console.py); never under a test runner.
    """
    try:
        cfg, dry_run = parse_job_args(cls, description, shorthands, argv, prog)
        if (argv is None if process is None else process) and not cfg.verbose and not dry_run:
            console.filter_stderr()
        module, _, function = target.partition(":")
        run = getattr(importlib.import_module(module), function)
        return run(cfg, dry_run=True) if dry_run else run(cfg)
    except KeyboardInterrupt:
        print("error: interrupted; every batch written so far is kept, rerun the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - sorted: a JobError is one line, anything else a bug
        error = job_error_in(e)
        if error is None:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def job_main(name: str, argv: list[str] | None = None, description: str | None = None,
             prog: str | None = None, process: bool | None = None) -> object:
    """Run job `name` of JOBS on the command line `argv` (None: this process's)."""
    job = JOBS[name]
    text = description or f"{job.summary}\n\n    instructrag-ray {name} {job.example}\n\n`--help` lists every key."
    return run_job(job.config, text, job.shorthands, job.target, argv, prog, process)


def main(argv: list[str] | None = None) -> None:
    """`instructrag-ray <job> ...` (the console script) and `python -m instructrag_ray <job> ...`."""
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: instructrag-ray {" + ",".join(JOBS) + "} [--help] ..."
    if not args or args[0] in ("-h", "--help"):
        lines = [usage, "", "jobs:"] + [f"  {name:<12} {job.summary}" for name, job in JOBS.items()]
        lines += ["", "instructrag-ray <job> --help lists the job's flags and every config key."]
        print("\n".join(lines))
        if not args:
            raise SystemExit(2)
        return None
    name = args[0].replace("-", "_")
    if name not in JOBS:
        near = difflib.get_close_matches(name, JOBS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"error: unknown job {args[0]!r}; {hint}choose one of: {', '.join(JOBS)}", file=sys.stderr)
        raise SystemExit(2)
    job_main(name, args[1:], prog=f"instructrag-ray {name}", process=argv is None)
    return None  # the console script exits with main()'s value: 0


def prepare_models_main(argv: list[str] | None = None) -> None:
    """`python -m instructrag_ray.models NAME ...`: fetch and convert named pretrained models into this
    machine's cache (for a machine image or an offline node); a failure is one `error:` line, status 2."""
    from .models import prepare

    try:
        for path in prepare(sys.argv[1:] if argv is None else argv):
            print(path)
    except Exception as e:  # noqa: BLE001 - a JobError is one line, anything else a bug
        error = job_error_in(e)
        if error is None:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to (this machine's when Ray is not started)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("CPU", 1.0)
    return float(os.cpu_count() or 1)


def init_ray(address: str = "", cpus_needed: float | None = None, verbose: bool = False) -> None:
    """Connect to `address` (or RAY_ADDRESS); else start a local Ray: with Ray's own CPU count, or, when
    `cpus_needed` is given, with at least the logical CPUs the actor pools ask for (they then share the
    cores: an actor pool that cannot start hangs the job). Nothing to do when Ray is already initialised
    (tests, notebooks) but the Data context settings below. `verbose=False` keeps Ray's console quiet
    (console.py)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS", "")
        options = console.before_ray_init(verbose)
        if address:
            ray.init(address=address, **options)
        elif cpus_needed is None:
            ray.init(**options)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), **options)
    console.quiet_ray_data(verbose)
    # A stage's own exception (a JobError such as ClusterUnavailable) reaches the driver instead of Ray
    # Data's generic UserCodeException, so run_job can print its one line.
    ray.data.DataContext.get_current().raise_original_map_exception = True
