"""Retrieval benchmark: TantivyRetriever speed and answer recall, on synthetic and real data.

Run by hand (not a test; prints tables):
    .venv/bin/python benchmarks/retrieval.py [--seed 0] [--people 120] [--questions 300] [--k 5]

Measures
1. queries/s of `TantivyRetriever.batch_search` on the synthetic world (a plain loop, and the same
   batches spread over a thread pool, to check whether threads would help);
2. answer-recall@k: the share of questions with at least one gold answer string (case-insensitive
   substring) in the title + text of the top-k passages, and gold@k: the share with at least one
   gold passage in the top k; on the synthetic world and on two real corpus + question pairs from
   ../shared/data/raw (read in place, never copied):
   - PopQA (HippoRAG 2 subset, neuropath_hipporag2/popqa.json): 1000 questions, each with two
     Wikipedia paragraphs; the corpus is every question's paragraphs (1475 distinct), gold is the
     paragraph marked is_supporting;
   - HotpotQA (hipporag/hotpotqa_train*.json): 100 questions over a 994-passage corpus, gold are
     the supporting-fact passages;
3. the same recall for several field settings side by side, so the default can be chosen from data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instructrag_ray.retrieval.tantivy_index import TantivyRetriever, build_tantivy_index  # noqa: E402

FIELD_SETTINGS = ["title,text", "text", "title^0.5,text", "title^2,text"]


@dataclass
class Dataset:
    name: str
    source: str
    passages: list[dict]  # id, title, text
    questions: list[dict]  # question, answers, gold_passage_ids


def synthetic(seed: int, people: int, questions: int) -> Dataset:
    from instructrag_ray.testing.synthetic import generate_world

    world = generate_world(seed=seed, n_people=people, n_questions=questions)
    return Dataset("synthetic", f"generate_world(seed={seed}, n_people={people}, n_questions={questions})",
                   [{"id": p["id"], "title": p["title"], "text": p["text"]} for p in world.passages],
                   [{"question": q["question"], "answers": list(q["answers"]), "dataset": q["dataset"],
                     "gold_passage_ids": list(q.get("gold_passage_ids") or [])} for q in world.questions])


def popqa(raw: Path) -> Dataset:
    path = raw / "neuropath_hipporag2" / "popqa.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    ids: dict[tuple[str, str], str] = {}
    passages, questions = [], []
    for row in rows:
        gold = []
        for para in row["paragraphs"]:
            key = (para["title"], para["text"])
            if key not in ids:
                ids[key] = f"popqa-{len(ids):05d}"
                passages.append({"id": ids[key], "title": para["title"], "text": para["text"]})
            if para.get("is_supporting"):
                gold.append(ids[key])
        questions.append({"question": row["question"], "answers": json.loads(row["possible_answers"]),
                          "gold_passage_ids": gold})
    return Dataset("popqa", str(path.relative_to(raw)), passages, questions)


def hotpotqa(raw: Path) -> Dataset:
    corpus_path = raw / "hipporag" / "hotpotqa_train_corpus.json"
    qa_path = raw / "hipporag" / "hotpotqa_train.json"
    corpus = json.loads(corpus_path.read_text(encoding="utf-8"))  # {title: [sentence, ...]}
    ids = {title: f"hotpot-{i:05d}" for i, title in enumerate(corpus)}
    passages = [{"id": ids[t], "title": t, "text": "".join(sents)} for t, sents in corpus.items()]
    questions = [{"question": row["question"], "answers": [row["answer"]],
                  "gold_passage_ids": sorted({ids[t] for t, _ in row["supporting_facts"] if t in ids})}
                 for row in json.loads(qa_path.read_text(encoding="utf-8"))]
    return Dataset("hotpotqa", f"{corpus_path.relative_to(raw)} + {qa_path.relative_to(raw)}", passages, questions)


def recall(retriever: TantivyRetriever, questions: list[dict], k: int) -> tuple[float, float]:
    """(answer-recall@k over all questions, gold@k over the questions that have a gold passage)."""
    results = retriever.batch_search([q["question"] for q in questions], k)
    answer_hits = gold_hits = 0
    for q, hits in zip(questions, results):
        if not isinstance(hits, list):
            continue
        text = " ".join(f"{h.title} {h.text}" for h in hits).lower()
        answer_hits += any(a and a.lower() in text for a in q["answers"])
        gold_hits += bool(set(q["gold_passage_ids"]) & {h.id for h in hits})
    with_gold = sum(bool(q["gold_passage_ids"]) for q in questions)
    return answer_hits / len(questions), gold_hits / with_gold if with_gold else float("nan")


def queries_per_s(retriever: TantivyRetriever, questions: list[str], k: int, threads: int = 0,
                  min_seconds: float = 2.0, batch: int = 64) -> float:
    """Median queries/s over repeated passes; threads>0 runs batches of `batch` on a thread pool."""
    batches = [questions[i:i + batch] for i in range(0, len(questions), batch)]
    pool = ThreadPoolExecutor(threads) if threads else None
    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(rates) < 3:
        t0 = time.perf_counter()
        if pool:
            list(pool.map(lambda b: retriever.batch_search(b, k), batches))
        else:
            for b in batches:
                retriever.batch_search(b, k)
        rates.append(len(questions) / (time.perf_counter() - t0))
    if pool:
        pool.shutdown()
    return statistics.median(rates)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--people", type=int, default=120)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--raw", type=Path, default=REPO.parent / "shared" / "data" / "raw",
                    help="folder of the real data (see its SOURCES.md)")
    args = ap.parse_args(argv)

    datasets = [synthetic(args.seed, args.people, args.questions), popqa(args.raw), hotpotqa(args.raw)]
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        retrievers = {}
        print("data sets")
        print(f"  {'name':<10} {'passages':>8} {'questions':>9} {'with gold':>9} {'build s':>8}  source")
        for data in datasets:
            t0 = time.perf_counter()
            stats = build_tantivy_index(data.passages, Path(tmp) / data.name)
            build_s = time.perf_counter() - t0
            if stats["rejected"]:
                print(f"  ({data.name}: {len(stats['rejected'])} passages rejected, e.g. {stats['rejected'][0]})")
            retrievers[data.name] = Path(tmp) / data.name
            with_gold = sum(bool(q["gold_passage_ids"]) for q in data.questions)
            print(f"  {data.name:<10} {stats['indexed']:>8} {len(data.questions):>9} {with_gold:>9} {build_s:>8.2f}"
                  f"  {data.source}")

        print(f"\nspeed: batch_search, k={args.k}, batches of 64, default fields 'title,text' "
              f"({os.cpu_count()} CPUs)")
        print(f"  {'name':<10} {'loop q/s':>9} {'threads q/s':>12}")
        for data in datasets:
            r = TantivyRetriever(retrievers[data.name])
            qs = [q["question"] for q in data.questions]
            loop = queries_per_s(r, qs, args.k)
            pooled = queries_per_s(r, qs, args.k, threads=os.cpu_count() or 1)
            print(f"  {data.name:<10} {loop:>9.0f} {pooled:>12.0f}")

        print(f"\nrecall@{args.k}: ans = share of all questions with a gold answer string (case-insensitive) in "
              f"the top-{args.k} title+text;\n  gold = share of the questions that have a gold passage with one "
              f"in the top {args.k}")
        header = "".join(f" {d.name + ' ans':>14} {d.name + ' gold':>14}" for d in datasets)
        print(f"  {'fields':<16}{header}")
        for fields in FIELD_SETTINGS:
            cells = []
            for data in datasets:
                answer, gold = recall(TantivyRetriever(retrievers[data.name], fields), data.questions, args.k)
                cells.append(f" {answer:>14.3f} {gold:>14.3f}")
            print(f"  {fields:<16}{''.join(cells)}")

        world = datasets[0]
        print(f"\nsynthetic recall@{args.k} by question style")
        print(f"  {'fields':<16}" + "".join(f" {style + ' ans':>30} {'gold':>6}"
                                          for style in sorted({q['dataset'] for q in world.questions})))
        for fields in FIELD_SETTINGS:
            r = TantivyRetriever(retrievers[world.name], fields)
            cells = []
            for style in sorted({q["dataset"] for q in world.questions}):
                answer, gold = recall(r, [q for q in world.questions if q["dataset"] == style], args.k)
                cells.append(f" {answer:>30.3f} {gold:>6.3f}")
            print(f"  {fields:<16}{''.join(cells)}")


if __name__ == "__main__":
    main()
