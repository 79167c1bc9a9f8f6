"""The `openai` generation engine: an OpenAI-compatible server (vLLM, SGLang, `transformers serve`, a
hosted API) generates from the prompt exactly as the prompt stage rendered it.

Why `/v1/completions` and not `/v1/chat/completions`: the chat endpoint would render the messages again
with the server's own template, and the prompt would no longer be ours (PAPER.md's wording through the
model's chat template, documents cut from the left to fit). With the completions endpoint every engine
sees the same text. Hosted APIs that only offer chat endpoints are therefore not supported.

Token ids: servers tokenize a prompt with special tokens added (Hugging Face's default). When the
tokenizer prepends BOS itself (Llama-3), the rendered prompt's leading BOS text is removed before
sending, so the server generates from exactly the ids the transformers engine uses (the integration test
checks the server's `usage.prompt_tokens` against our `prompt_tokens`).

Requests: `concurrency` threads per actor; one pace for the requests-per-second cap (retries count);
retries with exponential backoff and jitter on 429, 408, 5xx, timeouts and lost connections, honouring
`Retry-After`; `request_timeout_s` per request. What comes back for a row:
- the server's completion: a `Completion` (`completion_tokens` from the server's `usage`);
- still failing after every retry, or a 4xx: a `Failure`, so only that row is rejected, with one of
  the reasons `rate_limited` (429), `server_error` (5xx), `timeout`, `request_rejected` (other 4xx),
  `bad_response` (not a completion);
- no connection to the server after every retry, a refused API key (401/403), or
  `max_consecutive_failures` failed rows in a row: `EngineUnavailable`. The job stops instead of
  rejecting the rest of the data set; every row written so far is kept and a rerun continues.

The API key comes from the environment variable `api_key_env` names (in the actor, else the driver's
value passed as a `Secret`); it goes into the Authorization header only, never into a message.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from ..errors import ConfigError, EngineUnavailable
from ..models import resolve_model
from .base import Completion, Failure, Secret, load_tokenizer_and_stops, read_api_key

# Backoff between retries never exceeds MAX_BACKOFF_S; a server's Retry-After is honoured up to MAX_RETRY_AFTER_S.
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 300.0
_STOP_REASONS = {"stop", "eos", "stop_sequence", "end_turn"}


@dataclass
class OpenAIEngine:
    model: str  # the local model whose tokenizer rendered the prompt
    base_url: str  # the OpenAI API root, e.g. http://127.0.0.1:8000/v1
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0  # sent only when != 1.0 (an extra field vLLM, SGLang and llama.cpp servers read)
    served_model: str = ""  # the name in requests; '' = model
    api_key: Secret | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_requests_per_s: float = 0.0  # this actor's share; 0 = no cap
    request_timeout_s: float = 120.0
    max_retries: int = 4
    retry_backoff_s: float = 1.0
    concurrency: int = 8
    max_consecutive_failures: int = 16
    send_stop_token_ids: bool = False

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"generation.base_url must start with http:// or https://, got {self.base_url!r}")
        self.tokenizer, self.stop_ids = load_tokenizer_and_stops(self.model)
        self.bos_text = bos_added_by_tokenizer(self.tokenizer)
        self.request_model = self.served_model or resolve_model(self.model)
        self.label = f"openai:{self.served_model or self.model}"
        self.root = self.base_url.rstrip("/")
        if self.api_key is None:
            self.api_key = read_api_key(self.api_key_env)
        self._local = threading.local()
        self._pace = Pace(self.max_requests_per_s)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai-request")
        self._lock = threading.Lock()
        self._failed_in_a_row = 0
        self._stopping = threading.Event()
        self._check_server()

    # --- the Engine interface --------------------------------------------------------------------

    def generate(self, rows: Sequence[dict]) -> list[Completion | Failure]:
        futures = [self._pool.submit(self._complete, row["prompt"]) for row in rows]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending:
            self._stopping.set()  # queued requests return at once instead of retrying a dead server
            for f in pending:
                f.cancel()
            wait(pending)
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        self._stopping.clear()
        if errors:  # the request that found the server gone, not the ones it stopped
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return [f.result() for f in futures]

    # --- one request -----------------------------------------------------------------------------

    def payload(self, prompt: str) -> dict:
        """The /v1/completions request body for one rendered prompt."""
        if self.bos_text and prompt.startswith(self.bos_text):
            prompt = prompt[len(self.bos_text):]  # the server's tokenizer adds it back
        body = {"model": self.request_model, "prompt": prompt, "max_tokens": self.max_new_tokens,
                "temperature": self.temperature}
        if self.temperature > 0:
            body.update(top_p=self.top_p, seed=self.seed)
        if self.repetition_penalty != 1.0:
            body["repetition_penalty"] = self.repetition_penalty
        if self.send_stop_token_ids:
            body["stop_token_ids"] = self.stop_ids
        return body

    def _complete(self, prompt: str) -> Completion | Failure:
        body = json.dumps(self.payload(prompt))
        url = self.root + "/completions"
        reason, detail, retry_after = "", "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(backoff_s(self.retry_backoff_s, attempt, retry_after))
            if self._stopping.is_set():
                raise _Stopped("stopped: another request found the server gone")
            self._pace.wait()
            retry_after = None
            try:
                response = self._session().post(url, data=body, headers=self._headers(),
                                                timeout=self.request_timeout_s)
            except Exception as e:  # noqa: BLE001 - sorted below; requests is imported lazily
                reason, detail = _transport_failure(e, self.request_timeout_s)
                continue
            status = response.status_code
            if status == 200:
                return self._count(self._parse(response))
            text = _short(response.text)
            if status in (401, 403):
                raise EngineUnavailable(f"the server at {self.root} refused the request (HTTP {status}: {text}); "
                                        f"check the API key in ${self.api_key_env}")
            if status in (408, 429) or status >= 500:
                reason = "rate_limited" if status == 429 else "timeout" if status == 408 else "server_error"
                detail, retry_after = f"HTTP {status}: {text}", _retry_after(response)
                continue
            return self._count(Failure("request_rejected", f"HTTP {status}: {text}"))
        if reason == "unreachable":
            self._stopping.set()
            raise EngineUnavailable(
                f"the server at {self.root} did not answer ({detail}) after {self.max_retries} retries; every row "
                "written so far is kept: rerun the same command once the server is back")
        return self._count(Failure(reason, f"{detail} (after {self.max_retries} retries)"))

    def _parse(self, response) -> Completion | Failure:
        try:
            data = response.json()
            choice = data["choices"][0]
            text, finish = choice["text"], choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError):
            return Failure("bad_response", f"not a completion: {_short(response.text)}")
        if finish == "length":
            finish_reason = "length"
        elif finish in _STOP_REASONS:
            finish_reason = "stop"
        else:
            return Failure("bad_response", f"finish_reason {finish!r}: {_short(response.text)}")
        tokens = (data.get("usage") or {}).get("completion_tokens")
        if tokens is None:  # a server without usage: count locally, the stop token included as the others do
            tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (finish_reason == "stop")
        return Completion(text.strip(), int(tokens), finish_reason)

    def _count(self, outcome: Completion | Failure) -> Completion | Failure:
        """Track failed rows in a row: past the limit the server is down, not the rows bad."""
        with self._lock:
            if isinstance(outcome, Completion):
                self._failed_in_a_row = 0
                return outcome
            self._failed_in_a_row += 1
            streak = self._failed_in_a_row
        if self.max_consecutive_failures and streak >= self.max_consecutive_failures:
            self._stopping.set()
            raise EngineUnavailable(
                f"{streak} requests in a row to {self.root} failed after retries (last: {outcome.reason}, "
                f"{outcome.detail}); stopping instead of rejecting the rest of the data set. Every row written so "
                "far is kept: rerun the same command once the server is healthy")
        return outcome

    # --- plumbing --------------------------------------------------------------------------------

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key.reveal()}"
        return headers

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)  # wakes at once when the engine is stopping

    def _check_server(self) -> None:
        """Fail fast at start-up: the server answers, accepts the key, and serves the model we name."""
        reason, detail = "", ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(backoff_s(self.retry_backoff_s, attempt, None))
            try:
                response = self._session().get(self.root + "/models", headers=self._headers(),
                                               timeout=self.request_timeout_s)
            except Exception as e:  # noqa: BLE001
                reason, detail = _transport_failure(e, self.request_timeout_s)
                continue
            if response.status_code in (401, 403):
                raise EngineUnavailable(f"the server at {self.root} refused the API key (HTTP "
                                        f"{response.status_code}); check ${self.api_key_env}")
            if response.status_code >= 500:
                reason, detail = "server_error", f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                return  # no model list (some servers): the first completion will tell
            try:
                served = [m["id"] for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                return
            if served and self.request_model not in served:
                raise ConfigError(f"the server at {self.root} serves {served[:5]}, not {self.request_model!r}; "
                                 "set generation.served_model to the name the server uses")
            return
        raise EngineUnavailable(f"cannot reach the server at {self.root} ({reason}: {detail}) after "
                                f"{self.max_retries} retries; is generation.base_url right and the server up?")


class _Stopped(EngineUnavailable):
    """A request given up because another one found the server gone."""


class Pace:
    """Spaces requests at least 1/per_s seconds apart over all threads (per_s = 0: no cap)."""

    def __init__(self, per_s: float):
        self.gap = 1.0 / per_s if per_s > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.gap:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.gap
        if start > now:
            time.sleep(start - now)


def backoff_s(base: float, attempt: int, retry_after: float | None) -> float:
    """Wait before retry number `attempt` (1, 2, ...): base x 2^(attempt-1) with jitter, or the
    server's Retry-After when it asks for longer."""
    wait_s = min(base * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        wait_s = max(wait_s, min(retry_after, MAX_RETRY_AFTER_S))
    return wait_s


def bos_added_by_tokenizer(tokenizer) -> str:
    """The BOS text the tokenizer prepends itself when encoding with special tokens ('' if it adds none)."""
    if not tokenizer.bos_token or tokenizer.bos_token_id is None:
        return ""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id else ""


def _transport_failure(error: Exception, timeout_s: float) -> tuple[str, str]:
    import requests

    if isinstance(error, requests.ReadTimeout):
        return "timeout", f"no answer within {timeout_s:g} s"
    if isinstance(error, requests.ConnectionError):  # refused, reset, DNS, connect timeout
        return "unreachable", type(error).__name__
    if isinstance(error, requests.RequestException):
        return "bad_response", type(error).__name__
    raise error


def _retry_after(response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None  # absent, or an HTTP date (rare): the backoff applies


def _short(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]
