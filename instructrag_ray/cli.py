"""The jobs' shared start-up: config flags and overrides, the one error handler, connecting to Ray.

Every job (jobs/*.py) is `run_job(ConfigClass, description, shorthands, "module:function", argv)`:
parse `[--config FILE] [--<shorthand> VALUE ...] [key=value ...]` (in any order) into a validated
config, import the job's function, run it, and turn any `JobError` (errors.py), wherever it was raised
(the driver, a Ray task, an actor), into one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

from .config import describe, load_config
from .errors import job_error_in, one_line


def parse_job_args(cls: type, description: str, shorthands: dict[str, str], argv: list[str] | None = None):
    """Parse the command line into a validated config; raises ConfigError naming the field."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=default):\n" + "\n".join(f"  {k}={v!r}  {doc}" for k, v, doc in describe(cls)),
    )
    parser.add_argument("--config", help="YAML or JSON file of overrides")
    for flag, key in shorthands.items():
        parser.add_argument(f"--{flag}", dest=flag, help=f"same as {key}=VALUE")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generation.max_new_tokens=64")
    # intermixed: key=value overrides may come before, between or after the flags
    args = parser.parse_intermixed_args(argv)
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in shorthands.items() if getattr(args, flag) is not None]
    return load_config(cls, args.config, overrides + args.overrides)


def run_job(cls: type, description: str, shorthands: dict[str, str], target: str,
            argv: list[str] | None = None) -> object:
    """Parse the config, run `target` ('package.module:function') on it, return what it returns.

    A JobError anywhere in the exception chain becomes one line on stderr and exit status 2; any other
    exception is a bug and keeps its traceback.
    """
    try:
        cfg = parse_job_args(cls, description, shorthands, argv)
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(cfg)
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


def init_ray(address: str = "", cpus_needed: float | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS); else start a local Ray: with Ray's own CPU count, or, when
    `cpus_needed` is given, with at least the logical CPUs the actor pools ask for (they then share the
    cores: an actor pool that cannot start hangs the job). Nothing to do when Ray is already initialised
    (tests, notebooks) but the Data context setting below."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address, log_to_driver=True)
        elif cpus_needed is None:
            ray.init(log_to_driver=True)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), log_to_driver=True)
    # A stage's own exception (a JobError such as ClusterUnavailable) reaches the driver instead of Ray
    # Data's generic UserCodeException, so run_job can print its one line.
    ray.data.DataContext.get_current().raise_original_map_exception = True

