"""Evaluation metrics and their report: per-row correctness, per-dataset and overall scores with
bootstrap confidence intervals, paired differences between methods, a markdown table and a PNG chart.

Correctness is not defined here: `score_prediction` calls `answers.has_answer` (PAPER.md's accuracy,
the same rule as the synthesis consistency check) and `answers.str_em` (ASQA STR-EM).

- **accuracy**: the share of rows whose prediction contains a normalised gold answer.
- **str_em**: the mean STR-EM over the rows that carry `qa_pairs` (ASQA).
- **headline** metric of a dataset: str_em when every row has qa_pairs (ASQA, as in the paper),
  else accuracy; `overall` pools every row and its headline is accuracy.
- **confidence intervals**: percentile bootstrap over rows (seeded; each interval has its own
  stream derived from the seed and the interval's name, so adding a method changes no other number).
- **paired differences**: method A minus method B on the ids both answered, with a paired bootstrap
  interval (the same resampled rows for both methods), plus how many rows only A or only B got right.

Values in metrics.json are fractions (0-1); the report shows percentages.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from .answers import has_answer, str_em

OVERALL = "overall"
INSTRUCTRAG_PREFIX = "instructrag-"
ACCURACY, STR_EM = "accuracy", "str_em"
METRIC_LABELS = {ACCURACY: "accuracy", STR_EM: "STR-EM"}
# Bootstrap draws are made in chunks of at most this many row indices (memory stays ~160 MB).
_MAX_DRAW = 20_000_000


def score_prediction(prediction: str, answers: Sequence[str], qa_pairs: Sequence[dict] | None) -> tuple[bool, float | None]:
    """(correct, str_em) of one prediction: PAPER.md's accuracy rule, and STR-EM when the row has qa_pairs."""
    return has_answer(prediction, answers), (str_em(prediction, qa_pairs) if qa_pairs else None)


def headline_metric(has_qa_pairs: Iterable[bool]) -> str:
    """str_em for a dataset whose rows all carry qa_pairs (ASQA), else accuracy."""
    flags = list(has_qa_pairs)
    return STR_EM if flags and all(flags) else ACCURACY


