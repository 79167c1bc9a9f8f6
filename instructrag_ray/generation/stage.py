"""Stage `generate` of the synthesis and evaluation chains: the one place that picks an engine.

`generate(ds, g, model, num_docs)` adds the stage to a Ray Data chain: for transformers, openai and the
template baseline an autoscaling actor pool of `GenerateStage` (one engine per actor); for vLLM,
`ray.data.llm`'s processor chain in its place. Both read `prompt` and add rationale,
completion_tokens, finish_reason and generator.
"""

from __future__ import annotations

import pyarrow as pa

from ..config import GenerationConfig, parse_resources
from ..errors import EngineUnavailable
from ..rows import add_columns, ok_rows, reject, require
from .base import TEMPLATE_BASELINE, Completion, Engine, Failure, read_api_key


def make_engine(engine: str, *, model: str, num_docs: int, max_new_tokens: int, temperature: float, top_p: float,
                dtype: str = "auto", micro_batch_size: int = 8, sort_by_length: bool = True, use_gpu: bool = False,
                seed: int = 0, repetition_penalty: float = 1.0, openai: dict | None = None,
                llamacpp: dict | None = None) -> Engine:
    """The engine named by `generation.engine` (vllm is not an engine object: see `generate`). `openai`
    holds the openai engine's connection settings (OpenAIEngine's fields: base_url, served_model, ...);
    `llamacpp` the llamacpp engine's own (LlamaCppEngine's fields: tokenizer, max_model_len, parallel, threads)."""
    if engine == TEMPLATE_BASELINE:
        from .template import TemplateBaselineEngine

        return TemplateBaselineEngine(num_docs=num_docs)
    if engine == "transformers":
        from .transformers_engine import TransformersEngine

        return TransformersEngine(model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  dtype=dtype, micro_batch_size=micro_batch_size, sort_by_length=sort_by_length,
                                  use_gpu=use_gpu, seed=seed, repetition_penalty=repetition_penalty)
    if engine == "openai":
        from .openai_engine import OpenAIEngine

        return OpenAIEngine(model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, repetition_penalty=repetition_penalty, **(openai or {}))
    if engine == "llamacpp":
        from .llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, repetition_penalty=repetition_penalty, **(llamacpp or {}))
    raise ValueError(f"unknown generation engine {engine!r}; use transformers, {TEMPLATE_BASELINE}, openai or llamacpp")


def engine_options(g: GenerationConfig, model: str, num_docs: int) -> dict:
    """make_engine's keyword arguments (plain values that pickle to the actors). For openai the API key
    is read here, on the driver, from the variable api_key_env names and passed as a Secret (it never
    shows in a repr); an actor whose own environment has it uses that."""
    options = {"engine": g.engine, "model": model, "num_docs": num_docs, "max_new_tokens": g.max_new_tokens,
               "temperature": g.temperature, "top_p": g.top_p, "dtype": g.dtype,
               "micro_batch_size": g.micro_batch_size, "sort_by_length": g.sort_by_length,
               "use_gpu": g.num_gpus > 0, "seed": g.seed, "repetition_penalty": g.repetition_penalty}
    if g.engine == "openai":
        options["openai"] = {
            "base_url": g.base_url, "served_model": g.served_model,
            "api_key": read_api_key(g.api_key_env), "api_key_env": g.api_key_env,
            # the cap is for the whole job: each of the (at most) max_actors actors takes an equal share
            "max_requests_per_s": g.max_requests_per_s / g.max_actors,
            "request_timeout_s": g.request_timeout_s, "max_retries": g.max_retries,
            "retry_backoff_s": g.retry_backoff_s, "concurrency": g.concurrency,
            "max_consecutive_failures": g.max_consecutive_failures, "send_stop_token_ids": g.send_stop_token_ids,
        }
    if g.engine == "llamacpp":
        options["llamacpp"] = {"tokenizer": g.prompt_model(model), "max_model_len": g.max_model_len,
                               "parallel": g.micro_batch_size, "threads": llamacpp_threads(g.num_cpus)}
    return options


