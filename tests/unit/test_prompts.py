"""Prompt fidelity: the rendered user turns must equal PAPER.md's strings, character for character.

The expected strings are written out here by hand from PAPER.md (not built from the module's
constants), so a wording change in prompts.py fails these tests.
"""

import pytest

from instructrag_ray import prompts

DOCS = [
    {"id": "1", "title": "Paris", "text": "Paris is the capital of France.", "score": 9.0},
    {"id": "2", "title": "Lyon", "text": "Lyon is a city in France.", "score": 5.0},
    {"id": "3", "title": "Nice", "text": "Nice is on the coast.", "score": 1.0},
]
# Best-first scores, so the first K are reversed: the best document is rendered last.
RENDERED_DOCS = (
    "Document 1 (Title: Nice): Nice is on the coast.\n\n"
    "Document 2 (Title: Lyon): Lyon is a city in France.\n\n"
    "Document 3 (Title: Paris): Paris is the capital of France.\n\n"
)

POPQA_NOTE = ("Note that the question mainly asks about the object entity that holds a certain relationship with the "
              "given subject entity. There may be multiple correct answers. Make sure your response includes all "
              "correct answers and provides clear reasoning details followed by a concise conclusion.")
ASQA_NOTE = ("Note that the question may be ambiguous and have multiple correct answers. Make sure your response "
             "includes all correct answers and provides clear reasoning details followed by a concise conclusion.")
DEFAULT_NOTE = ("Note that the question may be compositional and require intermediate analysis to deduce the final "
                "answer. Make sure your response is grounded and provides clear reasoning details followed by a "
                "concise conclusion.")


def synthesis_expected(note: str) -> str:
    return (
        "Read the following documents relevant to the given question: what is the capital of France?\n\n"
        + RENDERED_DOCS
        + "Please identify documents that are useful to answer the given question: 'what is the capital of "
        "France?', and explain how the contents lead to the answer: ['Paris', \"Paris's centre\"].\n\n"
        "If none of the documents is aligned with the answer, in that case, you have to explain the answer only "
        "based on your own knowledge, without referring to the provided information.\n\n"
        + note
    )


@pytest.mark.parametrize("dataset,note", [
    ("PopQA", POPQA_NOTE), ("popqa", POPQA_NOTE), ("synthetic-popqa", POPQA_NOTE),
    ("ASQA", ASQA_NOTE), ("synthetic-asqa", ASQA_NOTE),
    ("TriviaQA", DEFAULT_NOTE), ("nq", DEFAULT_NOTE), ("2WikiMultiHopQA", DEFAULT_NOTE),
    ("synthetic-2wikimultihopqa", DEFAULT_NOTE), ("my-own-data", DEFAULT_NOTE),
])
def test_synthesis_prompt_per_dataset(dataset, note):
    docs = prompts.order_docs(DOCS, 5)
    parts = prompts.synthesis_parts(". What is the capital of France", ["Paris", "Paris's centre"], dataset, docs)
    assert parts.text == synthesis_expected(note)


def test_ft_prompt():
    parts = prompts.ft_parts("Who wrote Hamlet", prompts.order_docs(DOCS, 5))
    assert parts.text == RENDERED_DOCS + "Based on your knowledge and the provided information, answer the question:\nwho wrote Hamlet?"


def test_icl_prompt():
    demos = [{"question": "Who is X", "rationale": "R1"}, {"question": "Where is Y?", "rationale": "R2"}]
    parts = prompts.icl_parts("Who wrote Hamlet?", prompts.order_docs(DOCS, 5), demos)
    assert parts.text == (
        "Your task is to analyze the provided documents and answer the given question. Please generate a brief "
        "explanation of how the contents of these documents lead to your answer. If the provided information is not "
        "helpful to answer the question, you only need to respond based on your own knowledge, without referring to "
        "the documents.\n\nBelow are some examples of how to answer the question:\n\n"
        "###\n\nExample 1\n\nQuestion: who is X?\n\nAnswer: R1\n\n"
        "###\n\nExample 2\n\nQuestion: where is Y?\n\nAnswer: R2\n\n"
        "###\n\nNow it is your turn to analyze the following documents and answer the given question.\n\n"
        + RENDERED_DOCS
        + "Based on your knowledge and the provided information, answer the question:\nwho wrote Hamlet?"
    )


@pytest.mark.parametrize("raw,expected", [
    (". Who is he", "who is he?"), ("Who is he?", "who is he?"), ("who is he", "who is he?"),
    ("ABC is what?", "aBC is what?"), ("", "?"),
])
def test_question_normalisation(raw, expected):
    assert prompts.normalize_question(raw) == expected


def test_ordering_rules():
    # descending scores -> reversed; only the first K are kept
    assert [d["id"] for d in prompts.order_docs(DOCS, 2)] == ["2", "1"]
    ascending = list(reversed(DOCS))
    assert [d["id"] for d in prompts.order_docs(ascending, 3)] == ["3", "2", "1"]  # already best-last: kept
    no_scores = [{**d, "score": None} for d in DOCS]
    assert [d["id"] for d in prompts.order_docs(no_scores, 3)] == ["1", "2", "3"]
    equal = [{**d, "score": 1.0} for d in DOCS]
    assert [d["id"] for d in prompts.order_docs(equal, 3)] == ["1", "2", "3"]
    assert prompts.order_docs(DOCS, 0) == []
    assert prompts.render_docs([]) == ""


