"""A test fixture: a fault-injecting reverse proxy in front of a real OpenAI-compatible server.

It forwards every request to the upstream server unchanged, except that `fault(prompt, attempt)` may
answer a POST /v1/completions itself with an error (status, body, headers) instead. It records what
went through: attempts per prompt, the Authorization headers it saw, and the server's usage per prompt.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


class FaultyProxy:
    def __init__(self, upstream: str, fault=None):
        self.upstream = upstream.rstrip("/")  # e.g. http://127.0.0.1:8000
        self.fault = fault or (lambda prompt, attempt: None)
        self.attempts: dict[str, int] = {}
        self.faults: dict[str, list[int]] = {}
        self.auth: set[str | None] = set()
        self.usage: dict[str, dict] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.auth.add(self.headers.get("Authorization"))
                self._relay(requests.get(proxy.upstream + self.path, timeout=60))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.auth.add(self.headers.get("Authorization"))
                prompt = json.loads(raw).get("prompt", "")
                with proxy.lock:
                    attempt = proxy.attempts[prompt] = proxy.attempts.get(prompt, 0) + 1
                injected = proxy.fault(prompt, attempt) if self.path.endswith("/completions") else None
                if injected is not None:
                    status, body, headers = injected
                    with proxy.lock:
                        proxy.faults.setdefault(prompt, []).append(status)
                    return self._send(status, json.dumps(body).encode(), headers)
                response = requests.post(proxy.upstream + self.path, data=raw, timeout=120,
                                         headers={"Content-Type": "application/json"})
                if response.status_code == 200:
                    with proxy.lock:
                        proxy.usage[prompt] = response.json().get("usage", {})
                self._relay(response)

            def _relay(self, response):
                self._send(response.status_code, response.content, {})

            def _send(self, status, data, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
