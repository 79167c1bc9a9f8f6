"""Generation settings of the two new engines: what the fingerprint and the manifest record, and what the
stages receive (never the API key itself in anything written)."""

import json

import pytest

from instructrag_ray.config import ConfigError, SynthesizeConfig, load_config, to_dict
from instructrag_ray.generation.base import Secret
from instructrag_ray.generation.stage import engine_options

BASE = ["input=qa.jsonl", "output=out"]
SERVER = ["generation.engine=openai", "generation.base_url=http://127.0.0.1:8000/v1"]


def cfg(*extra):
    return load_config(SynthesizeConfig, None, BASE + list(extra))


def test_existing_fingerprints_do_not_change():
    """The keys added for the new engines stay out of the other engines' fingerprint, so outputs written
    before these engines existed still resume."""
    for engine in ("transformers", "template-baseline"):
        plain = cfg(f"generation.engine={engine}").fingerprint()
        for change in ("generation.base_url=http://x:1/v1", "generation.served_model=m", "generation.concurrency=3",
                       "generation.send_stop_token_ids=true", "generation.tensor_parallel_size=2",
                       "generation.max_num_seqs=8", "generation.api_key_env=K"):
            assert cfg(f"generation.engine={engine}", change).fingerprint() == plain, (engine, change)


def test_engine_server_model_sampling_and_stop_settings_shape_the_fingerprint(monkeypatch):
    openai = cfg(*SERVER)
    assert openai.fingerprint() != cfg().fingerprint() != cfg("generation.engine=vllm").fingerprint()
    for change in ("generation.base_url=http://other:8000/v1", "generation.served_model=llama",
                   "generation.send_stop_token_ids=true", "generation.temperature=0.5", "generation.max_new_tokens=9"):
        assert cfg(*SERVER, change).fingerprint() != openai.fingerprint(), change
    for same in ("generation.max_retries=9", "generation.request_timeout_s=5", "generation.max_requests_per_s=2",
                 "generation.concurrency=1", "generation.api_key_env=OTHER"):
        assert cfg(*SERVER, same).fingerprint() == openai.fingerprint(), same
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a")
    a = cfg(*SERVER).fingerprint()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-b")
    assert cfg(*SERVER).fingerprint() == a


def test_engine_options_carry_the_key_as_a_secret_and_split_the_rate(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    c = cfg(*SERVER, "generation.api_key_env=MY_KEY", "generation.max_requests_per_s=10", "generation.max_actors=4")
    options = engine_options(c.generation, c.generation.model, 5)
    assert options["engine"] == "openai" and options["model"] == "tiny"
    assert isinstance(options["openai"]["api_key"], Secret) and options["openai"]["api_key"].reveal() == "sk-secret-value"
    assert options["openai"]["max_requests_per_s"] == 2.5
    assert "sk-secret-value" not in repr(options) and "sk-secret-value" not in json.dumps(to_dict(c), default=str)
    assert "openai" not in engine_options(cfg().generation, "tiny", 5)
    assert engine_options(cfg().generation, "/m", 5)["model"] == "/m"


@pytest.mark.parametrize("overrides, message", [
    (["generation.engine=openai"], "needs generation.base_url"),
    (["generation.engine=openai", "generation.base_url=localhost:8000"], "must start with http"),
    (["generation.engine=vllm", "generation.num_gpus=1"], "tensor_parallel_size x pipeline_parallel_size"),
    (["generation.gpu_memory_utilization=1.5"], "must be <= 1"),
])
@pytest.mark.parametrize("job", ["synthesize", "evaluate"])
def test_engine_settings_are_checked_when_a_job_config_loads(overrides, message, job):
    from instructrag_ray.config import EvaluateConfig

    config, base = ((SynthesizeConfig, BASE) if job == "synthesize"
                    else (EvaluateConfig, BASE + ["methods=vanilla-rag"]))
    load_config(config, None, base)  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        load_config(config, None, base + overrides)


def test_new_engines_are_choices():
    assert cfg("generation.engine=vllm").generation.engine == "vllm"
    with pytest.raises(ConfigError, match="allowed: transformers, template-baseline, vllm, openai"):
        cfg("generation.engine=sglang")
