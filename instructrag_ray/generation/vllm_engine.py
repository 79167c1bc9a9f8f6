"""Stage `generate` on vLLM, through `ray.data.llm`'s vLLM processor (GPU clusters).

`ray.data.llm`'s processor is itself a chain of Ray Data stages (engine replicas as an autoscaling
actor pool, tensor/pipeline parallel placement, continuous batching and paged attention inside
vLLM), so for this engine `vllm_generate` takes the place of `GenerateStage` in the chain instead of
being an engine object behind it. It reads and adds the same columns as `GenerateStage`:

    vllm_requests (CPU tasks)   each row -> the token ids of its prompt, exactly as PromptStage rendered it
                                (tokenized without adding special tokens, as the transformers engine does),
                                vLLM sampling params, and the row itself as an Arrow IPC blob
    ray.data.llm processor      vLLM engine replicas (min_actors..max_actors) -> a detokenize stage on CPU
    vllm_results (CPU tasks)    the rows back, with rationale, completion_tokens, finish_reason, generator

Why the blob: the processor turns rows into Python dicts and back, re-inferring every column's type, so
the row rides through it as opaque bytes and comes back with exactly the schema it went in with.
Why rejected rows go through the processor too (with a one-token request whose result is dropped):
routing them around it would need the dataset twice (filter + union), and Ray Data would run the whole
upstream chain (read, retrieval, prompts) twice.

`ray.data.llm` is an alpha API: `_vllm_processor` is the only function that touches it, and Ray is
pinned exactly in pyproject.toml. vLLM itself is imported only by the processor's engine actors; it is
the optional extra `vllm` (`pip install 'instructrag-ray[vllm]'`).
"""

from __future__ import annotations

import functools

import pyarrow as pa

from ..errors import InputError
from ..models import resolve_model
from ..rows import add_columns, ok_rows, reject, require
from .base import load_tokenizer_and_stops

# CPU share of the request/result tasks and of the processor's detokenize actors.
CPU_STAGE_CPUS = 0.25


def vllm_generate(ds, *, model: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                  repetition_penalty: float, max_model_len: int, dtype: str, batch_size: int, min_actors: int, max_actors: int,
                  tensor_parallel_size: int, pipeline_parallel_size: int, gpu_memory_utilization: float,
                  max_num_seqs: int):
    """Stage `generate` (vLLM): reads prompt (and the reject columns); adds rationale, completion_tokens,
    finish_reason, generator. A row vLLM fails on is rejected (stage generate, generation_error)."""
    _require_vllm()
    _, stop_ids = load_tokenizer_and_stops(model)  # on the driver: a model that does not load fails here
    params = sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             stop_ids=stop_ids, repetition_penalty=repetition_penalty)
    processor = _vllm_processor(
        model_source=resolve_model(model),
        engine_kwargs=engine_kwargs(max_model_len=max_model_len, dtype=dtype, seed=seed,
                                    tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size,
                                    gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs),
        batch_size=batch_size, concurrency=(min_actors, max_actors))
    ds = ds.map_batches(vllm_requests, batch_format="pyarrow", batch_size=batch_size, num_cpus=CPU_STAGE_CPUS,
                        fn_kwargs={"model": model, "params": params, "placeholder": stop_ids[:1]})
    ds = processor(ds)
    return ds.map_batches(vllm_results, batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS,
                          fn_kwargs={"label": f"vllm:{model}", "stop_ids": stop_ids, "max_new_tokens": max_new_tokens})


def sampling_params(*, max_new_tokens: int, temperature: float, top_p: float, seed: int, stop_ids: list[int],
                    repetition_penalty: float = 1.0) -> dict:
    """vLLM SamplingParams as a dict: greedy unless temperature > 0; stops at the model's end-of-turn and
    end-of-text ids like the other engines; detokenizing is left to the processor's CPU stage."""
    return {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
            "seed": seed if temperature > 0 else None, "stop_token_ids": list(stop_ids), "detokenize": False,
            "skip_special_tokens": True, "repetition_penalty": repetition_penalty}