def llamacpp_threads(num_cpus: float) -> int:
    """llama.cpp's CPU threads for an actor of `num_cpus` CPUs: the whole CPUs, at least one."""
    return max(1, int(num_cpus))


def check_engine(g: GenerationConfig, key: str, model: str) -> None:
    """The engine's own checks on the driver, before any Ray work: for llamacpp, xllamacpp is installed
    and `model` has a GGUF file (a named model's is fetched here)."""
    if g.engine == "llamacpp":
        from ..models import check_gguf
        from .llamacpp_engine import import_xllamacpp

        import_xllamacpp()
        check_gguf(key, model)


def vllm_options(g: GenerationConfig, model: str) -> dict:
    """vllm_engine.vllm_generate's keyword arguments."""
    return {"model": model, "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "seed": g.seed, "repetition_penalty": g.repetition_penalty, "max_model_len": g.max_model_len, "dtype": g.dtype, "batch_size": g.batch_size,
            "min_actors": g.min_actors, "max_actors": g.max_actors, "tensor_parallel_size": g.tensor_parallel_size,
            "pipeline_parallel_size": g.pipeline_parallel_size,
            "gpu_memory_utilization": g.gpu_memory_utilization, "max_num_seqs": g.max_num_seqs}


def generate(ds, g: GenerationConfig, model: str, num_docs: int):
    """Add stage `generate` for `model` to the chain `ds` (the engine and resources of `generation.*`)."""
    import ray

    if g.engine == "vllm":  # ray.data.llm's processor is itself a chain of stages: it takes GenerateStage's place
        from .vllm_engine import vllm_generate

        return vllm_generate(ds, **vllm_options(g, model))
    resources = parse_resources(g.resources, "generation.resources")
    return ds.map_batches(
        GenerateStage, batch_format="pyarrow", batch_size=g.batch_size, num_cpus=g.num_cpus,
        num_gpus=g.num_gpus if g.engine == "transformers" else 0, **({"resources": resources} if resources else {}),
        compute=ray.data.ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors),
        fn_constructor_kwargs=engine_options(g, model, num_docs))


class GenerateStage:
    """Stage `generate` (actor): reads prompt (and the QA columns); adds rationale, completion_tokens,
    finish_reason, generator. A row the engine reports as failed is rejected with stage 'generate' and
    the engine's reason; a batch that raises is retried row by row, and a row that still raises is
    rejected (generation_error). EngineUnavailable stops the job instead: the engine is gone, not the row."""

    def __init__(self, **engine_kwargs):
        self.engine = make_engine(**engine_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, "generate", "prompt")
        rows = batch.to_pylist()
        todo = ok_rows(rows)
        outcomes: dict[int, Completion | Failure] = {}
        try:
            outcomes.update(zip(todo, self.engine.generate([rows[i] for i in todo])))
        except EngineUnavailable:
            raise
        except Exception:  # noqa: BLE001 - isolate the failing row instead of losing the batch
            for i in todo:
                try:
                    outcomes[i] = self.engine.generate([rows[i]])[0]
                except EngineUnavailable:
                    raise
                except Exception as e:  # noqa: BLE001
                    outcomes[i] = Failure("generation_error", f"{type(e).__name__}: {e}"[:500])
        results: dict[int, Completion] = {}
        for i, outcome in outcomes.items():
            if isinstance(outcome, Failure):
                reject(rows[i], "generate", outcome.reason, outcome.detail)
            else:
                results[i] = outcome
        return add_columns(batch, rows, {
            "rationale": [results[i].text if i in results else None for i in range(len(rows))],
            "completion_tokens": [results[i].completion_tokens if i in results else None for i in range(len(rows))],
            "finish_reason": [results[i].finish_reason if i in results else None for i in range(len(rows))],
            "generator": [self.engine.label if i in results else None for i in range(len(rows))],
        })
