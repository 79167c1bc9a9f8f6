"""Evaluation metrics on hand-made cases: PAPER.md's accuracy and its normalisation corner cases, ASQA
STR-EM, bootstrap intervals, per-dataset and overall scores, paired differences, and the report."""

import numpy as np
import pytest

from instructrag_ray.metrics import (ACCURACY, OVERALL, STR_EM, bootstrap_ci, compute_metrics, headline_metric,
                                     markdown_report, plot_report, report_figure, score_prediction, stream)

# --- per-row correctness: the one rule (answers.has_answer / answers.str_em) ----------------------------


@pytest.mark.parametrize("prediction,answers,expected", [
    ("The answer is the Eiffel Tower.", ["Eiffel Tower"], True),               # article and full stop
    ("It is an Eiffel tower", ["The Eiffel Tower"], True),                      # articles on both sides
    ("Therefore, the answer is PARIS!", ["paris"], True),                       # case and punctuation
    ("born in Saint-Étienne", ["Saint Étienne"], False),                        # a hyphen is removed, not spaced
    ("born in Saint-Étienne", ["SaintÉtienne"], True),                          # ... so this is what matches
    ("He was a U.S. senator.", ["US senator"], True),                           # dots vanish: U.S. -> us
    ("Answer: Quinnell, A. J.", ["A. J. Quinnell", "Philip Nicholson"], False),  # word order matters
    ("Written by Philip Nicholson.", ["A. J. Quinnell", "Philip Nicholson"], True),  # any of several answers
    ("the theatre", ["the"], False),                                            # an answer that normalises to ''
    ("", ["Paris"], False),
    ("Parisian food", ["Paris"], True),                                         # substring, as in the paper
])
def test_accuracy_follows_papers_normalised_substring_rule(prediction, answers, expected):
    correct, em = score_prediction(prediction, answers, None)
    assert correct is expected
    assert em is None  # no qa_pairs, no STR-EM


def test_str_em_counts_qa_pairs_answered_by_any_short_answer():
    pairs = [{"question": "men", "answers": ["Joey Chestnut", "Chestnut"]},
             {"question": "women", "answers": ["Miki Sudo"]},
             {"question": "2011 women", "answers": ["Sonya Thomas"]}]
    correct, em = score_prediction("The Chestnut brothers and miki sudo won.", ["Joey Chestnut", "Miki Sudo"], pairs)
    assert correct is True and em == pytest.approx(2 / 3)
    assert score_prediction("nobody", ["x"], pairs) == (False, 0.0)
    assert score_prediction("Joey Chestnut, Miki Sudo, Sonya Thomas", ["Takeru"], pairs) == (False, 1.0)


def test_headline_metric_is_str_em_only_when_every_row_has_qa_pairs():
    assert headline_metric([True, True]) == STR_EM
    assert headline_metric([True, False]) == ACCURACY
    assert headline_metric([]) == ACCURACY


# --- bootstrap intervals ----------------------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    ratios = [i / 99 for i in range(100)]  # continuous values: different streams give different intervals
    assert bootstrap_ci(ratios, 1000, 0.95, stream(0, "x")) == bootstrap_ci(ratios, 1000, 0.95, stream(0, "x"))
    assert bootstrap_ci(ratios, 1000, 0.95, stream(0, "x")) != bootstrap_ci(ratios, 1000, 0.95, stream(1, "x"))
    assert bootstrap_ci(ratios, 1000, 0.95, stream(0, "x")) != bootstrap_ci(ratios, 1000, 0.95, stream(0, "y"))
    low, high = bootstrap_ci(values, 1000, 0.95, stream(0, "x"))
    assert low < 0.30 < high
    # binomial standard error sqrt(.3*.7/100) = 0.046: a 95% interval is about +-0.09
    assert 0.15 < high - low < 0.22


def test_bootstrap_interval_degenerate_and_empty():
    assert bootstrap_ci([1.0] * 10, 200, 0.95, stream(0, "x")) == (1.0, 1.0)
    assert bootstrap_ci([], 200, 0.95, stream(0, "x")) == (None, None)


def test_bootstrap_in_chunks_gives_the_same_kind_of_interval(monkeypatch):
    import instructrag_ray.metrics as metrics

    values = np.r_[np.ones(200), np.zeros(200)]
    whole = bootstrap_ci(values, 2000, 0.9, stream(0, "x"))
    monkeypatch.setattr(metrics, "_MAX_DRAW", 4000)  # 10 resamples per chunk
    chunked = bootstrap_ci(values, 2000, 0.9, stream(0, "x"))
    assert whole[0] == pytest.approx(chunked[0], abs=0.01) and whole[1] == pytest.approx(chunked[1], abs=0.01)


# --- per dataset, overall, paired -------------------------------------------------------------------------


def rows():
    """Two methods on 4 PopQA-style rows and 2 ASQA rows; B misses r3 (e.g. its prompt was too long)."""
    out = []
    a_correct = {"p1": True, "p2": True, "p3": False, "p4": True}
    b_correct = {"p1": True, "p2": False, "p4": False}
    for rid, c in a_correct.items():
        out.append({"id": rid, "dataset": "popqa", "method": "A", "correct": c, "str_em": None,
                    "completion_tokens": 10, "finish_reason": "stop"})
    for rid, c in b_correct.items():
        out.append({"id": rid, "dataset": "popqa", "method": "B", "correct": c, "str_em": None,
                    "completion_tokens": 20, "finish_reason": "length"})
    for rid, (ca, ea, cb, eb) in {"q1": (True, 1.0, True, 0.5), "q2": (True, 0.5, False, 0.0)}.items():
        out.append({"id": rid, "dataset": "asqa", "method": "A", "correct": ca, "str_em": ea})
        out.append({"id": rid, "dataset": "asqa", "method": "B", "correct": cb, "str_em": eb})
    return out


