"""Generation: rendered prompts in, rationales out, behind one small engine interface.

Engines (chosen by `generation.engine`, built by `make_engine`):
- `TransformersEngine`: a Hugging Face causal LM, greedy by default, on GPU or CPU. Each batch's
  prompts are sorted by length and cut into micro-batches so little padding is computed.
- `TemplateBaselineEngine`: the paper's *template rationale* ablation baseline: no model, a fixed
  sentence naming the documents that contain a gold answer. Labelled `template-baseline` everywhere.

`GenerateStage` is the Ray Data stage (a callable class: the engine is built once per actor).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from . import prompts
from .answers import has_answer
from .batches import add_columns, ok_rows, reject
from .tiny_model import resolve_model

TEMPLATE_BASELINE = "template-baseline"


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # 'stop' or 'length'


class Engine(Protocol):
    label: str  # written to the `generator` column

    def generate(self, rows: Sequence[dict]) -> list[Completion]:
        """One completion per row; a row carries at least `prompt` (and the QA columns)."""
        ...


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
                dtype: str, micro_batch_size: int, sort_by_length: bool, use_gpu: bool, seed: int) -> Engine:
    if engine == TEMPLATE_BASELINE:
        return TemplateBaselineEngine(num_docs=num_docs)
    if engine == "transformers":
        return TransformersEngine(model=model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  dtype=dtype, micro_batch_size=micro_batch_size, sort_by_length=sort_by_length,
                                  use_gpu=use_gpu, seed=seed)
    raise ValueError(f"unknown generation engine {engine!r}; use transformers or {TEMPLATE_BASELINE}")


class GenerateStage:
    """Stage `generate` (actor): reads prompt (and the QA columns); adds rationale, completion_tokens,
    finish_reason, generator. A batch that fails is retried row by row; a row that still fails is
    rejected with stage 'generate'."""

    def __init__(self, **engine_kwargs):
        self.engine = make_engine(**engine_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = ok_rows(rows)
        results: dict[int, Completion] = {}
        try:
            for i, c in zip(todo, self.engine.generate([rows[i] for i in todo])):
                results[i] = c
        except Exception:  # noqa: BLE001 - isolate the failing row instead of losing the batch
            for i in todo:
                try:
                    results[i] = self.engine.generate([rows[i]])[0]
                except Exception as e:  # noqa: BLE001
                    reject(rows[i], "generate", "generation_error", f"{type(e).__name__}: {e}"[:500])
        return add_columns(batch, rows, {
            "rationale": [results[i].text if i in results else None for i in range(len(rows))],
            "completion_tokens": [results[i].completion_tokens if i in results else None for i in range(len(rows))],
            "finish_reason": [results[i].finish_reason if i in results else None for i in range(len(rows))],
            "generator": [self.engine.label if i in results else None for i in range(len(rows))],
        })
