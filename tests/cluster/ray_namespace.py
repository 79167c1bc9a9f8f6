"""Run a command that starts and stops Ray in private PID, network and mount namespaces.

`ray stop --force` and `AutoscalingCluster.start()` kill every Ray process they can see. On a shared
machine that would be this test session's own Ray (tests/conftest.py's `ray_local`) and anybody else's.
`command()` wraps a command in `unshare` so that it runs

- in a new PID namespace with /proc remounted: `ray stop` sees only the command's processes, and the
  kernel kills everything left in the namespace when its first process exits or is killed (a timeout
  that kills `unshare` kills that first process too: `--kill-child`);
- in a new network namespace with only loopback: Ray's fixed ports (GCS 6379, dashboard 8265, which
  the fake multi-node provider hard-codes) cannot clash with any other Ray on the machine;
- in a new mount namespace with a private directory mounted over /tmp/ray: the command's session
  files and address file do not reach `ray.init(address="auto")` callers outside.

Outside, `command()` and `unavailable()` are used by tests/cluster/conftest.py and
benchmarks/autoscaling.py. Inside, this file is the namespace's first process (PID 1):

    ray_namespace.py PRIVATE_DIR -- COMMAND [ARG ...]

It brings loopback up, mounts PRIVATE_DIR over /tmp/ray, runs COMMAND, reaps the processes Ray
daemonizes, and exits with COMMAND's status. Needs only util-linux (unshare, mount), no iproute2.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--mount"]
RAY_TMP = Path("/tmp/ray")


def unshare_command() -> list[str]:
    # Without root, a user namespace that maps us to root gives the right to make the others.
    return UNSHARE + ([] if os.geteuid() == 0 else ["--map-root-user"])


def unavailable() -> str:
    """Why namespaces cannot be made here ('' when they can)."""
    if sys.platform != "linux" or not (shutil.which("unshare") and shutil.which("mount")):
        return "needs Linux namespaces (util-linux's unshare and mount)"
    probe = subprocess.run(unshare_command() + ["true"], capture_output=True, text=True)
    return f"needs Linux namespaces; `unshare` failed here: {probe.stderr.strip()}" if probe.returncode else ""


def command(private_dir: Path, argv: list[str]) -> list[str]:
    """`argv` wrapped to run in its own namespaces, with `private_dir` as its /tmp/ray."""
    if not RAY_TMP.exists():  # the mount point
        RAY_TMP.mkdir(exist_ok=True)
        RAY_TMP.chmod(0o777)  # as Ray itself leaves it, for other users' Ray
    return unshare_command() + [sys.executable, str(Path(__file__).resolve()), str(private_dir), "--", *argv]


def ray_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Ray commands in the namespace: this virtualenv's `ray` and `python` first on
    PATH (as on a head node set up with it), no inherited RAY_ADDRESS, Ray's temp dir /tmp/ray."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "RAY_ADDRESS"}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns on token auth after a local ray.init (DESIGN.md)
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": "/tmp",  # Ray's temp dir is then /tmp/ray: the private mount
        # Each node would prestart one idle Python worker per logical CPU: the fake cluster's nodes
        # declare the launcher's CPU counts, far more than a test machine's cores.
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
    })
    return env


# --- inside: PID 1 ---------------------------------------------------------------------------------

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sh22x"  # struct ifreq: interface name, then the flags in its 24-byte union


def loopback_up() -> None:
    """`ip link set lo up`, without iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _, flags = struct.unpack(IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def main(argv: list[str]) -> int:
    private, sep, *argv = argv
    if sep != "--" or not argv:
        raise SystemExit(__doc__)
    assert os.getpid() == 1, "run this through command(): it must be PID 1 of a new PID namespace"
    loopback_up()
    subprocess.run(["mount", "--bind", private, str(RAY_TMP)], check=True)
    child = subprocess.Popen(argv)
    while True:  # PID 1 inherits every orphan (Ray's daemons): reap them all until the command ends
        pid, status = os.wait()
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + signal


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