def test_scores_per_dataset_and_overall_with_counts():
    m = compute_metrics(rows(), ["A", "B"], resamples=200, seed=3)
    assert m["methods"] == ["A", "B"] and m["datasets"] == ["asqa", "popqa", OVERALL]
    assert m["headline"] == {"asqa": STR_EM, "popqa": ACCURACY, OVERALL: ACCURACY}
    a, b = m["scores"]["A"], m["scores"]["B"]
    assert a["popqa"]["n"] == 4 and a["popqa"]["correct"] == 3 and a["popqa"][ACCURACY]["value"] == 0.75
    assert a["popqa"][STR_EM] is None
    assert a["asqa"][STR_EM]["value"] == 0.75 and a["asqa"][STR_EM]["n"] == 2
    assert a[OVERALL]["n"] == 6 and a[OVERALL][ACCURACY]["value"] == pytest.approx(5 / 6)
    assert b[OVERALL]["n"] == 5 and b[OVERALL][ACCURACY]["value"] == pytest.approx(2 / 5)
    assert b["popqa"]["mean_completion_tokens"] == 20 and b["popqa"]["finish_reason_length_share"] == 1.0
    for entry in (a["popqa"][ACCURACY], b["asqa"][STR_EM], a[OVERALL][ACCURACY]):
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    # the same seed gives the same numbers; adding a method changes none of A's
    again = compute_metrics(rows() + [dict(r, method="C") for r in rows() if r["method"] == "A"], ["A", "B", "C"],
                            resamples=200, seed=3)
    assert again["scores"]["A"] == m["scores"]["A"]


def test_paired_differences_use_only_rows_both_methods_answered():
    m = compute_metrics(rows(), ["A", "B"], resamples=200, seed=0)
    pairs = {(p["dataset"], p["metric"]): p for p in m["paired"]}
    popqa = pairs[("popqa", ACCURACY)]
    assert (popqa["a"], popqa["b"], popqa["n"]) == ("A", "B", 3)  # p3 has no B prediction
    assert popqa["a_value"] == 1.0 and popqa["b_value"] == pytest.approx(1 / 3)
    assert popqa["difference"]["value"] == pytest.approx(2 / 3)
    assert (popqa["a_better"], popqa["b_better"]) == (2, 0)
    em = pairs[("asqa", STR_EM)]
    assert em["n"] == 2 and em["difference"]["value"] == pytest.approx(0.5)
    assert em["difference"]["ci_low"] <= 0.5 <= em["difference"]["ci_high"]
    assert ("popqa", STR_EM) not in pairs  # no qa_pairs there
    assert pairs[(OVERALL, ACCURACY)]["n"] == 5


def test_identical_methods_differ_by_exactly_zero():
    same = [dict(r, method="B") for r in rows() if r["method"] == "A"]
    m = compute_metrics([r for r in rows() if r["method"] == "A"] + same, ["A", "B"], resamples=100)
    for p in m["paired"]:
        assert p["difference"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        assert p["a_better"] == p["b_better"] == 0


# --- report -------------------------------------------------------------------------------------------------


def test_markdown_report_and_chart(tmp_path):
    m = compute_metrics([dict(r, method={"A": "instructrag-icl", "B": "vanilla-rag"}[r["method"]]) for r in rows()],
                        ["instructrag-icl", "vanilla-rag"], resamples=100)
    text = markdown_report(m, "Test")
    assert text.startswith("# Test\n")
    assert "| method | asqa (STR-EM) | popqa (accuracy) | overall (accuracy) |" in text
    assert "| instructrag-icl | 75.0 [" in text and "n=4 | 83.3 [" in text
    assert "| instructrag-icl − vanilla-rag | +50.0 [" in text
    assert "(2/0) n=3" in text  # popqa: two rows only ICL got right, none the other way
    plot_report(m, tmp_path / "r.png", "Test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_labels_n_shows_zero_bars_and_plots_the_paired_differences():
    """The figure's objects (not pixels): n on every bar, an outline for a zero score, a second panel
    with InstructRAG − each baseline and its interval whiskers."""
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer
    from matplotlib.patches import Rectangle

    names = {"A": "instructrag-icl", "B": "vanilla-rag"}
    zero = [dict(r, method="no-retrieval", correct=False, str_em=None if r["str_em"] is None else 0.0)
            for r in rows() if r["method"] == "A"]
    m = compute_metrics([dict(r, method=names[r["method"]]) for r in rows()] + zero,
                        ["instructrag-icl", "vanilla-rag", "no-retrieval"], resamples=100)
    fig = report_figure(m, "Test")
    scores, paired = fig.axes
    labels = [t.get_text() for t in scores.texts]
    assert len(labels) == 9  # 3 methods x (asqa, popqa, overall)
    assert "75\nn=4" in labels and "40\nn=5" in labels and labels.count("0\nn=6") == 1
    outlines = [p for p in scores.patches if isinstance(p, Rectangle) and p.get_label() == "_zero"]
    assert len(outlines) == 3 and all(p.get_height() > 0 and not p.get_fill() for p in outlines)
    assert [t.get_text() for t in paired.get_legend().get_texts()] == [
        "instructrag-icl − vanilla-rag", "instructrag-icl − no-retrieval"]
    bars = [c for c in paired.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and all(c.has_yerr for c in bars)
    assert "+67\nn=3" in [t.get_text() for t in paired.texts]  # popqa: ICL − vanilla-rag on 3 shared rows
    plt.close(fig)
    # without a pair to compare, one panel
    single = compute_metrics([r for r in rows() if r["method"] == "A"], ["A"], resamples=50)
    fig = report_figure(single)
    assert len(fig.axes) == 1
    plt.close(fig)
