"""The jobs' console: their own lines, one progress display, and real warnings; Ray's noise kept out.

With `verbose=false` (every job's default):
- Ray Data prints no status blocks, execution plans or progress bars (`DataContext`), and its INFO
  logs go only to its log file (`<session>/logs/ray-data`): the console handler of the `ray.data`
  logger is raised to WARNING, so its warnings still show;
- `ray.init` logs at WARNING (no "Started a local Ray instance" banner), Ray Train logs at WARNING;
- the messages in HARMLESS_LOGS, HARMLESS_STDERR and HARMLESS_WARNINGS are dropped: each one is
  listed with why it is harmless for these jobs, and nothing else is;
- on a local Ray the workers load models without progress bars (HF_HUB_DISABLE_PROGRESS_BARS).
`verbose=true` leaves everything as Ray prints it.

`Progress` is the one progress display a job shows (see its docstring).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable

# Ray Data log records (logger `ray.data.*`) that are noise for these jobs.
HARMLESS_LOGS = (
    # ray.data.dataset, once per process, at the start of an execution when the free-CPU count reads 0 at
    # that instant: right after ray.init, or while Ray Data's own from_arrow task holds the CPU. A stage
    # that really cannot start still gets Ray Data's starvation warning ("Cluster resources are not enough
    # to run any task from ...").
    "does not have any available CPUs",
    # an advertisement for Ray Data's experimental progress UI
    "A new progress UI is available",
    # Ray Data's note that its progress bars are off: they are, on purpose (the job draws its own)
    "Progress bars disabled. To enable",
)
# Lines on the driver's stderr that Python logging cannot reach: Ray's C++ core, and what other Ray
# processes print there (Ray forwards a worker's stderr to the driver's).
HARMLESS_STDERR = (
    # core_worker.cc, once for every Ray Data actor pool and for Ray Train's own actors: Ray passes an
    # actor handle to their constructors (ray-project/ray#57733); goes when Ray fixes it.
    "has constructor arguments in the object store and max_restarts > 0",
    # Ray Data in Ray Train's SplitCoordinator actor (the training input), which logs at Ray Data's
    # defaults: the note that its progress bars are off (the driver turned them off) and its INFO line
    # at the end of each epoch's input
    "Progress bars disabled. To enable",
    "execution finished in ",
    # Ray Train 2.60's workers log every checkpoint report at INFO from a logger named after its file,
    # outside `ray.train`, so Ray Train's LoggingConfig(log_level=WARNING) does not reach it
    "Reporting training result ",
)
# (category, message regex) of Python warnings, in the driver and in the training workers.
HARMLESS_WARNINGS = (
    # DeepSpeed 0.19's ZeRO calls these torch.distributed functions every step (74 lines a demo training)
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # Ray Train's own DataConfig sets the deprecated option
    (Warning, r"`ExecutionOptions\.exclude_resources` is deprecated"),
)


def quiet_warnings() -> None:
    """Drop HARMLESS_WARNINGS in this process (the driver, or a training worker)."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_worker() -> None:
    """In a training worker: no HARMLESS_WARNINGS, no transformers progress bars (saving, loading)."""
    quiet_warnings()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def before_ray_init(verbose: bool) -> dict:
    """Settings that must be made before `ray.init`; returns its keyword arguments for the console."""
    if verbose:
        return {"log_to_driver": True}
    quiet_warnings()
    # A local Ray's workers inherit this environment: no "Loading weights" bars from every actor.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return {"log_to_driver": True, "logging_level": logging.WARNING}


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in HARMLESS_LOGS)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's console in this process (the driver): see the module docstring."""
    if verbose:
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logger = logging.getLogger("ray.data")
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropHarmless) for f in handler.filters):
                handler.addFilter(_DropHarmless())


# --- stderr: Ray's C++ lines ---------------------------------------------------------------------

# Runs in its own process so that nothing written to stderr is lost when the job dies: it reads
# until every writer has closed the pipe. Complete lines are matched; a partial line (a prompt, a
# progress bar) passes after 0.1 s without more data.
_FILTER = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
drop = [p.encode() for p in sys.argv[1:]]
out, buf = sys.stdout.buffer, b""
while True:
    ready = select.select([0], [], [], 0.1 if buf else None)[0]
    if not ready:
        out.write(buf); out.flush(); buf = b""
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, buf = (buf + chunk).split(b"\n")
    out.write(b"".join(line + b"\n" for line in lines if not any(d in line for d in drop)))
    out.flush()
