"""generation.engine=llamacpp without llama.cpp: config validation, what the fingerprint records, the
settings the actor receives, the request bodies and how llama.cpp's answers become completions or rejects.
The server is never started here (tests/integration/test_llamacpp_engine.py runs the real one)."""

import pytest

from instructrag_ray.config import ConfigError, EvaluateConfig, SynthesizeConfig, load_config
from instructrag_ray.generation.base import Completion, Failure
from instructrag_ray.generation.llamacpp_engine import parse_response, request_body, server_params
from instructrag_ray.generation.stage import engine_options, llamacpp_threads

BASE = ["input=qa.jsonl", "output=out", "generation.engine=llamacpp"]


def cfg(*extra):
    c = load_config(SynthesizeConfig, None, BASE + list(extra))
    c.validate()
    return c


def test_model_must_be_a_gguf_file_or_a_named_model():
    assert cfg("generation.model=smollm2-135m").generation.prompt_model("smollm2-135m") == "smollm2-135m"
    with pytest.raises(ConfigError, match="llamacpp needs generation.model = a .gguf file or one of smollm2-135m"):
        cfg("generation.model=tiny")
    with pytest.raises(ConfigError, match="needs generation.tokenizer"):
        cfg("generation.model=/m/model.Q4_K_M.gguf")
    g = cfg("generation.model=/m/model.gguf", "generation.tokenizer=/m/hf").generation
    assert g.prompt_model(g.model) == "/m/hf"
    with pytest.raises(ConfigError, match="llamacpp runs on CPU"):
        cfg("generation.model=smollm2-135m", "generation.num_gpus=1")


def test_tokenizer_key_is_only_for_llamacpp():
    with pytest.raises(ConfigError, match="generation.tokenizer' is for generation.engine=llamacpp"):
        load_config(SynthesizeConfig, None, ["input=qa.jsonl", "output=out", "generation.tokenizer=/m/hf"]).validate()


def test_evaluation_cannot_run_the_fine_tuned_model_with_llamacpp():
    with pytest.raises(ConfigError, match="instructrag-ft, which generation.engine=llamacpp cannot run"):
        load_config(EvaluateConfig, None, BASE + ["generation.model=smollm2-135m", "methods=vanilla-rag,instructrag-ft",
                                                  "ft_model=/ft/model"]).validate()


def test_fingerprint_records_engine_and_tokenizer_not_threads_or_slots():
    plain = cfg("generation.model=smollm2-135m").fingerprint()
    transformers = load_config(SynthesizeConfig, None, ["input=qa.jsonl", "output=out", "generation.model=smollm2-135m"])
    assert plain != transformers.fingerprint()
    for same in ("generation.num_cpus=4", "generation.micro_batch_size=2", "generation.batch_size=3"):
        assert cfg("generation.model=smollm2-135m", same).fingerprint() == plain, same
    a = cfg("generation.model=/m/x.gguf", "generation.tokenizer=/m/hf").fingerprint()
    assert a != cfg("generation.model=/m/x.gguf", "generation.tokenizer=/m/other").fingerprint()


def test_actor_settings():
    g = cfg("generation.model=/m/x.gguf", "generation.tokenizer=/m/hf", "generation.micro_batch_size=4",
            "generation.num_cpus=2.5", "generation.max_model_len=2048").generation
    options = engine_options(g, g.model, 5)
    assert options["engine"] == "llamacpp" and options["model"] == "/m/x.gguf"
    assert options["llamacpp"] == {"tokenizer": "/m/hf", "max_model_len": 2048, "parallel": 4, "threads": 2}
    assert [llamacpp_threads(n) for n in (0, 0.5, 1, 3.9)] == [1, 1, 1, 3]


def test_request_bodies_greedy_sampled_and_penalized():
    greedy = request_body("P", max_new_tokens=9, temperature=0.0, top_p=0.9, seed=3, repetition_penalty=1.0)
    assert greedy == {"prompt": "P", "max_tokens": 9, "cache_prompt": False, "temperature": 0.0, "top_k": 1,
                      "repeat_penalty": 1.0}
    sampled = request_body("P", max_new_tokens=9, temperature=0.7, top_p=0.9, seed=3, repetition_penalty=1.2)
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["seed"] == 3
    assert sampled["top_k"] == 0 and sampled["min_p"] == 0.0  # llama.cpp's own filters off, as transformers samples
    assert sampled["repeat_penalty"] == 1.2 and sampled["repeat_last_n"] == 64


class FakeParams:
    """A stand-in for xllamacpp.CommonParams: plain attributes."""

    def __init__(self):
        self.model = type("M", (), {})()
        self.cpuparams = type("C", (), {})()
        self.cpuparams_batch = type("C", (), {})()


def test_server_params():
    p = server_params(FakeParams(), "/m/x.gguf", parallel=4, threads=2, context=8192)
    assert p.model.path == "/m/x.gguf" and p.n_parallel == 4 and p.n_ctx == 4 * 8192
    assert p.cpuparams.n_threads == p.cpuparams_batch.n_threads == 2 and p.warmup is False and p.verbosity == -1


def test_responses_become_completions_or_rejects():
    ok = {"choices": [{"text": " Paris. ", "finish_reason": "stop"}], "usage": {"completion_tokens": 4}}
    assert parse_response(ok) == Completion("Paris.", 4, "stop")
    cut = {"choices": [{"text": "a b", "finish_reason": "length"}], "usage": {"completion_tokens": 2}}
    assert parse_response(cut) == Completion("a b", 2, "length")
    error = {"error": {"code": 400, "message": "request (9000 tokens) exceeds the available context size",
                       "type": "exceed_context_size_error"}}
    rejected = parse_response(error)
    assert isinstance(rejected, Failure) and rejected.reason == "request_rejected"
    assert "exceed_context_size_error (400)" in rejected.detail
    assert parse_response({"id": "x"}).reason == "bad_response"  # no choices (KeyError in research code)
    assert parse_response({"choices": [{"text": "", "finish_reason": None}], "usage": {"completion_tokens": 0}}).reason == "bad_response"
