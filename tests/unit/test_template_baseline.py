from instructrag_ray.generation.base import TEMPLATE_BASELINE
from instructrag_ray.generation.template import TemplateBaselineEngine

CTXS = [{"id": "1", "title": "Paris", "text": "Paris is the capital.", "score": 3.0},
        {"id": "2", "title": "Lyon", "text": "Lyon is a city.", "score": 2.0},
        {"id": "3", "title": "France", "text": "Its capital, Paris, is large.", "score": 1.0}]


def test_names_the_answer_documents_in_prompt_order():
    (c,) = TemplateBaselineEngine(num_docs=3).generate([{"ctxs": CTXS, "answers": ["Paris"], "qa_pairs": None}])
    # best-first scores are reversed in the prompt: France is Document 1, Paris is Document 3
    assert c.text == ("Document 1 (Title: France) and Document 3 (Title: Paris) contain the answer. "
                      "Therefore, the answer is Paris.")
    assert c.finish_reason == "stop" and c.completion_tokens > 0


def test_no_answer_document_and_multiple_answers():
    row = {"ctxs": CTXS[1:2], "answers": ["Daei", "Bican"],
           "qa_pairs": [{"question": "a", "answers": ["Daei"]}, {"question": "b", "answers": ["Bican"]}]}
    (c,) = TemplateBaselineEngine(num_docs=5).generate([row])
    assert c.text.startswith("None of the documents contains the answer")
    assert c.text.endswith("Therefore, the answers are Daei and Bican.")
    assert TemplateBaselineEngine().label == TEMPLATE_BASELINE == "template-baseline"
