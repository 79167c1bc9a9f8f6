"""One fingerprint builder for synthesis and evaluation: every setting that shapes an output changes the
fingerprint, and no other does. Every key of both jobs is classified below, so a new key must be too."""

from __future__ import annotations

import pytest

from instructrag_ray.config import EvaluateConfig, SynthesizeConfig, all_keys, load_config
from instructrag_ray.evaluate import method_fingerprint

# key -> (value that changes it, extra overrides the change needs to matter)
SHAPING = {
    "prompt.num_docs": ("3", []),
    "retrieval.backend": ("elasticsearch", ["retrieval.es_index=wiki"]),
    "retrieval.index_path": ("/other/index", []),
    "retrieval.top_k": ("7", []),
    "retrieval.fields": ("title^0.5,text", []),
    "retrieval.es_index": ("other", ["retrieval.backend=elasticsearch"]),
    "generation.engine": ("vllm", []),
    "generation.model": ("/models/other", []),
    "generation.max_new_tokens": ("99", []),
    "generation.max_model_len": ("2048", []),
    "generation.dtype": ("bfloat16", []),
    "generation.temperature": ("0.7", []),
    "generation.top_p": ("0.9", ["generation.temperature=0.7"]),
    "generation.repetition_penalty": ("1.2", []),
    "generation.seed": ("5", ["generation.temperature=0.7"]),
    "generation.base_url": ("http://127.0.0.1:9/v1", ["generation.engine=openai"]),
    "generation.served_model": ("served", ["generation.engine=openai"]),
    "generation.send_stop_token_ids": ("true", ["generation.engine=openai"]),
    "generation.tokenizer": ("/models/hf", ["generation.engine=llamacpp", "generation.model=/models/m.gguf",
                                            "generation.tokenizer=/models/other"]),
    "dataset": ("popqa", []),
}
# evaluation's extra overrides for a key (llamacpp cannot run instructrag-ft, one of the default methods)
EVAL_EXTRA = {"generation.tokenizer": ["methods=no-retrieval"]}
# Keys that never change what is written: where it goes, how much of it, how fast, with what resources.
NOT_SHAPING = {
    "input", "output", "limit", "overwrite", "ray_address", "progress_interval_s", "verbose", "rows_per_file",
    "retrieval.batch_size", "retrieval.num_cpus", "retrieval.min_actors", "retrieval.max_actors",
    "retrieval.resources", "retrieval.es_url", "retrieval.es_api_key", "retrieval.es_username",
    "retrieval.es_password", "retrieval.es_ca_certs", "retrieval.es_verify_certs", "retrieval.es_request_timeout_s",
    "retrieval.es_max_retries", "retrieval.es_retry_backoff_s", "retrieval.es_max_concurrent_searches",
    "retrieval.es_search_type",
    "prompt.num_cpus", "prompt.min_actors", "prompt.max_actors",
    "generation.batch_size", "generation.micro_batch_size", "generation.sort_by_length", "generation.num_gpus",
    "generation.num_cpus", "generation.min_actors", "generation.max_actors", "generation.resources",
    "generation.api_key_env", "generation.max_requests_per_s", "generation.request_timeout_s",
    "generation.max_retries", "generation.retry_backoff_s", "generation.concurrency",
    "generation.max_consecutive_failures", "generation.tensor_parallel_size", "generation.pipeline_parallel_size",
    "generation.gpu_memory_utilization", "generation.max_num_seqs",
}
# Evaluation's own keys.
EVAL_SHAPING = {"ft_model", "sft_model"}
EVAL_NOT_SHAPING = {"methods", "demos.path", "demos.num", "demos.seed", "demos.pool", "metrics.resamples",
                    "metrics.confidence", "metrics.seed"}  # demos shape through the chosen rows, metrics are reports
BASE = ["input=in.jsonl", "output=out", "retrieval.index_path=/index", "generation.base_url=http://127.0.0.1:8/v1"]
EVAL_BASE = BASE + ["ft_model=/ft", "sft_model=/sft", "demos.path=demos.json"]


def test_every_key_of_both_jobs_is_classified():
    synth = set(all_keys(SynthesizeConfig()))
    assert synth == set(SHAPING) | NOT_SHAPING, synth ^ (set(SHAPING) | NOT_SHAPING)
    evaluation = set(all_keys(EvaluateConfig()))
    assert evaluation == set(SHAPING) | NOT_SHAPING | EVAL_SHAPING | EVAL_NOT_SHAPING


def synthesis_fp(*overrides: str) -> str:
    return load_config(SynthesizeConfig, None, BASE + list(overrides)).fingerprint()


def eval_fp(method: str, *overrides: str) -> str:
    cfg = load_config(EvaluateConfig, None, EVAL_BASE + list(overrides))
    return method_fingerprint(cfg, method, {"popqa": [{"id": "d1", "question": "q", "rationale": "r", "answer": "a"}]})


@pytest.mark.parametrize("key", sorted(SHAPING))
def test_a_shaping_key_changes_both_jobs_fingerprints(key):
    value, extra = SHAPING[key]
    assert synthesis_fp(*extra) != synthesis_fp(*extra, f"{key}={value}"), key
    method = "no-retrieval" if key.startswith("generation.") or key == "dataset" else "vanilla-rag"
    extra = extra + EVAL_EXTRA.get(key, [])
    assert eval_fp(method, *extra) != eval_fp(method, *extra, f"{key}={value}"), key


@pytest.mark.parametrize("key,value", [("limit", "5"), ("generation.batch_size", "3"), ("generation.max_actors", "4"),
                                       ("retrieval.max_actors", "3"), ("retrieval.es_request_timeout_s", "5"),
                                       ("progress_interval_s", "1"), ("generation.micro_batch_size", "2")])
def test_other_keys_leave_the_fingerprints_alone(key, value):
    assert synthesis_fp() == synthesis_fp(f"{key}={value}")
    assert eval_fp("vanilla-rag") == eval_fp("vanilla-rag", f"{key}={value}")


def test_evaluation_fingerprints_follow_their_own_model_documents_and_demonstrations():
    assert eval_fp("instructrag-ft") != eval_fp("instructrag-ft", "ft_model=/ft2")
    assert eval_fp("vanilla-rag") == eval_fp("vanilla-rag", "ft_model=/ft2")  # the base model's method
    assert eval_fp("vanilla-sft") != eval_fp("vanilla-sft", "sft_model=/sft2")
    assert eval_fp("instructrag-ft") == eval_fp("instructrag-ft", "sft_model=/sft2")
    assert eval_fp("no-retrieval") == eval_fp("no-retrieval", "retrieval.top_k=9")  # no documents
    cfg = load_config(EvaluateConfig, None, EVAL_BASE)
    one = {"popqa": [{"id": "d1", "question": "q", "rationale": "r", "answer": "a"}]}
    other = {"popqa": [{"id": "d2", "question": "q", "rationale": "r", "answer": "a"}]}
    assert method_fingerprint(cfg, "instructrag-icl", one) != method_fingerprint(cfg, "instructrag-icl", other)
    assert method_fingerprint(cfg, "vanilla-rag", one) == method_fingerprint(cfg, "vanilla-rag", other)


def test_the_index_contents_shape_the_fingerprint():
    cfg = load_config(SynthesizeConfig, None, BASE)
    assert cfg.fingerprint("index-a") != cfg.fingerprint("index-b")