out.write(buf); out.flush()
"""


def filter_stderr(drop: tuple[str, ...] = HARMLESS_STDERR) -> None:
    """Route this process's stderr (file descriptor 2, so C++ writes too) through a filter process that
    drops lines containing any of `drop`. For a job's own process only (cli.main), never under a test
    runner that captures file descriptors. At exit, stderr is restored and the filter drained."""
    original = os.dup(2)
    proc = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, *drop], stdin=subprocess.PIPE,
                            stdout=original, stderr=original, close_fds=True)
    sys.stderr.flush()
    os.dup2(proc.stdin.fileno(), 2)

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)
        proc.stdin.close()
        try:
            proc.wait(timeout=5)  # children that still hold the pipe (a local Ray stopping) may keep it open
        except subprocess.TimeoutExpired:
            pass

    atexit.register(restore)


# --- the progress display ------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One job's progress: `done`/`total` units, the rate over a moving window, an ETA, rejects so far.

    The job calls `update(done, rejected, note)` when something lands (a batch written, a step
    logged); a timer thread, not the arrival of batches, draws the display:
    - on a TTY, one bar redrawn in place (`\\r`) twice a second;
    - otherwise a plain line every `interval` seconds while work lands, and one a minute while none
      does (so a log shows the job is alive without repeating itself every few seconds).
    The rate is measured between landings inside the last `window_s` seconds (from the landing just
    before the window, over at least MIN_SPAN_S), so neither the start-up (Ray, model loading), nor a
    burst of batches landing together, nor a long run's early speed skews the ETA; the ETA counts down
    between landings. `poll`, when given, is called by the timer
    before each draw to fetch `(done, rejected, note)` itself (training reads its metrics file).
    """

    TTY_REDRAW_S = 0.5
    QUIET_LINE_S = 60.0
    MIN_SPAN_S = 5.0

    def __init__(self, label: str, total: int | None, unit: str = "rows", *, interval: float = 10.0,
                 window_s: float = 60.0, stream=None, tty: bool | None = None,
                 poll: Callable[[], tuple[int, int, str]] | None = None, rejects: bool = True,
                 clock: Callable[[], float] = time.time):
        self.label, self.total, self.unit, self.rejects = label, total, unit, rejects
        self.interval, self.window_s, self.poll, self.clock = interval, window_s, poll, clock
        self.stream = stream or sys.stdout
        self.tty = is_tty(self.stream) if tty is None else tty
        self.done = self.rejected = 0
        self.note = ""
        self.started = clock()
        self.landings: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line_at = self.started
        self._last_line_done = 0
        self._drawn = False

    # -- counts ----------------------------------------------------------------------------------

    def update(self, done: int, rejected: int = 0, note: str = "") -> None:
        with self._lock:
            if done != self.done:
                self.landings.append((self.clock(), done))
            self.done, self.rejected, self.note = done, rejected, note

    def rate(self, now: float | None = None) -> float | None:
        """Units per second between the landings of the window, over at least MIN_SPAN_S (None before)."""
        now = self.clock() if now is None else now
        marks = self.landings
        # keep one landing before the window as its base, and never measure a burst of landings alone
        while len(marks) > 2 and marks[1][0] < now - self.window_s and marks[-1][0] - marks[1][0] >= self.MIN_SPAN_S:
            marks.popleft()
        if len(marks) < 2 or marks[-1][0] - marks[0][0] < self.MIN_SPAN_S:
            return None
        return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])

    def eta(self, now: float | None = None) -> float | None:
        now = self.clock() if now is None else now
        rate = self.rate(now)
        if not rate or self.total is None:
            return None
        left = max(0, self.total - self.done)
        return max(0.0, left / rate - (now - self.landings[-1][0]))

    # -- drawing ---------------------------------------------------------------------------------

    def text(self, now: float | None = None) -> str:
        """The status: `64/200 rows (32%), 3 rejected, 2.1 rows/s, ETA 1m05s[, note]`."""
        now = self.clock() if now is None else now
        total = "" if self.total is None else f"/{self.total}"
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        parts = [f"{self.done}{total} {self.unit}{share}"] + ([f"{self.rejected} rejected"] if self.rejects else [])
        rate, eta = self.rate(now), self.eta(now)
        parts.append(f"{rate:.2f} {self.unit}/s" if rate is not None else f"{duration(now - self.started)} elapsed")
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def bar(self, now: float | None = None, width: int | None = None) -> str:
        """`[label] ██████░░░░░░  <text>` fitted to the terminal width."""
        width = width or shutil.get_terminal_size((100, 20)).columns
        text = self.text(now)
        room = width - len(self.label) - len(text) - 6
        cells = max(0, min(30, room))
        if cells >= 5 and self.total:
            filled = round(cells * min(1.0, self.done / self.total))
            line = f"[{self.label}] {'█' * filled}{'░' * (cells - filled)}  {text}"
        else:
            line = f"[{self.label}] {text}"
        return line[:width - 1]

    def draw(self, now: float | None = None) -> None:
        """One tick of the timer: redraw the bar (TTY) or print a line when one is due."""
        now = self.clock() if now is None else now
        if self.poll is not None:
            self.update(*self.poll())
        with self._lock:
            if self.tty:
                self.stream.write("\r" + self.bar(now) + "\x1b[K")
                self._drawn = True
            else:
                landed = self.done != self._last_line_done
                wait = self.interval if landed else max(self.interval, self.QUIET_LINE_S)
                if now - self._last_line_at < wait:
                    return
                self.stream.write(f"[{self.label}] {self.text(now)}\n")
                self._last_line_at, self._last_line_done = now, self.done
            self.stream.flush()

    def _run(self) -> None:
        tick = self.TTY_REDRAW_S if self.tty else min(1.0, max(0.05, self.interval / 4))
        while not self._stop.wait(tick):
            try:
                self.draw()
            except Exception:  # noqa: BLE001 - a display must never stop the job
                pass

    def __enter__(self) -> Progress:
        self.started = self._last_line_at = self.clock()
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.tty and self._drawn:
            if self.poll is not None:
                self.update(*self.poll())
            self.stream.write("\r" + self.bar() + "\x1b[K\n")  # the bar's last state stays on screen
            self.stream.flush()


def is_tty(stream=None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
