"""A real OpenAI-compatible server on localhost for tests and benchmarks: `transformers serve` (the
`serve` extra: fastapi, uvicorn, openai) pinned to a local model directory, on a free 127.0.0.1 port,
offline. Started as a subprocess, waited on until GET /health answers, stopped by its pid.

`transformers serve` answers POST /v1/completions from a raw prompt (no chat template applied) with the
model's own generation config, which is what the `openai` engine needs. Without continuous batching it
generates one request at a time; `continuous_batching=True` turns on its paged-attention scheduler.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, model_dir: str, log_path: Path, port: int | None = None, continuous_batching: bool = False,
                 threads: int = 1, timeout_s: float = 180.0):
        self.model_dir, self.log_path = model_dir, Path(log_path)
        self.port = port or free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.continuous_batching = continuous_batching
        self.threads = threads  # torch threads: 1, as Ray gives a generation actor with num_cpus=1
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LocalServer":
        cli = Path(sys.executable).with_name("transformers")
        command = [str(cli), "serve", self.model_dir, "--host", "127.0.0.1", "--port", str(self.port),
                   "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
        if self.continuous_batching:
            command.append("--continuous-batching")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(self.root + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve did not answer on {self.root} within {self.timeout_s} s")

    def completions_served(self) -> int:
        """POST /v1/completions answered 200 so far (from uvicorn's access log)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text.count('"POST /v1/completions HTTP/1.1" 200')

    def stop(self) -> None:
        """Stop by pid (its own session, so only this server and its children)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def freeze(self) -> None:
        """Stop answering without closing a connection (SIGSTOP): requests in flight wait."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """Die abruptly, as a crashed server does."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
