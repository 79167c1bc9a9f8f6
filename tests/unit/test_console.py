"""The console: the progress display (moving-window rate, ETA, timer-driven lines and a TTY bar, checked
under a real pseudo-terminal), and the filters that keep Ray's known-harmless output out."""

import io
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from instructrag_ray import console
from instructrag_ray.console import Progress

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_comes_from_the_moving_window_not_the_start_up():
    clock = Clock()
    p = Progress("job", 200, interval=10, window_s=10, stream=io.StringIO(), tty=False, clock=clock)
    clock.now += 90                      # Ray and the model take 90 s before the first batch lands
    p.update(56)
    clock.now += 0.01
    p.update(64)                         # a second block in the same burst: no rate from 0.01 s
    assert p.rate() is None and p.eta() is None
    clock.now += 20
    p.update(128)                        # then 64 rows in 20 s: the start-up is not in the rate
    assert p.rate() == 3.2 and p.eta() == 72 / 3.2
    clock.now += 10                      # the ETA counts down between landings
    assert p.eta() == pytest.approx(72 / 3.2 - 10)
    for _ in range(4):                   # faster batches: the window keeps one landing before it as its base
        clock.now += 2
        p.update(p.done + 16)
    assert p.rate() == 64 / 18
    clock.now += 61
    p.update(200)
    assert p.rate() == 8 / 61 and p.eta() == 0


def test_plain_lines_come_from_the_timer_only_when_rows_landed_or_once_a_minute():
    clock, out = Clock(), io.StringIO()
    p = Progress("job", 100, interval=10, stream=out, tty=False, clock=clock)
    for _ in range(6):                   # nothing lands for 30 s: no line
        clock.now += 5
        p.draw()
    assert out.getvalue() == ""
    p.update(10, 2, "7.0 tokens/s")
    p.draw()                             # 30 s since the start: a line
    clock.now += 5
    p.update(20, 2)
    p.draw()                             # 5 s after the last line: not yet
    clock.now += 5
    p.draw()
    clock.now += 50
    p.draw()                             # landed nothing for 50 s: no line before the minute
    clock.now += 10
    p.draw()
    lines = out.getvalue().splitlines()
    assert lines == ["[job] 10/100 rows (10%), 2 rejected, 30s elapsed, 7.0 tokens/s",
                     "[job] 20/100 rows (20%), 2 rejected, 2.00 rows/s, ETA 35s",
                     "[job] 20/100 rows (20%), 2 rejected, 2.00 rows/s, ETA 0s"]


def test_bar_fits_the_width_and_shows_rows_rate_eta_rejects():
    clock = Clock()
    p = Progress("synthesize", 200, stream=io.StringIO(), tty=True, clock=clock)
    p.update(64, 1)
    clock.now += 20
    p.update(128, 3)
    bar = p.bar(width=100)
    assert bar.startswith("[synthesize] ") and "█" in bar and "░" in bar and len(bar) <= 99
    assert "128/200 rows (64%), 3 rejected, 3.20 rows/s, ETA 22s" in bar
    assert p.bar(width=40).startswith("[synthesize] 128/200")  # too narrow for cells: text only


def test_the_bar_redraws_in_place_on_a_pseudo_terminal():
    """A job's display in a child process whose stdout is a real pseudo-terminal (pty)."""
    script = ("import time\nfrom instructrag_ray.console import Progress\n"
              "with Progress('demo', 40, interval=10) as p:\n"
              "    for i in range(1, 5):\n        time.sleep(0.6)\n        p.update(10 * i, i - 1)\n"
              "print('done')\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the pty
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-c", script])
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    text = data.decode()
    frames = [f for f in text.split("\r") if f.startswith("[demo]")]
    assert len(frames) >= 4 and "\n" not in "".join(frames[:-1])  # redrawn in place, one line
    assert "█" in frames[-1] and "40/40 rows (100%), 3 rejected" in frames[-1]
    assert text.rstrip().endswith("done")


def test_harmless_ray_data_records_are_dropped_and_warnings_kept():
    drop = console._DropHarmless()  # noqa: SLF001 - the filter itself
    record = logging.LogRecord("ray.data.dataset", logging.WARNING, "f", 1, "Warning: The Ray cluster currently does "
                               "not have any available CPUs. The Dataset job will hang", None, None)
    real = logging.LogRecord("ray.data", logging.WARNING, "f", 1, "Cluster resources are not enough to run any task "
                             "from MapBatches(x). The job may hang forever unless the cluster scales up.", None, None)
    assert not drop.filter(record) and drop.filter(real)


def test_stderr_filter_drops_only_known_c_plus_plus_lines():
    script = ("import os, sys\nfrom instructrag_ray import console\nconsole.filter_stderr()\n"
              "os.write(2, b'[2026-12-01 22:34:32,661 E 1 1] core_worker.cc:2465: Actor with class name: x has "
              "constructor arguments in the object store and max_restarts > 0. See ...\\n')\n"
              "os.write(2, b'[2026-12-01 22:34:33,000 E 1 1] core_worker.cc:99: a real error\\n')\n"
              "os.write(2, '(SplitCoordinator pid=9) \u2714\ufe0f  Dataset train_1 execution finished in 0.24 seconds\\n'"
              ".encode())\n"
              "print('a Python warning', file=sys.stderr)\nos.write(2, b'partial line without newline')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0
    assert out.stderr == ("[2026-12-01 22:34:33,000 E 1 1] core_worker.cc:99: a real error\n"
                          "a Python warning\npartial line without newline")
