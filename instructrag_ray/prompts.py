"""Prompts of InstructRAG, exactly as PAPER.md (from the authors' reference code).

Every function here is pure: a row in, text or chat `messages` out. The model's own tokenizer
applies its chat template (`render`); no special tokens are typed by hand.

Structure of each user turn (PAPER.md; `DOCS` = rendered documents joined by a blank line and
followed by a blank line):
- synthesis: SYNTH_HEAD + DOCS + SYNTH_TAIL(question, answers) + DATASET_NOTE
- FT:        DOCS + FT_QUESTION
- ICL:       ICL_HEAD + demonstrations + ICL_TURN + DOCS + FT_QUESTION

Over-long prompts lose document tokens from the left (the lowest-ranked documents first, because
the best document is placed last); the parts around DOCS are kept whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# --- wording (PAPER.md, verbatim) -------------------------------------------------------------

SYNTH_HEAD = "Read the following documents relevant to the given question: {question}\n\n"
SYNTH_TAIL = (
    "Please identify documents that are useful to answer the given question: '{question}', "
    "and explain how the contents lead to the answer: {answers}.\n\n"
    "If none of the documents is aligned with the answer, in that case, you have to explain the "
    "answer only based on your own knowledge, without referring to the provided information.\n\n"
)

NOTE_POPQA = (
    "Note that the question mainly asks about the object entity that holds a certain relationship "
    "with the given subject entity. There may be multiple correct answers. Make sure your response "
    "includes all correct answers and provides clear reasoning details followed by a concise conclusion."
)
NOTE_ASQA = (
    "Note that the question may be ambiguous and have multiple correct answers. Make sure your "
    "response includes all correct answers and provides clear reasoning details followed by a "
    "concise conclusion."
)
NOTE_DEFAULT = (
    "Note that the question may be compositional and require intermediate analysis to deduce the "
    "final answer. Make sure your response is grounded and provides clear reasoning details "
    "followed by a concise conclusion."
)
# TriviaQA, NaturalQuestions, 2WikiMultiHopQA and (our choice, PAPER.md) any other dataset
# use NOTE_DEFAULT.
DATASET_NOTES = {"popqa": NOTE_POPQA, "asqa": NOTE_ASQA}

FT_QUESTION = "Based on your knowledge and the provided information, answer the question:\n{question}"

ICL_HEAD = (
    "Your task is to analyze the provided documents and answer the given question. Please generate "
    "a brief explanation of how the contents of these documents lead to your answer. If the provided "
    "information is not helpful to answer the question, you only need to respond based on your own "
    "knowledge, without referring to the documents.\n\n"
    "Below are some examples of how to answer the question:\n\n"
)
ICL_DEMO = "###\n\nExample {i}\n\nQuestion: {question}\n\nAnswer: {answer}\n\n"
ICL_TURN = "###\n\nNow it is your turn to analyze the following documents and answer the given question.\n\n"

DOC = "Document {i} (Title: {title}): {text}"


# --- pure pieces ---------------------------------------------------------------------------------


def canonical_dataset(dataset: str) -> str:
    """'synthetic-PopQA', 'popqa_longtail' -> 'popqa'; 'ASQA' -> 'asqa'; others lower-cased.

    Only the dataset note depends on this; synthetic datasets take the note of the style they imitate.
    """
    name = re.sub(r"[^a-z0-9]", "", dataset.lower())
    name = name.removeprefix("synthetic")
    for known in DATASET_NOTES:
        if name.startswith(known):
            return known
    return name


def dataset_note(dataset: str) -> str:
    return DATASET_NOTES.get(canonical_dataset(dataset), NOTE_DEFAULT)


def normalize_question(question: str) -> str:
    """Strip a leading '. ', append '?' if missing, lower-case the first character (reference code)."""
    if question.startswith(". "):
        question = question[2:]
    if not question.endswith("?"):
        question = question + "?"
    return question[:1].lower() + question[1:]


def order_docs(ctxs: Sequence[dict], top_k: int) -> list[dict]:
    """The first top_k documents; reversed when they come best-first, so the best is nearest the question."""
    docs = list(ctxs[:top_k])
    if len(docs) >= 2 and _score(docs[0]) is not None and _score(docs[1]) is not None:
        if _score(docs[0]) > _score(docs[1]):
            docs.reverse()
    return docs


def _score(doc: dict) -> float | None:
    score = doc.get("score")
    return None if score is None else float(score)


def render_docs(docs: Sequence[dict]) -> str:
    """DOCS: each document rendered, joined by a blank line, followed by a blank line ('' when none)."""
    if not docs:
        return ""
    return "\n\n".join(DOC.format(i=i, title=d["title"], text=d["text"]) for i, d in enumerate(docs, 1)) + "\n\n"


@dataclass(frozen=True)
class PromptParts:
    """A user turn as head + DOCS + tail, so DOCS alone can be truncated from the left."""

    head: str
    docs: str
    tail: str

    @property
    def text(self) -> str:
        return self.head + self.docs + self.tail


def synthesis_parts(question: str, answers: Sequence[str], dataset: str, docs: Sequence[dict]) -> PromptParts:
    """The rationale-synthesis user turn: the generator is told the gold answers (PAPER.md)."""
    q = normalize_question(question)
    tail = SYNTH_TAIL.format(question=q, answers=repr(list(answers))) + dataset_note(dataset)
    return PromptParts(SYNTH_HEAD.format(question=q), render_docs(docs), tail)


def ft_parts(question: str, docs: Sequence[dict]) -> PromptParts:
    """InstructRAG-FT user turn (training input and inference): documents then the question."""
    return PromptParts("", render_docs(docs), FT_QUESTION.format(question=normalize_question(question)))


def icl_parts(question: str, docs: Sequence[dict], demos: Sequence[dict]) -> PromptParts:
    """InstructRAG-ICL user turn; demos are {'question', 'rationale'} (their documents are not shown)."""
    head = ICL_HEAD + "".join(
        ICL_DEMO.format(i=i, question=normalize_question(d["question"]), answer=d["rationale"])
        for i, d in enumerate(demos, 1)
    ) + ICL_TURN
    return PromptParts(head, render_docs(docs), FT_QUESTION.format(question=normalize_question(question)))


def messages(user_text: str) -> list[dict]:
    """One user turn as chat messages."""
    return [{"role": "user", "content": user_text}]


# --- rendering with a tokenizer ------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPrompt:
    text: str             # chat-template-rendered prompt, ready to tokenize without special tokens
    tokens: int           # its length in tokens
    truncated_tokens: int  # document tokens cut from the left (0 when it fit)


class PromptTooLong(ValueError):
    """Even with every document token removed the prompt does not fit the token budget."""


def render(tokenizer, parts: PromptParts, max_tokens: int) -> RenderedPrompt:
    """Apply the tokenizer's chat template; if over max_tokens, cut DOCS from the left.

    Cutting works on DOCS' own tokens, so the instruction head and the question tail stay whole,
    as the reference code's left truncation keeps the instruction prefix.
    """
    text = _chat(tokenizer, parts.text)
    n = _count(tokenizer, text)
    if n <= max_tokens:
        return RenderedPrompt(text, n, 0)
    doc_ids = tokenizer(parts.docs, add_special_tokens=False)["input_ids"]
    overflow = n - max_tokens
    # Token boundaries can shift by a token or two when re-tokenising a decoded slice: retry a little.
    for extra in range(0, 8):
        cut = overflow + extra
        if cut > len(doc_ids):
            break
        docs = tokenizer.decode(doc_ids[cut:], skip_special_tokens=False) if cut < len(doc_ids) else ""
        text = _chat(tokenizer, parts.head + docs + parts.tail)
        n = _count(tokenizer, text)
        if n <= max_tokens:
            return RenderedPrompt(text, n, cut)
    bare = _count(tokenizer, _chat(tokenizer, parts.head + parts.tail))
    raise PromptTooLong(
        f"prompt needs {bare} tokens even without documents but the budget is {max_tokens}; "
        "raise generation.max_model_len or lower generation.max_new_tokens"
    )


class Renderer:
    """`render` for many prompts at once, as the prompt stages use it: the chat template is applied by
    string concatenation when it provably inserts the user turn verbatim (checked once, on probe texts
    with edge whitespace, braces and quotes: prefix + text + suffix must equal the template's output),
    and the rendered prompts are tokenized in one batch call; a prompt over budget goes through `render`.
    The results equal `render`'s (tests/unit/test_prompts.py checks it on real chat templates)."""

    PROBES = ("INSTRUCTRAG_PROBE", "  leading and trailing blanks \n\n", "Document 1 (Title: {x}): 'q' \"dq\" <|x|>\n\nend")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.affixes = _verbatim_affixes(tokenizer, self.PROBES)

    def chat(self, user_text: str) -> str:
        if self.affixes is None:
            return _chat(self.tokenizer, user_text)
        return self.affixes[0] + user_text + self.affixes[1]

    def render_many(self, parts: Sequence[PromptParts], max_tokens: int) -> list[RenderedPrompt | PromptTooLong]:
        texts = [self.chat(p.text) for p in parts]
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        out: list[RenderedPrompt | PromptTooLong] = []
        for p, text, n in zip(parts, texts, counts):
            if n <= max_tokens:
                out.append(RenderedPrompt(text, n, 0))
                continue
            try:
                out.append(render(self.tokenizer, p, max_tokens))
            except PromptTooLong as e:
                out.append(e)
        return out


def _verbatim_affixes(tokenizer, probes: Sequence[str]) -> tuple[str, str] | None:
    """(prefix, suffix) such that the chat template renders any user turn as prefix + text + suffix, or
    None when it does not for every probe (a template that trims, escapes or inspects the text)."""
    head, sep, tail = _chat(tokenizer, probes[0]).partition(probes[0])
    if not sep or probes[0] in tail:
        return None
    if all(_chat(tokenizer, probe) == head + probe + tail for probe in probes[1:]):
        return head, tail
    return None


def _chat(tokenizer, user_text: str) -> str:
    return tokenizer.apply_chat_template(messages(user_text), tokenize=False, add_generation_prompt=True)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