def bootstrap_ci(values: Sequence[float], resamples: int, confidence: float,
                 rng: np.random.Generator) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of `values` ((None, None) when empty)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return None, None
    means = np.empty(resamples)
    step = max(1, _MAX_DRAW // n)
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        means[start:start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def stream(seed: int, name: str) -> np.random.Generator:
    """The random stream of one interval: depends only on the seed and the interval's name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def summarize(values: Sequence[float], resamples: int, confidence: float, rng: np.random.Generator) -> dict:
    """{value, ci_low, ci_high, n} of the mean of `values` (value None when empty)."""
    low, high = bootstrap_ci(values, resamples, confidence, rng)
    return {"value": float(np.mean(values)) if len(values) else None, "ci_low": low, "ci_high": high,
            "n": len(values)}


def compute_metrics(rows: Sequence[dict], methods: Sequence[str] | None = None, *, resamples: int = 1000,
                    confidence: float = 0.95, seed: int = 0) -> dict:
    """Scores per method, dataset and overall, and paired differences, from prediction rows.

    Each row needs id, dataset, method, correct, str_em (None without qa_pairs); completion_tokens
    and finish_reason are summarised when present. `methods` fixes the order (default: as found).
    """
    methods = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in rows))
    datasets = sorted({r["dataset"] for r in rows})
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        for d in (r["dataset"], OVERALL):
            by_key.setdefault((r["method"], d), {})[r["id"]] = r
    qa_flags = {d: [r["str_em"] is not None for r in rows if r["dataset"] == d] for d in datasets}
    headline = {d: headline_metric(qa_flags[d]) for d in datasets}
    headline[OVERALL] = ACCURACY
    columns = datasets + [OVERALL]

    scores: dict = {}
    for m in methods:
        scores[m] = {}
        for d in columns:
            group = list(by_key.get((m, d), {}).values())
            if not group:
                continue
            correct = [float(r["correct"]) for r in group]
            em = [r["str_em"] for r in group if r["str_em"] is not None]
            entry = {
                "n": len(group),
                "correct": int(sum(correct)),
                ACCURACY: summarize(correct, resamples, confidence, stream(seed, f"{m}|{d}|{ACCURACY}")),
                STR_EM: summarize(em, resamples, confidence, stream(seed, f"{m}|{d}|{STR_EM}")) if em else None,
            }
            tokens = [r["completion_tokens"] for r in group if r.get("completion_tokens") is not None]
            if tokens:
                entry["mean_completion_tokens"] = float(np.mean(tokens))
            reasons = [r["finish_reason"] for r in group if r.get("finish_reason") is not None]
            if reasons:
                entry["finish_reason_length_share"] = sum(x == "length" for x in reasons) / len(reasons)
            scores[m][d] = entry

    paired = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            for d in columns:
                for metric in (ACCURACY, STR_EM):
                    entry = paired_difference(by_key.get((a, d), {}), by_key.get((b, d), {}), metric, resamples,
                                              confidence, stream(seed, f"{a}-{b}|{d}|{metric}"))
                    if entry is not None:
                        paired.append({"a": a, "b": b, "dataset": d, "metric": metric, **entry})

    return {"methods": methods, "datasets": columns, "headline": headline, "confidence": confidence,
            "resamples": resamples, "seed": seed, "scores": scores, "paired": paired}


def paired_difference(a_rows: dict[str, dict], b_rows: dict[str, dict], metric: str, resamples: int,
                      confidence: float, rng: np.random.Generator) -> dict | None:
    """A minus B on the ids both have (for str_em: both have and carry qa_pairs); None when none."""
    ids = sorted(set(a_rows) & set(b_rows))
    if metric == STR_EM:
        ids = [i for i in ids if a_rows[i]["str_em"] is not None and b_rows[i]["str_em"] is not None]
    if not ids:
        return None
    if metric == ACCURACY:
        a = np.array([float(a_rows[i]["correct"]) for i in ids])
        b = np.array([float(b_rows[i]["correct"]) for i in ids])
    else:
        a = np.array([a_rows[i]["str_em"] for i in ids])
        b = np.array([b_rows[i]["str_em"] for i in ids])
    diff = summarize(a - b, resamples, confidence, rng)
    return {"n": len(ids), "a_value": float(a.mean()), "b_value": float(b.mean()),
            "difference": {k: diff[k] for k in ("value", "ci_low", "ci_high")},
            "a_better": int((a > b).sum()), "b_better": int((a < b).sum())}


# --- the report ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(entry: dict | None) -> str:
    if not entry or entry["value"] is None:
        return "–"
    return f"{_pct(entry['value'])} [{_pct(entry['ci_low'])}, {_pct(entry['ci_high'])}] n={entry['n']}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def markdown_report(metrics: dict, title: str = "Evaluation") -> str:
    """The report: one table of headline scores with intervals and counts, one of paired differences."""
    conf = round(100 * metrics["confidence"])
    cols = metrics["datasets"]
    head = [f"{d} ({METRIC_LABELS[metrics['headline'][d]]})" for d in cols]
    lines = [f"# {title}", "",
             f"Scores in %, with {conf}% bootstrap confidence intervals ({metrics['resamples']} resamples, seed "
             f"{metrics['seed']}) and example counts. Accuracy: a normalised gold answer occurs in the normalised "
             "output (PAPER.md); STR-EM (ASQA): the mean share of qa_pairs answered.", "",
             "| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for m in metrics["methods"]:
        cells = [_cell((metrics["scores"][m].get(d) or {}).get(metrics["headline"][d])) for d in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    paired = report_pairs(metrics)
    if paired:
        lines += ["", f"Paired differences A − B on the same rows, in percentage points, with {conf}% bootstrap "
                  "intervals; (A>B / A<B) counts the rows where one method scored higher.", "",
                  "| A − B | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
        pairs = list(dict.fromkeys((p["a"], p["b"]) for p in paired))
        index = {(p["a"], p["b"], p["dataset"]): p for p in paired}
        for a, b in pairs:
            cells = []
            for d in cols:
                p = index.get((a, b, d))
                if p is None:
                    cells.append("–")
                    continue
                diff = p["difference"]
                cells.append(f"{_signed(diff['value'])} [{_signed(diff['ci_low'])}, {_signed(diff['ci_high'])}] "
                             f"({p['a_better']}/{p['b_better']}) n={p['n']}")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_pairs(metrics: dict) -> list[dict]:
    """The paired differences the report shows: on each column's headline metric, InstructRAG against
    every other method (every pair when no InstructRAG method ran); metrics.json keeps all of them."""
    paired = [p for p in metrics["paired"] if p["metric"] == metrics["headline"][p["dataset"]]]
    return [p for p in paired if p["a"].startswith(INSTRUCTRAG_PREFIX)] or paired


def plot_report(metrics: dict, path, title: str = "Evaluation") -> None:
    """report.png: `report_figure`, saved."""
    import matplotlib.pyplot as plt

    fig = report_figure(metrics, title)
    fig.savefig(path)
    plt.close(fig)


def report_figure(metrics: dict, title: str = "Evaluation"):
    """Two panels: the headline score of every method per dataset and overall (bars with interval
    whiskers, each labelled with its value and n; a zero score is a flat outlined bar labelled 0), and
    the paired differences InstructRAG − each baseline on the same rows (points with interval whiskers,
    a line at 0, labelled with the difference and n)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    pairs = report_pairs(metrics)
    cols = metrics["datasets"]
    fig, axes = plt.subplots(2 if pairs else 1, 1, figsize=(max(6.0, 1.8 * len(cols) + 2), 7.5 if pairs else 4.2),
                             dpi=120, squeeze=False)
    _score_panel(axes[0][0], metrics)
    axes[0][0].set_title(f"{title}: {round(100 * metrics['confidence'])}% bootstrap intervals", fontsize=10)
    if pairs:
        _paired_panel(axes[1][0], metrics, pairs)
    fig.tight_layout()
    return fig


def _score_panel(ax, metrics: dict) -> None:
    cols, methods = metrics["datasets"], metrics["methods"]
    width = 0.8 / max(1, len(methods))
    colors = [f"C{k % 10}" for k in range(len(methods))]
    for k, m in enumerate(methods):
        xs, ys, lows, highs, ns = [], [], [], [], []
        for j, d in enumerate(cols):
            entry = (metrics["scores"][m].get(d) or {}).get(metrics["headline"][d])
            if not entry or entry["value"] is None:
                continue
            xs.append(j - 0.4 + width * (k + 0.5))
            ys.append(100 * entry["value"])
            # a percentile interval can sit a hair off the mean; whiskers cannot be negative
            lows.append(max(0.0, 100 * (entry["value"] - entry["ci_low"])))
            highs.append(max(0.0, 100 * (entry["ci_high"] - entry["value"])))
            ns.append(entry["n"])
        ax.bar(xs, ys, width=width * 0.92, label=m, color=colors[k], edgecolor=colors[k], linewidth=0.8,
               yerr=[lows, highs], capsize=2, error_kw={"linewidth": 0.8})
        for x, y, h, n in zip(xs, ys, highs, ns):
            if y == 0:  # a zero-height bar draws nothing: an outline a little above the axis shows it is there
                ax.add_patch(_zero_outline((x - width * 0.46, 0), width * 0.92, 1.2, colors[k]))
            ax.text(x, y + h + 1.5, f"{y:.0f}\nn={n}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{d}\n({METRIC_LABELS[metrics['headline'][d]]})" for d in cols], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 135)  # room above 100 for the labels and the legend
    ax.legend(fontsize=7, ncol=min(len(methods), 5), loc="upper left")


def _zero_outline(xy, width: float, height: float, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, fill=False, edgecolor=color, linewidth=1.0, label="_zero")


def _paired_panel(ax, metrics: dict, pairs: list[dict]) -> None:
    cols = metrics["datasets"]
    names = list(dict.fromkeys((p["a"], p["b"]) for p in pairs))
    index = {(p["a"], p["b"], p["dataset"]): p for p in pairs}
    width = 0.8 / max(1, len(names))
    all_y, all_low, all_high = [], [], []
    for k, (a, b) in enumerate(names):
        xs, ys, lows, highs, labels = [], [], [], [], []
        for j, d in enumerate(cols):
            p = index.get((a, b, d))
            if p is None:
                continue
            diff = p["difference"]
            xs.append(j - 0.4 + width * (k + 0.5))
            ys.append(100 * diff["value"])
            lows.append(max(0.0, 100 * (diff["value"] - diff["ci_low"])))
            highs.append(max(0.0, 100 * (diff["ci_high"] - diff["value"])))
            labels.append(f"{100 * diff['value']:+.0f}\nn={p['n']}")
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", markersize=4, capsize=3, color=f"C{k % 10}",
                    label=f"{a} − {b}")
        all_y, all_low, all_high = all_y + ys, all_low + lows, all_high + highs
        for x, y, h, text in zip(xs, ys, highs, labels):
            ax.text(x, y + h + 2, text, ha="center", va="bottom", fontsize=6)
    ax.axhline(0, color="0.4", linewidth=0.8)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=8)
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ends = [y - low for y, low in zip(all_y, all_low)] + [y + high for y, high in zip(all_y, all_high)] + [0.0]
    ax.set_ylim(max(-110.0, min(ends) - 12), min(140.0, max(ends) + 30))
    ax.set_ylabel("A − B (points)")
    ax.set_title("paired differences on the rows both methods answered", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(names), 3), loc="upper left")
