"""The vLLM stage's own pieces, without vLLM: what goes into ray.data.llm's processor and what comes back."""

import pyarrow as pa
import pytest

from instructrag_ray.generation import vllm_engine as generate_vllm
from instructrag_ray.rows import output_field
from instructrag_ray.config import GenerationConfig
from instructrag_ray.errors import InputError
from instructrag_ray.generation.stage import vllm_options
from instructrag_ray.generation.base import load_tokenizer_and_stops
from instructrag_ray.generation.vllm_engine import engine_kwargs, sampling_params, vllm_requests, vllm_results

CTX = pa.list_(pa.struct([("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("score", pa.float64())]))


def batch(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who wrote The Glass Garden?"}],
                                           tokenize=False, add_generation_prompt=True)
    return pa.table({
        "id": ["a", "b", "c"],
        "answers": [["Mira"], ["x", "y"], ["z"]],
        "qa_pairs": pa.array([None, None, None], pa.list_(pa.struct([("question", pa.string()),
                                                                     ("answers", pa.list_(pa.string()))]))),
        "ctxs": pa.array([[{"id": "1", "title": "T", "text": "t", "score": 1.5}], [], None], CTX),
        "prompt": pa.array([prompt, prompt + "x", None], pa.string()),
        "prompt_tokens": pa.array([3, 4, None], output_field("prompt_tokens").type),
        "reject_stage": pa.array([None, None, "retrieve"], pa.string()),
        "reject_reason": pa.array([None, None, "no_documents"], pa.string()),
        "reject_detail": pa.array([None, None, "nothing found"], pa.string()),
    })


def test_requests_carry_our_token_ids_and_the_row_itself(tiny_model):
    tokenizer, stops = load_tokenizer_and_stops("tiny")
    b = batch(tokenizer)
    params = sampling_params(max_new_tokens=8, temperature=0.0, top_p=0.5, seed=3, stop_ids=stops)
    assert params == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop_token_ids": [4, 1],
                      "detokenize": False, "skip_special_tokens": True, "repetition_penalty": 1.0}
    out = vllm_requests(b, model="tiny", params=params, placeholder=stops[:1])
    assert out.column_names == ["row", "tokenized_prompt", "sampling_params"]
    ids = out.column("tokenized_prompt").to_pylist()
    assert ids[0] == tokenizer(b["prompt"][0].as_py(), add_special_tokens=False)["input_ids"]
    assert ids[0][0] == tokenizer.bos_token_id and ids[0][1] != tokenizer.bos_token_id  # one BOS, ours
    assert ids[2] == [4]  # a row rejected upstream rides along with a one-token request
    assert [p["max_tokens"] for p in out.column("sampling_params").to_pylist()] == [8, 8, 1]
    for i, blob in enumerate(out.column("row").to_pylist()):
        back = pa.ipc.open_stream(blob).read_all()
        assert back.schema == b.schema and back.to_pylist() == b.slice(i, 1).to_pylist()


def test_results_restore_the_rows_with_their_schema_and_add_the_generation(tiny_model):
    tokenizer, stops = load_tokenizer_and_stops("tiny")
    b = batch(tokenizer)
    requests = vllm_requests(b, model="tiny", params=sampling_params(
        max_new_tokens=3, temperature=0.0, top_p=1.0, seed=0, stop_ids=stops), placeholder=stops[:1])
    # what the processor hands back (in another order): generated ids, detokenized text, error column
    processed = pa.table({
        "row": requests.column("row").take([1, 0, 2]),
        "generated_tokens": [[7, 8, 9], [7, 4], [4]],
        "generated_text": [" long one ", "short", ""],
        "__inference_error__": ["", "", ""],
    })
    out = vllm_results(processed, label="vllm:tiny", stop_ids=stops, max_new_tokens=3)
    assert out.schema.field("ctxs").type == CTX and out.schema.field("qa_pairs").type == b.schema.field("qa_pairs").type
    rows = {r["id"]: r for r in out.to_pylist()}
    assert (rows["b"]["rationale"], rows["b"]["completion_tokens"], rows["b"]["finish_reason"]) == ("long one", 3, "length")
    assert (rows["a"]["rationale"], rows["a"]["completion_tokens"], rows["a"]["finish_reason"]) == ("short", 2, "stop")
    assert rows["a"]["generator"] == "vllm:tiny" and rows["a"]["ctxs"][0]["score"] == 1.5
    assert rows["c"]["reject_reason"] == "no_documents" and rows["c"]["rationale"] is None  # untouched

    failed = processed.set_column(3, "__inference_error__", pa.array(["", "ValueError: bad prompt", ""]))
    rows = {r["id"]: r for r in vllm_results(failed, label="vllm:tiny", stop_ids=stops, max_new_tokens=3).to_pylist()}
    assert (rows["a"]["reject_stage"], rows["a"]["reject_reason"]) == ("generate", "generation_error")
    assert "bad prompt" in rows["a"]["reject_detail"] and rows["a"]["generator"] is None
    assert rows["b"]["rationale"] == "long one"


def test_engine_arguments():
    assert engine_kwargs(max_model_len=0, dtype="auto", seed=1, tensor_parallel_size=4, pipeline_parallel_size=2,
                         gpu_memory_utilization=0.8, max_num_seqs=0) == {
        "tensor_parallel_size": 4, "pipeline_parallel_size": 2, "gpu_memory_utilization": 0.8,
        "dtype": "bfloat16", "seed": 1}
    kw = engine_kwargs(max_model_len=8192, dtype="float16", seed=0, tensor_parallel_size=1, pipeline_parallel_size=1,
                       gpu_memory_utilization=0.9, max_num_seqs=64)
    assert kw["max_model_len"] == 8192 and kw["max_num_seqs"] == 64 and kw["dtype"] == "float16"
    opts = vllm_options(GenerationConfig(engine="vllm", max_actors=3, tensor_parallel_size=2), "tiny")
    assert opts["max_actors"] == 3 and opts["tensor_parallel_size"] == 2 and opts["model"] == "tiny"


def test_without_vllm_the_engine_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"instructrag-ray\[vllm\]"):
        generate_vllm._require_vllm()
