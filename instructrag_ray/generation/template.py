"""The `template-baseline` engine: the paper's template-rationale ablation baseline (no model).

One sentence naming the documents that contain a gold answer, then the answer; labelled
`template-baseline` in the `generator` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import prompts
from ..answers import has_answer
from .base import TEMPLATE_BASELINE, Completion


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