def engine_kwargs(*, max_model_len: int, dtype: str, seed: int, tensor_parallel_size: int,
                  pipeline_parallel_size: int, gpu_memory_utilization: float, max_num_seqs: int) -> dict:
    """vLLM engine arguments. dtype 'auto' means bfloat16, as for the transformers engine on GPU (vLLM's
    own 'auto' would run a float32 checkpoint in float16)."""
    kwargs = {"tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
              "gpu_memory_utilization": gpu_memory_utilization, "dtype": "bfloat16" if dtype == "auto" else dtype,
              "seed": seed}
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs:
        kwargs["max_num_seqs"] = max_num_seqs
    return kwargs


def vllm_requests(batch: pa.Table, model: str, params: dict, placeholder: list[int]) -> pa.Table:
    """Rows -> the processor's input: row (the whole row, Arrow IPC), tokenized_prompt, sampling_params."""
    require(batch, "generate", "prompt", "reject_stage")
    prompts, stages = batch.column("prompt").to_pylist(), batch.column("reject_stage").to_pylist()
    healthy = [i for i, stage in enumerate(stages) if stage is None]
    token_ids = [list(placeholder)] * batch.num_rows
    if healthy:
        encoded = _tokenizer(model)([prompts[i] for i in healthy], add_special_tokens=False)["input_ids"]
        for i, ids in zip(healthy, encoded):
            token_ids[i] = ids
    skip = {**params, "max_tokens": 1}
    return pa.table({
        "row": pa.array([_to_blob(batch.slice(i, 1)) for i in range(batch.num_rows)], pa.binary()),
        "tokenized_prompt": pa.array(token_ids, pa.list_(pa.int64())),
        "sampling_params": [params if stage is None else skip for stage in stages],
    })


def vllm_results(batch: pa.Table, label: str, stop_ids: list[int], max_new_tokens: int) -> pa.Table:
    """The processor's output -> our rows with rationale, completion_tokens, finish_reason, generator."""
    require(batch, "generate", "row", "generated_tokens", "generated_text")
    table = pa.concat_tables([pa.ipc.open_stream(blob).read_all() for blob in batch.column("row").to_pylist()],
                             promote_options="permissive")
    rows = table.to_pylist()
    errors = (batch.column("__inference_error__").to_pylist() if "__inference_error__" in batch.column_names
              else [None] * len(rows))
    tokens, texts = batch.column("generated_tokens").to_pylist(), batch.column("generated_text").to_pylist()
    text, count, finish = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    for i in ok_rows(rows):
        if errors[i]:
            reject(rows[i], "generate", "generation_error", f"vLLM: {errors[i]}"[:500])
            continue
        ids = tokens[i] or []
        stopped = bool(ids) and ids[-1] in stop_ids
        text[i], count[i] = (texts[i] or "").strip(), len(ids)
        finish[i] = "stop" if stopped or len(ids) < max_new_tokens else "length"
    return add_columns(table, rows, {
        "rationale": text, "completion_tokens": count, "finish_reason": finish,
        "generator": [label if t is not None else None for t in text],
    })


def _vllm_output(row: dict) -> dict:
    """The processor's postprocess: keep what vllm_results reads (rows vLLM failed on skip it and keep all)."""
    return {"row": row["row"], "generated_tokens": row["generated_tokens"], "generated_text": row["generated_text"]}


def _vllm_processor(*, model_source: str, engine_kwargs: dict, batch_size: int, concurrency: tuple[int, int]):
    """The one function that touches `ray.data.llm` (alpha; its names change between Ray releases, so Ray
    is pinned). Returns the processor: ds -> ds."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs,
        batch_size=batch_size,
        concurrency=concurrency,
        chat_template_stage=False,  # the prompt is already rendered with the model's chat template (PAPER.md)
        tokenize_stage=False,  # vllm_requests sends token ids: its tokenizer call would add a second BOS
        detokenize_stage={"enabled": True, "num_cpus": CPU_STAGE_CPUS},
        should_continue_on_error=True,  # a row vLLM fails on is rejected; the job goes on
    )
    return build_processor(config, postprocess=_vllm_output)


def _require_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise InputError("generation.engine=vllm needs vLLM on the GPU nodes: pip install 'instructrag-ray[vllm]' "
                          "(it pins the vLLM release this Ray version's ray.data.llm was built against)")


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def _to_blob(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
