"""The one definition of "correct" (PAPER.md, Metrics).

`normalize` lower-cases, removes punctuation, removes the words a/an/the and collapses whitespace;
a text answers a question when any normalised gold answer is a substring of the normalised text.
The same function drives the synthesis consistency check and evaluation accuracy.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation, in the reference code's order."""
    text = text.lower()
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """True when any non-empty normalised answer occurs in the normalised text."""
    norm_text = normalize(text)
    for answer in answers:
        norm_answer = normalize(answer)
        # An answer that normalises to nothing ("The", "?") would match every text.
        if norm_answer and norm_answer in norm_text:
            return True
    return False


def str_em(text: str, qa_pairs: Sequence[dict]) -> float:
    """ASQA STR-EM: the fraction of qa_pairs with any of their short answers in the text."""
    if not qa_pairs:
        return 0.0
    return sum(has_answer(text, pair["answers"]) for pair in qa_pairs) / len(qa_pairs)