def test_answers_are_python_list_repr():
    parts = prompts.synthesis_parts("q", ["it's", 'say "hi"'], "nq", [])
    assert "the answer: [\"it's\", 'say \"hi\"']." in parts.text


class WordTokenizer:
    """Fake tokenizer (pure-logic unit test): one token per space-separated word; a chat template that
    wraps the user turn in fixed markers."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt and len(messages) == 1
        return "<user> " + messages[0]["content"] + " <assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split(" ")}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(ids)


def test_render_fits_without_truncation():
    parts = prompts.PromptParts("head", " a b c", " tail")
    out = prompts.render(WordTokenizer(), parts, max_tokens=100)
    assert out.truncated_tokens == 0 and out.text == "<user> head a b c tail <assistant>"


def test_render_truncates_documents_from_the_left_keeping_head_and_tail():
    parts = prompts.PromptParts("HEAD", " d1 d2 d3 d4 d5", " TAIL")
    full = prompts.render(WordTokenizer(), parts, max_tokens=100)
    out = prompts.render(WordTokenizer(), parts, max_tokens=full.tokens - 2)
    assert out.tokens <= full.tokens - 2
    assert out.text.startswith("<user> HEAD") and out.text.endswith("TAIL <assistant>")
    assert "d1" not in out.text and "d5" in out.text  # the leftmost (lowest-ranked) words went first
    assert out.truncated_tokens >= 2


def test_render_raises_when_nothing_fits():
    parts = prompts.PromptParts("a long head here", " d1", " tail")
    with pytest.raises(prompts.PromptTooLong, match="max_model_len"):
        prompts.render(WordTokenizer(), parts, max_tokens=2)


def test_render_with_a_real_chat_template_truncates_only_documents(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    docs = [{"title": f"T{i}", "text": " ".join(f"word{i}x{j}" for j in range(60)), "score": 10.0 - i} for i in range(5)]
    parts = prompts.synthesis_parts("Who is Ann?", ["Bob"], "popqa", prompts.order_docs(docs, 5))
    full = prompts.render(tok, parts, 100_000)
    assert full.truncated_tokens == 0 and full.text.startswith("<|begin_of_text|><|start_header_id|>user")
    assert full.text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    cut = prompts.render(tok, parts, full.tokens - 150)
    assert cut.tokens <= full.tokens - 150 and cut.truncated_tokens >= 150
    assert "Read the following documents relevant to the given question: who is Ann?" in cut.text
    assert parts.tail in cut.text
    # the lowest-ranked document (rendered first) lost its words; the best one (last) is whole
    assert "word4x0 " not in cut.text and "Document 5 (Title: T0): " + docs[0]["text"] in cut.text


# --- Renderer: many prompts at once, the same results as render ---------------------------------------


def _many_parts():
    docs = prompts.order_docs(DOCS, 5)
    long_docs = [{**d, "text": d["text"] * 60} for d in DOCS]
    return [prompts.synthesis_parts("What is the capital of France", ["Paris"], "popqa", docs),
            prompts.synthesis_parts("  Who wrote {Hamlet}? ", ["Shakespeare"], "nq", docs),
            prompts.synthesis_parts("Where is Lyon", ["France"], "asqa", prompts.order_docs(long_docs, 5)),
            prompts.ft_parts("Who wrote Hamlet", docs)]


def _as_results(tokenizer, parts, budget):
    out = []
    for p in parts:
        try:
            out.append(prompts.render(tokenizer, p, budget))
        except prompts.PromptTooLong as e:
            out.append(str(e))
    return out


@pytest.mark.parametrize("budget", [4000, 300, 20])
def test_renderer_equals_render_one_by_one_on_a_real_chat_template(tiny_model, budget):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    renderer = prompts.Renderer(tokenizer)
    assert renderer.affixes is not None  # the tiny model's (Llama 3) template inserts the turn verbatim
    parts = _many_parts()
    got = [r if isinstance(r, prompts.RenderedPrompt) else str(r) for r in renderer.render_many(parts, budget)]
    assert got == _as_results(tokenizer, parts, budget)
    if budget == 300:  # the long-document prompt was cut, the others fit
        assert got[2].truncated_tokens > 0 and got[0].truncated_tokens == 0
    if budget == 20:
        assert all(isinstance(r, str) and "raise generation.max_model_len" in r for r in got)


class TrimmingTokenizer(WordTokenizer):
    """Fake tokenizer (pure logic): a chat template that strips the user turn, so the turn is not inserted
    verbatim and the Renderer must apply the template itself; accepts a list of texts like a real one."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<user> " + messages[0]["content"].strip() + " <assistant>"

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [t.split(" ") for t in text]}
        return super().__call__(text)


def test_renderer_falls_back_to_the_template_when_it_changes_the_turn():
    tokenizer = TrimmingTokenizer()
    renderer = prompts.Renderer(tokenizer)
    assert renderer.affixes is None
    parts = [prompts.PromptParts("  head", " a b c", " tail  "), prompts.PromptParts("HEAD", " d1 d2 d3 d4 d5", " TAIL")]
    got = renderer.render_many(parts, max_tokens=8)
    assert got == _as_results(tokenizer, parts, 8)
    assert got[0].text == "<user> head a b c tail <assistant>"
