"""The openai engine's HTTP behaviour against an in-process stub server (no model behind it): payload,
parsing, retries and backoff, per-row failures, outages, the rate cap, and the API key staying secret."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from instructrag_ray.errors import EngineUnavailable
from instructrag_ray.generation.base import Completion, Failure, Secret, read_api_key
from instructrag_ray.generation.stage import GenerateStage
from instructrag_ray.generation.openai_engine import OpenAIEngine, backoff_s
from instructrag_ray.models import resolve_model

KEY = "sk-test-0123456789-secret"


class Stub:
    """A scripted OpenAI-compatible server: `script(prompt, attempt)` -> (status, body dict, headers, delay_s)."""

    def __init__(self, script=None, models=None):
        self.script = script or (lambda prompt, attempt: (200, completion("ok", 3, "stop"), {}, 0))
        self.models = models
        self.requests: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                names = stub.models if stub.models is not None else [resolve_model("tiny"), "tiny"]
                self._send(200, {"object": "list", "data": [{"id": n} for n in names]}, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    attempt = stub.attempts[body["prompt"]] = stub.attempts.get(body["prompt"], 0) + 1
                status, payload, headers, delay = stub.script(body["prompt"], attempt)
                time.sleep(delay)
                self._send(status, payload, headers)

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def completions(self):
        return [r for r in self.requests if r["path"].endswith("/completions")]


def completion(text, tokens, finish):
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}


@pytest.fixture
def stub(tiny_model):
    servers = []

    def make(script=None, models=None):
        servers.append(Stub(script, models))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def engine(url, **kw):
    options = {"max_new_tokens": 8, "max_retries": 2, "retry_backoff_s": 0.01, "request_timeout_s": 5,
               "concurrency": 4, "api_key_env": "", **kw}
    return OpenAIEngine(model="tiny", base_url=url, **options)


def test_payload_is_our_rendered_prompt_without_the_bos_the_server_adds(stub):
    s = stub()
    e = engine(s.url)
    body = e.payload("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert body == {"model": resolve_model("tiny"), "prompt": "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                    "max_tokens": 8, "temperature": 0.0}
    assert e.label == "openai:tiny"
    sampled = engine(s.url, temperature=0.7, top_p=0.9, seed=3, send_stop_token_ids=True, served_model="tiny")
    body = sampled.payload("x")
    assert body["top_p"] == 0.9 and body["seed"] == 3 and body["stop_token_ids"] == sampled.stop_ids == [4, 1]
    assert body["model"] == "tiny" and sampled.label == "openai:tiny"
    assert "repetition_penalty" not in body  # off (1.0): never sent, servers that reject extra fields still work
    assert engine(s.url, repetition_penalty=1.2).payload("x")["repetition_penalty"] == 1.2


def test_completions_are_parsed_in_order(stub):
    answers = {"a": completion(" first ", 4, "stop"), "b": completion("second", 8, "length"),
               "c": {"choices": [{"text": "third", "finish_reason": "stop"}]}}  # no usage: counted locally
    s = stub(lambda prompt, attempt: (200, answers[prompt], {}, 0.05 if prompt == "a" else 0))
    out = engine(s.url).generate([{"prompt": p} for p in "abc"])
    assert out[0] == Completion("first", 4, "stop") and out[1] == Completion("second", 8, "length")
    assert out[2].text == "third" and out[2].finish_reason == "stop" and out[2].completion_tokens >= 2


def test_429_and_5xx_are_retried_with_backoff(stub):
    def script(prompt, attempt):
        if attempt == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "0.3"}, 0
        if attempt == 2:
            return 503, {"error": "busy"}, {}, 0
        return 200, completion("fine", 2, "stop"), {}, 0

    s = stub(script)
    start = time.monotonic()
    (out,) = engine(s.url).generate([{"prompt": "p"}])
    assert out == Completion("fine", 2, "stop") and s.attempts["p"] == 3
    assert time.monotonic() - start >= 0.3  # Retry-After was honoured


def test_a_row_that_keeps_failing_is_a_failure_and_the_others_go_on(stub):
    def script(prompt, attempt):
        if prompt == "bad":
            return 500, {"error": {"message": "CUDA out of memory"}}, {}, 0
        if prompt == "invalid":
            return 400, {"error": "prompt too long"}, {}, 0
        return 200, completion("ok", 1, "stop"), {}, 0

    s = stub(script)
    good, bad, invalid = engine(s.url).generate([{"prompt": "good"}, {"prompt": "bad"}, {"prompt": "invalid"}])
    assert good == Completion("ok", 1, "stop")
    assert isinstance(bad, Failure) and bad.reason == "server_error"
    assert "HTTP 500" in bad.detail and "CUDA out of memory" in bad.detail and "after 2 retries" in bad.detail
    assert s.attempts["bad"] == 3
    assert invalid == Failure("request_rejected", 'HTTP 400: {"error": "prompt too long"}') and s.attempts["invalid"] == 1


def test_a_slow_request_times_out_then_is_a_failure(stub):
    s = stub(lambda prompt, attempt: (200, completion("late", 1, "stop"), {}, 1.5))
    (out,) = engine(s.url, request_timeout_s=0.3, max_retries=1).generate([{"prompt": "slow"}])
    assert out.reason == "timeout" and "0.3 s" in out.detail and s.attempts["slow"] == 2


def test_odd_answers_are_bad_responses(stub):
    answers = {"html": (502, "<html>bad gateway</html>"), "empty": (200, {"choices": []}),
               "abort": (200, completion("x", 1, "abort"))}
    s = stub(lambda prompt, attempt: (*answers[prompt], {}, 0))
    html, empty, abort = engine(s.url, max_retries=0).generate([{"prompt": p} for p in answers])
    assert html.reason == "server_error" and empty.reason == "bad_response" and abort.reason == "bad_response"


def test_a_server_that_is_gone_stops_the_engine_instead_of_rejecting_rows(stub):
    s = stub()
    e = engine(s.url)
    assert isinstance(e.generate([{"prompt": "p"}])[0], Completion)
    s.stop()
    with pytest.raises(EngineUnavailable, match="did not answer .* rerun the same command"):
        e.generate([{"prompt": f"q{i}"} for i in range(10)])
    with pytest.raises(EngineUnavailable, match="cannot reach the server"):
        engine(s.url)


def test_many_failures_in_a_row_are_an_outage(stub):
    s = stub(lambda prompt, attempt: (503, {"error": "down for maintenance"}, {}, 0))
    with pytest.raises(EngineUnavailable, match="3 requests in a row .*down for maintenance"):
        engine(s.url, max_retries=0, max_consecutive_failures=3, concurrency=1).generate(
            [{"prompt": f"p{i}"} for i in range(10)])
    assert len(s.completions()) == 3  # the rest were never sent


def test_the_api_key_is_sent_but_never_shown(stub, monkeypatch):
    s = stub(lambda prompt, attempt: (401, {"error": "invalid key"}, {}, 0))
    monkeypatch.setenv("MY_KEY", KEY)
    e = engine(s.url, api_key_env="MY_KEY")
    assert s.requests[0]["auth"] == f"Bearer {KEY}"  # the start-up check (GET /models)
    with pytest.raises(EngineUnavailable) as raised:
        e.generate([{"prompt": "p"}])
    assert "$MY_KEY" in str(raised.value) and KEY not in str(raised.value)
    assert KEY not in repr(e) and KEY not in str(read_api_key("MY_KEY")) and read_api_key("UNSET_VAR_X") is None
    passed = engine(s.url, api_key=Secret("from-driver"), api_key_env="NOT_SET_ANYWHERE")
    assert passed.api_key.reveal() == "from-driver" and s.requests[-1]["auth"] == "Bearer from-driver"


def test_the_server_must_serve_the_model_we_name(stub):
    s = stub(models=["meta-llama/Llama-3-8B-Instruct"])
    with pytest.raises(ValueError, match="set generation.served_model"):
        engine(s.url)
    assert engine(s.url, served_model="meta-llama/Llama-3-8B-Instruct").label == "openai:meta-llama/Llama-3-8B-Instruct"


def test_requests_per_second_cap(stub):
    s = stub()
    e = engine(s.url, max_requests_per_s=20, concurrency=4)
    start = time.monotonic()
    out = e.generate([{"prompt": f"p{i}"} for i in range(11)])
    assert all(isinstance(c, Completion) for c in out)
    assert time.monotonic() - start >= 0.5 - 0.02  # 11 requests, 1/20 s apart


def test_backoff_doubles_with_jitter_and_obeys_retry_after():
    assert 0.5 <= backoff_s(1.0, 1, None) <= 1.0 and 2.0 <= backoff_s(1.0, 3, None) <= 4.0
    assert backoff_s(1.0, 1, 7.0) == 7.0 and backoff_s(1.0, 20, None) <= 60


def test_generate_stage_rejects_only_the_failed_rows(stub):
    s = stub(lambda prompt, attempt: (500, {"error": "boom"}, {}, 0) if "bad" in prompt
             else (200, completion("fine", 2, "stop"), {}, 0))
    stage = GenerateStage(engine="openai", model="tiny", num_docs=5, max_new_tokens=8, temperature=0.0, top_p=1.0,
                          openai={"base_url": s.url, "max_retries": 0, "api_key_env": ""})
    batch = pa.table({"id": ["1", "2", "3"], "prompt": ["good", "bad", "fine"],
                      "reject_stage": pa.array([None, None, "retrieve"], pa.string()),
                      "reject_reason": pa.array([None, None, "no_documents"], pa.string()),
                      "reject_detail": pa.array([None, None, "x"], pa.string())})
    rows = stage(batch).to_pylist()
    assert rows[0]["rationale"] == "fine" and rows[0]["generator"] == "openai:tiny" and rows[0]["reject_stage"] is None
    assert (rows[1]["reject_stage"], rows[1]["reject_reason"]) == ("generate", "server_error")
    assert rows[1]["rationale"] is None and "boom" in rows[1]["reject_detail"]
    assert rows[2]["reject_reason"] == "no_documents" and len(s.completions()) == 2  # a rejected row is not sent
