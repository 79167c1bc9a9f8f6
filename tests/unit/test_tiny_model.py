"""The built-in tiny model: builds offline, loads with Auto* classes, chats like Llama-3, and builds
identically everywhere, once, even when several processes ask for it at the same time."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructrag_ray.testing import tiny_model
from instructrag_ray.config import TINY_MODEL
from instructrag_ray.models import resolve_model
from instructrag_ray.testing.tiny_model import ensure_tiny_model, tiny_model_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_path_prefers_argument_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTRAG_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny_model_path(tmp_path / "arg") == tmp_path / "arg" / "tiny-llama-v1"
    assert tiny_model_path() == tmp_path / "env" / "tiny-llama-v1"
    monkeypatch.delenv("INSTRUCTRAG_CACHE")
    assert tiny_model_path() == tmp_path / "home" / ".cache" / "instructrag-ray" / "tiny-llama-v1"


def test_loads_with_auto_classes_and_is_small(model_dir, tokenizer, model):
    assert model_dir == tiny_model_path(model_dir.parent)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 4096
    assert model.config.vocab_size == len(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 <= n_params <= 5_000_000
    assert 1000 <= len(tokenizer) <= 4096


def test_special_tokens_and_left_padding(tokenizer):
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.padding_side == "left"
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tokenizer.tokenize(token) == [token]  # one special token, never split


def test_byte_level_encodes_any_text_losslessly(tokenizer):
    text = "Zoë Ångström visited 東京 in 1987 🙂\ttabs\nand\r\nnewlines"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_instruction_wording_tokenizes_compactly(tokenizer):
    text = "Read the following documents relevant to the given question"
    assert len(tokenizer.tokenize(text)) == len(text.split())


def test_chat_template_renders_llama3_layout(tokenizer):
    messages = [{"role": "user", "content": "Who wrote The Silent River?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Who wrote The Silent River?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    # Plain text (no template) gets exactly one bos from the post-processor.
    plain = tokenizer("Who wrote it?").input_ids
    assert plain[0] == tokenizer.bos_token_id and plain.count(tokenizer.bos_token_id) == 1


def test_chat_template_marks_assistant_tokens_for_sft(tokenizer):
    messages = [
        {"role": "user", "content": "Question?"},
        {"role": "assistant", "content": "The answer is Oslo."},
    ]
    out = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "The answer is Oslo.<|eot_id|>"


def test_generation_config_stops_at_end_of_turn(model, tokenizer):
    gen = model.generation_config
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in gen.eos_token_id
    assert tokenizer.eos_token_id in gen.eos_token_id
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert gen.bos_token_id == tokenizer.bos_token_id
    assert gen.do_sample is False


def test_greedy_generate_on_left_padded_batch(model, tokenizer):
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        for content in ("Where was Alma Ashford born?", "Hi")
    ]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id  # the short prompt is padded on the left
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        alone = tokenizer(prompts[1], add_special_tokens=False, return_tensors="pt")
        out_alone = model.generate(**alone, max_new_tokens=4, do_sample=False)
    width = batch.input_ids.shape[1]
    assert out.shape[0] == 2 and width < out.shape[1] <= width + 4
    # Left padding with the attention mask must not change what the short prompt generates.
    n_new = out_alone.shape[1] - alone.input_ids.shape[1]
    assert out[1, width : width + n_new].tolist() == out_alone[0, -n_new:].tolist()


def test_build_is_deterministic(model_dir, tmp_path):
    other = ensure_tiny_model(tmp_path)
    assert other != model_dir
    text_files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                  "generation_config.json")
    for name in text_files:
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name
    ours = load_file(model_dir / "model.safetensors")
    theirs = load_file(other / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_second_call_returns_cached_path_without_building(model_dir, monkeypatch):
    def fail(out_dir):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "_build", fail)
    assert ensure_tiny_model(model_dir.parent) == model_dir


def test_racing_builders_in_threads_end_with_one_model(tmp_path, monkeypatch):
    # Hold every builder until all have built, so all of them race for the rename.
    n = 3
    real_build, barrier = tiny_model._build, threading.Barrier(n)

    def build_then_wait(out_dir):
        real_build(out_dir)
        barrier.wait(timeout=60)

    monkeypatch.setattr(tiny_model, "_build", build_then_wait)
    results, errors = [], []

    def call():
        try:
            results.append(ensure_tiny_model(tmp_path))
        except BaseException as e:  # reported below, a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [tiny_model_path(tmp_path)] * n
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama-v1"]  # temp dirs cleaned up
    AutoModelForCausalLM.from_pretrained(results[0])
    AutoTokenizer.from_pretrained(results[0])


def test_racing_builders_in_processes_end_with_one_model(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # like Ray actors: fresh interpreters
    with ctx.Pool(3) as pool:
        paths = pool.map(ensure_tiny_model, [tmp_path] * 3)
    assert paths == [tiny_model_path(tmp_path)] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama-v1"]
    AutoModelForCausalLM.from_pretrained(paths[0])


def test_incomplete_target_is_reported(tmp_path):
    tiny_model_path(tmp_path).mkdir(parents=True)
    (tiny_model_path(tmp_path) / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not a complete tiny-model build"):
        ensure_tiny_model(tmp_path)


def test_resolve_model(model_dir, monkeypatch):
    monkeypatch.setenv("INSTRUCTRAG_CACHE", str(model_dir.parent))
    assert resolve_model(TINY_MODEL) == str(model_dir)
    assert resolve_model("/some/dir") == "/some/dir"
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
