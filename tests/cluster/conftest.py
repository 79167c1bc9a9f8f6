"""Fixtures for the cluster tests. Every scenario that starts or stops Ray (scenario.py) runs in its own
PID, network and mount namespaces (ray_namespace.py): `ray stop --force` and
`AutoscalingCluster.start()` would otherwise kill this session's own Ray and anybody else's.
`outside_ray` checks afterwards that the session's Ray survived. Where namespaces cannot be made (not
Linux, no util-linux, no privilege) the tests skip saying why: they must never run without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray_namespace

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def namespaces() -> None:
    why = ray_namespace.unavailable()
    if why:
        pytest.skip(f"cluster tests {why}")


@pytest.fixture
def run_scenario(namespaces, tmp_path):
    """run_scenario(name, job_args, timeout_s, *scenario_flags) -> scenario.py's result, after it ran in
    its own namespaces; its log and Ray's session logs stay under tmp_path."""

    def run(name: str, job_args: list[str], timeout_s: float, *flags: str) -> dict:
        private = tmp_path / f"{name}-ray-tmp"
        private.mkdir()
        result, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
        argv = [sys.executable, str(HERE / "scenario.py"), name, "--result", str(result), "--log", str(log),
                *flags, "--", *job_args]
        started = time.time()
        with log.open("w") as out:
            try:
                proc = subprocess.run(ray_namespace.command(private, argv), env=ray_namespace.ray_environment(),
                                      stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
            except subprocess.TimeoutExpired:  # unshare was killed, and with it the whole namespace
                pytest.fail(f"scenario {name} ran past {timeout_s}s; log:\n{tail(log)}")
        if proc.returncode or not result.exists():
            pytest.fail(f"scenario {name} exited with {proc.returncode}; log:\n{tail(log)}")
        data = json.loads(result.read_text())
        data["wall_s"] = round(time.time() - started, 1)
        data["log"] = str(log)
        print(f"\nscenario {name}: {json.dumps({k: v for k, v in data.items() if k not in ('job', 'actors')})}")
        return data

    return run


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture
def outside_ray(ray_local):
    """The session's own local Ray, started outside any namespace; `check()` asserts it survived."""
    import psutil

    ray = ray_local
    daemons = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
    assert daemons, "the session's local Ray has no gcs_server/raylet child process"

    @ray.remote(num_cpus=0.1)
    def ping() -> int:
        return os.getpid()

    class Outside:
        def check(self) -> None:
            gone = [p.pid for p in daemons if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
            assert not gone, f"processes of the session's Ray were killed: {gone}"
            assert ray.get(ping.remote(), timeout=60) > 0

    return Outside()
