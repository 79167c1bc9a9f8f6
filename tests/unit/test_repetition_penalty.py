"""generation.repetition_penalty: validated (> 0), off at 1.0, and passed to every engine's decoding."""

from __future__ import annotations

import pytest

from instructrag_ray.config import SynthesizeConfig, load_config
from instructrag_ray.errors import ConfigError
from instructrag_ray.generation.stage import engine_options, vllm_options
from instructrag_ray.generation.transformers_engine import decoding_kwargs
from instructrag_ray.generation.vllm_engine import sampling_params

BASE = ["input=in.jsonl", "output=out", "retrieval.index_path=/index"]


def cfg(*overrides: str) -> SynthesizeConfig:
    return load_config(SynthesizeConfig, None, BASE + list(overrides))


def test_default_is_off():
    assert SynthesizeConfig().generation.repetition_penalty == 1.0


@pytest.mark.parametrize("value", ["0", "-1.2"])
def test_zero_or_negative_is_refused_in_one_line_naming_the_key(value):
    with pytest.raises(ConfigError) as e:
        cfg(f"generation.repetition_penalty={value}")
    assert "generation.repetition_penalty" in str(e.value) and "\n" not in str(e.value)


def test_it_reaches_the_engines():
    g = cfg("generation.repetition_penalty=1.2").generation
    assert engine_options(g, "tiny", 5)["repetition_penalty"] == 1.2
    assert vllm_options(g, "tiny")["repetition_penalty"] == 1.2
    assert sampling_params(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0, stop_ids=[2],
                           repetition_penalty=1.2)["repetition_penalty"] == 1.2


def test_transformers_generate_gets_it_over_the_generated_tokens_only_when_on():
    import torch

    common = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, stop_ids=[2], pad_token_id=2, prompt_length=3)
    on = decoding_kwargs(repetition_penalty=2.0, **common)
    assert on["do_sample"] is False and on["eos_token_id"] == [2] and "repetition_penalty" not in on
    (penalty,) = on["logits_processor"]
    # prompt [5, 6, 7], generated so far [6]: only token 6 (generated) is penalized, not 5 or 7 (prompt only)
    scores = penalty(torch.tensor([[5, 6, 7, 6]]), torch.ones(1, 10))
    assert scores[0, 6] == 0.5 and scores[0, 5] == scores[0, 7] == 1.0
    off = decoding_kwargs(repetition_penalty=1.0, **common)
    assert "logits_processor" not in off and "repetition_penalty" not in off


def test_the_fingerprint_changes_with_it_but_not_when_off():
    assert cfg("generation.repetition_penalty=1.2").fingerprint() != cfg().fingerprint()
    assert cfg("generation.repetition_penalty=1.0").fingerprint() == cfg().fingerprint()
