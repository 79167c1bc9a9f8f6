"""Training examples: PAPER.md's FT prompt (documents + question) as the user turn and the rationale
as the assistant turn, rendered by the model's chat template, with labels on the target only.

With data.target=answer the assistant turn is the row's first gold answer instead: the paper's vanilla
SFT baseline, trained on the same prompts and evaluated with the same FT prompt (method vanilla-sft)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from .. import prompts
from ..errors import TrainingError
from ..models import resolve_model
from ..rows import reject, require

IGNORE_INDEX = -100
# Input columns the examples are built from.
INPUT_COLUMNS = ["id", "dataset", "question", "answers", "ctxs", "rationale", "consistent"]


class TargetTooLong(ValueError):
    """The rendered target and end-of-turn token alone leave no room for a prompt."""


class NoAnswer(ValueError):
    """data.target=answer, and the row has no gold answer to train on."""


class TemplateError(TrainingError):
    """The chat template does not render the prompt as a prefix of the prompt + reply conversation."""


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt tokens (label -100) then the target tokens."""

    input_ids: list[int]
    prompt_tokens: int      # leading tokens without loss
    truncated_tokens: int   # prompt tokens cut to fit max_length (0 when it fit)
    question_cut: bool      # even without documents the prompt did not fit: it was cut from the left

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_tokens + self.input_ids[self.prompt_tokens:]

    @property
    def target_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_tokens


def ft_texts(tokenizer, question: str, docs: list[dict], rationale: str) -> tuple[prompts.PromptParts, str]:
    """The FT user turn (as parts) and the target text: the chat-template-rendered assistant turn.

    The target is what the template adds after the generation prompt, so it ends with the model's own
    end-of-turn token (PAPER.md: rationale, then end-of-turn), and the prompt seen in training is
    exactly the prompt rendered at inference.
    """
    parts = prompts.ft_parts(question, docs)
    user = prompts.messages(parts.text)
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": rationale}], tokenize=False)
    if not full.startswith(prompt):
        raise TemplateError(
            "the chat template does not render the prompt with the generation header as a prefix of the "
            "conversation with the reply, so the reply tokens cannot be told apart; use a model whose "
            "template does (Llama-3-Instruct, Mistral, Qwen2.5 do)")
    return parts, full[len(prompt):]


def build_example(tokenizer, question: str, ctxs: list[dict], rationale: str, num_docs: int,
                  max_length: int) -> Example:
    """PAPER.md's FT example: documents + question -> rationale + end-of-turn, at most max_length tokens.

    The prompt and the target are tokenized separately (as at inference, where generation starts after
    the rendered prompt). The target is kept whole; the prompt loses document tokens from the left
    (`prompts.render`); if even the bare question does not fit, the prompt's own tokens are cut from
    the left (the reference code's plain left truncation). Raises TargetTooLong when the target
    leaves no room for a single prompt token.
    """
    parts, target = ft_texts(tokenizer, question, prompts.order_docs(ctxs, num_docs), rationale)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    budget = max_length - len(target_ids)
    if budget < 1:
        raise TargetTooLong(f"the target and end-of-turn are {len(target_ids)} tokens; data.max_length="
                            f"{max_length} leaves no room for the prompt; raise data.max_length")
    try:
        rendered = prompts.render(tokenizer, parts, budget)
        prompt_ids = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
        return Example(prompt_ids + target_ids, len(prompt_ids), rendered.truncated_tokens, False)
    except prompts.PromptTooLong:
        bare = tokenizer.apply_chat_template(prompts.messages(parts.head + parts.tail), tokenize=False,
                                             add_generation_prompt=True)
        bare_ids = tokenizer(bare, add_special_tokens=False)["input_ids"]
        doc_ids = tokenizer(parts.docs, add_special_tokens=False)["input_ids"]
        cut = len(bare_ids) - budget
        return Example(bare_ids[cut:] + target_ids, budget, len(doc_ids) + cut, True)


EXAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()), ("dataset", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("tokens", pa.int32()), ("prompt_tokens", pa.int32()),
    ("target_tokens", pa.int32()),
    ("truncated_tokens", pa.int32()), ("question_cut", pa.bool_()),
    ("inconsistent", pa.bool_()),  # left out by data.consistent_only (a filter, not a reject)
    ("reject_stage", pa.string()), ("reject_reason", pa.string()), ("reject_detail", pa.string()),
    ("original", pa.string()),
])
TRAIN_COLUMNS = ["id", "input_ids", "prompt_tokens"]


class ExampleStage:
    """Stage `examples` (actor; the tokenizer is loaded once): reads id, dataset, question, ctxs,
    rationale, consistent; writes id, dataset, input_ids, prompt_tokens, target_tokens,
    truncated_tokens, question_cut, tokens; `inconsistent` for a row left out because its rationale
    holds no gold answer (data.consistent_only); the reject columns and original (rows.py's vocabulary)
    for a row that cannot be trained on (stage train, reason target_too_long, or no_answer with
    target=answer)."""

    def __init__(self, model: str, num_docs: int, max_length: int, consistent_only: bool, target: str = "rationale"):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.num_docs, self.max_length, self.target = num_docs, max_length, target
        self.consistent_only = consistent_only and target == "rationale"

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, "examples", *INPUT_COLUMNS)
        out = []
        for row in batch.to_pylist():
            rec = {"id": row["id"], "dataset": row["dataset"], "input_ids": None, "tokens": None, "prompt_tokens": None,
                   "target_tokens": None, "truncated_tokens": None, "question_cut": None, "inconsistent": False,
                   "reject_stage": None, "reject_reason": None, "reject_detail": None, "original": None}
            if self.consistent_only and not row["consistent"]:
                rec["inconsistent"] = True
                out.append(rec)
                continue
            try:
                ex = build_example(self.tokenizer, row["question"], row["ctxs"], target_text(row, self.target),
                                   self.num_docs, self.max_length)
            except (TargetTooLong, NoAnswer) as e:
                reject(rec, "train", "target_too_long" if isinstance(e, TargetTooLong) else "no_answer", str(e))
                rec["original"] = json.dumps(row, ensure_ascii=False, default=str)
            else:
                rec.update(input_ids=ex.input_ids, tokens=len(ex.input_ids), prompt_tokens=ex.prompt_tokens,
                           target_tokens=ex.target_tokens,
                           truncated_tokens=ex.truncated_tokens, question_cut=ex.question_cut)
            out.append(rec)
        return pa.Table.from_pylist(out, schema=EXAMPLE_SCHEMA)


def target_text(row: dict, target: str) -> str:
    """The assistant turn of one example: the rationale, or (target=answer) the first gold answer."""
    if target == "rationale":
        return row["rationale"]
    answers = [a for a in row["answers"] or [] if a and a.strip()]
    if not answers:
        raise NoAnswer("the row has no gold answer to train on (data.target=answer)")
    return answers[0]


def trainable(batch: pa.Table) -> pa.Table:
    """Stage `select`: keeps the rows to train on, and only the columns the workers need."""
    import pyarrow.compute as pc

    keep = pc.and_(pc.is_null(batch["reject_stage"]), pc.invert(batch["inconsistent"]))
    return batch.filter(keep).select(TRAIN_COLUMNS)
