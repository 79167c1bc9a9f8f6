"""Generation: rendered prompts in, rationales out, behind one small engine interface.

Engines (chosen by `generation.engine`):
- `TransformersEngine`: a Hugging Face causal LM, greedy by default, on GPU or CPU. Each batch's
  prompts are sorted by length and cut into micro-batches so little padding is computed.
- `TemplateBaselineEngine`: the paper's *template rationale* ablation baseline: no model, a fixed
  sentence naming the documents that contain a gold answer. Labelled `template-baseline` everywhere.
- `OpenAIEngine` (generate_openai.py): any OpenAI-compatible server, sent our rendered prompt.
- vLLM (generate_vllm.py): not an engine object but a replacement for this stage, because
  `ray.data.llm`'s processor is itself a chain of Ray Data stages.

Every engine gets the prompt exactly as `PromptStage` rendered it with the model's chat template
(PAPER.md), so rationales have the same form whichever engine wrote them.

`GenerateStage` is the Ray Data stage (a callable class: the engine is built once per actor).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from . import prompts
from .answers import has_answer
from .batches import add_columns, ok_rows, reject, require
from .tiny_model import resolve_model

TEMPLATE_BASELINE = "template-baseline"


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # 'stop' or 'length'


@dataclass(frozen=True)
class Failure:
    """A row the engine could not generate (e.g. the server answered 500 to it after every retry):
    the row is rejected with stage 'generate', this reason code and detail; the other rows go on."""

    reason: str
    detail: str


class EngineUnavailable(RuntimeError):
    """The engine itself is gone (its server stopped answering): not a problem of the rows, so none is
    rejected; the job stops, every row written so far is kept, and rerunning the command continues."""


class Engine(Protocol):
    label: str  # written to the `generator` column

    def generate(self, rows: Sequence[dict]) -> list[Completion | Failure]:
        """One result per row; a row carries at least `prompt` (and the QA columns)."""
        ...


class Secret:
    """A credential passed to the actors: its repr and str never show the value, so it cannot leak into
    logs, tracebacks or a printed config."""

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def read_api_key(env_var: str) -> Secret | None:
    """The API key from the environment variable named in the config (never from the config itself)."""
    value = os.environ.get(env_var, "") if env_var else ""
    return Secret(value) if value else None


@dataclass
class PaddingStats:
    """Token slots computed in generate() calls: real prompt tokens vs padding (for benchmarks)."""

    prompt_tokens: int = 0
    pad_tokens: int = 0

    @property
    def pad_share(self) -> float:
        total = self.prompt_tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0


@dataclass
class TransformersEngine:
    model: str
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    dtype: str = "auto"
    micro_batch_size: int = 8
    sort_by_length: bool = True
    use_gpu: bool = False
    seed: int = 0
    stats: PaddingStats = field(default_factory=PaddingStats)

    def __post_init__(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if self.device == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        path = resolve_model(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.stop_ids = stop_token_ids(self.lm.generation_config, self.tokenizer)
        self.label = f"transformers:{self.model}"
        torch.manual_seed(self.seed)

    def generate(self, rows: Sequence[dict]) -> list[Completion]:
        texts = [r["prompt"] for r in rows]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i]) if self.sort_by_length else list(range(len(texts)))
        results: list[Completion | None] = [None] * len(texts)
        for start in range(0, len(order), self.micro_batch_size):
            chunk = order[start:start + self.micro_batch_size]
            for i, completion in zip(chunk, self._generate_micro([texts[i] for i in chunk])):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _generate_micro(self, texts: list[str]) -> list[Completion]:
        import torch

        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.device)
        real = int(enc["attention_mask"].sum())
        self.stats.prompt_tokens += real
        self.stats.pad_tokens += enc["attention_mask"].numel() - real
        sampling = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        with torch.inference_mode():
            out = self.lm.generate(**enc, max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                   pad_token_id=self.tokenizer.pad_token_id, top_k=None, **sampling)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        return [self._completion(ids) for ids in new]

    def _completion(self, ids: list[int]) -> Completion:
        for n, token in enumerate(ids):
            if token in self.stop_ids:
                text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                return Completion(text.strip(), n + 1, "stop")
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), "length")


def load_tokenizer_and_stops(model: str):
    """The model's tokenizer and its stop ids (`stop_token_ids`), without loading its weights: for the
    engines whose model runs elsewhere (a server, vLLM replicas)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model config carries eos_token_id
        generation_config = AutoConfig.from_pretrained(path)
    return tokenizer, stop_token_ids(generation_config, tokenizer)


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """End-of-turn and end-of-text ids: the generation config's eos list plus the tokenizer's eos."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class TemplateBaselineEngine:
    """The paper's template-rationale ablation baseline: names the documents holding a gold answer."""

    num_docs: int = 5
    label: str = TEMPLATE_BASELINE

    def generate(self, rows: Sequence[dict]) -> list[Completion]:
        return [self._one(r) for r in rows]

    def _one(self, row: dict) -> Completion:
        docs = prompts.order_docs(row["ctxs"], self.num_docs)
        pairs = row.get("qa_pairs") or []
        stated = [p["answers"][0] for p in pairs if p["answers"]] or [row["answers"][0]]
        conclusion = (f"Therefore, the answer is {stated[0]}." if len(stated) == 1
                      else f"Therefore, the answers are {_join(stated)}.")
        useful = [f"Document {i} (Title: {d['title']})" for i, d in enumerate(docs, 1)
                  if has_answer(d["text"], row["answers"])]
        if useful:
            text = f"{_join(useful)} {'contains' if len(useful) == 1 else 'contain'} the answer. {conclusion}"
        else:
            text = f"None of the documents contains the answer, so I answer from my own knowledge. {conclusion}"
        return Completion(text, len(text.split()), "stop")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_engine(engine: str, *, model: str, num_docs: int, max_new_tokens: int, temperature: float, top_p: float,
                dtype: str = "auto", micro_batch_size: int = 8, sort_by_length: bool = True, use_gpu: bool = False,
                seed: int = 0, openai: dict | None = None) -> Engine:
    """The engine named by `generation.engine`. `openai` holds the openai engine's connection settings
    (OpenAIEngine's fields: base_url, served_model, api_key, max_requests_per_s, ...)."""
    if engine == TEMPLATE_BASELINE:
        return TemplateBaselineEngine(num_docs=num_docs)
    if engine == "transformers":
        return TransformersEngine(model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  dtype=dtype, micro_batch_size=micro_batch_size, sort_by_length=sort_by_length,
                                  use_gpu=use_gpu, seed=seed)
    if engine == "openai":
        from .generate_openai import OpenAIEngine

        return OpenAIEngine(model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, **(openai or {}))
    if engine == "vllm":
        raise ValueError("the vllm engine replaces GenerateStage in the chain: use generate_vllm.vllm_generate")
    raise ValueError(f"unknown generation engine {engine!r}; use transformers, {TEMPLATE_BASELINE} or openai")


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
