"""Shared start-up of the jobs: --config FILE, shorthand flags, key=value overrides; connecting to Ray."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .config import ConfigError, describe, load_config


def parse_job_args(cls: type, description: str, shorthands: dict[str, str], argv: list[str] | None = None):
    """Parse `[--config FILE] [--<shorthand> VALUE ...] [key=value ...]` into a validated config.

    A bad key or value exits with one line naming the field and what is allowed, before any work.
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=default):\n" + "\n".join(f"  {k}={v!r}  {doc}" for k, v, doc in describe(cls)),
    )
    parser.add_argument("--config", help="YAML or JSON file of overrides")
    for flag, key in shorthands.items():
        parser.add_argument(f"--{flag}", dest=flag, help=f"same as {key}=VALUE")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generation.max_new_tokens=64")
    args = parser.parse_args(argv)
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in shorthands.items() if getattr(args, flag) is not None]
    try:
        return load_config(cls, args.config, overrides + args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def init_ray(address: str = "", cpus_needed: float | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS); else start a local Ray: with Ray's own CPU count, or, when
    `cpus_needed` is given, with at least the logical CPUs the actor pools ask for (they then share the
    cores: an actor pool that cannot start hangs the job). Nothing to do when Ray is already initialised
    (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    elif cpus_needed is None:
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), log_to_driver=True)
