"""Generation engines: rendered prompts in, texts out, behind one small interface.

Engines (chosen by `generation.engine`; `stage.py` is the one place that picks one):
- `transformers_engine.TransformersEngine`: a Hugging Face causal LM, greedy by default, on GPU or CPU.
- `template.TemplateBaselineEngine`: the paper's *template rationale* ablation baseline (no model).
- `openai_engine.OpenAIEngine`: any OpenAI-compatible server, sent our rendered prompt.
- vLLM (`vllm_engine.py`): not an engine object but a replacement for the generate stage, because
  `ray.data.llm`'s processor is itself a chain of Ray Data stages.

Every engine gets the prompt exactly as the prompt stage rendered it with the model's chat template
(PAPER.md), so rationales have the same form whichever engine wrote them. An engine returns a
`Completion` or a `Failure` per row; it raises `errors.EngineUnavailable` when it is gone itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..models import resolve_model

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
