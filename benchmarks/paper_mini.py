"""The paper in miniature: InstructRAG with a real model on real data, on CPU.

    .venv/bin/python benchmarks/paper_mini.py                      # make paper-mini; the defaults below
    .venv/bin/python benchmarks/paper_mini.py --datasets popqa-contriever,nq --train 6 --test 6  # a quick look

SmolLM2-135M-Instruct (`smollm2-135m`, fetched and converted on first use) is both the rationale
generator and the backbone, as in the paper (self-synthesized rationales). Four real datasets from
../shared/data/raw, each with real noisy documents (the paper's retriever where we have its output):

- `popqa-contriever`: Self-RAG's PopQA long-tail rows with their 25 Contriever ctxs (the paper's
  retriever and documents for PopQA); the top K are used as given;
- `popqa-bm25`: the 1000 PopQA questions of HippoRAG 2's subset, BM25 over the pool;
- `2wiki`: FlashRAG's 200 2WikiMultiHopQA dev questions, BM25 over the pool (the paper's retriever for
  2Wiki); each question's 10 paragraphs (2 or 4 supporting, the rest distractors) are in the pool;
- `nq`: NQ-open dev questions of lost-in-the-middle, BM25 over the pool, which holds each question's
  gold passage (the paper used DPR, which we do not have).

The pool is one tantivy BM25 index over every paragraph of the three BM25 datasets (5663), so most
retrieved documents belong to other questions: real noise. Each dataset is split once by a seeded
shuffle into train and test questions; no test question is a train question of any dataset (PopQA's two
sources share 87 questions); the test split is only read by the evaluation job. One model is trained on
the train questions of all four datasets, as one mixed set, and scored on each.

1. build_index over the paragraph pool;
2. synthesis on the train split: the model sees question, gold answers and K documents and writes a
   rationale (consistency overall and on rows with an answer-bearing document; tokens/s);
   and the paper's template rationales on the same rows (for the ablation);
3. three SFT runs on the train split, the same recipe (configs/paper_mini.yaml): InstructRAG-FT on the
   model's rationales, InstructRAG-FT on template rationales, vanilla SFT on the gold answers
   (`data.target=answer`);
4. evaluation on the test split, one job per model (eval/<model>/): the base model with no-retrieval,
   vanilla-rag, icl-qa, instructrag-icl (2 demonstrations drawn from the train split's consistent
   rationales of the question's dataset); vanilla-sft; instructrag-ft; and the template-rationale model
   with the FT prompt. Accuracy is PAPER.md's (a normalised gold answer is
   a substring of the normalised output), with bootstrap 95% intervals and paired differences on the
   same test questions.

Sizes (defaults: 10 train and 12 test questions per dataset, so 40 and 48 in all, K=2 documents, 96
new tokens for rationales and 64 for answers) are meant to fit an hour on 2 cores, where training runs
at about 60-80 tokens/s and a prompt with documents takes seconds to read (the generation actor gets
both cores' threads, `--threads`); they were chosen from those speeds, and nothing was tuned on the
test split. (A first run with 24 answer tokens cut most InstructRAG-ICL outputs before their
answer: the methods that explain first need room; the "cut at" column counts outputs that hit the
limit.) The paper's recipe (global batch 128, lr 2.5e-5, 2 epochs) would be well under one
optimizer step on 40 examples, so the SFT runs (configs/paper_mini.yaml) use global batch 8, 2 epochs
and lr 1e-4 (a small model, a few steps), the same for all three models.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"
ORDER = ["no-retrieval", "vanilla-rag", "icl-qa", "instructrag-icl", "vanilla-sft", "ft-template", "instructrag-ft"]
LABELS = {"no-retrieval": "no retrieval", "vanilla-rag": "vanilla RAG (zero-shot)", "icl-qa": "ICL with QA demos",
          "instructrag-icl": "InstructRAG-ICL", "vanilla-sft": "vanilla SFT (gold answers)",
          "ft-template": "FT on template rationales (ablation)", "instructrag-ft": "InstructRAG-FT"}


DATASETS = ("popqa-contriever", "popqa-bm25", "2wiki", "nq")
DATASET_LABELS = {"popqa-contriever": "PopQA, Contriever ctxs", "popqa-bm25": "PopQA (HippoRAG 2), BM25",
                  "2wiki": "2WikiMultiHopQA, BM25", "nq": "NQ-open, BM25"}


def _jsonl(path: Path) -> list[dict]:
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _popqa_bm25(raw: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    rows = json.loads((raw / "neuropath_hipporag2" / "popqa.json").read_text(encoding="utf-8"))
    qa = [{"id": f"popqa-{r['id']}", "question": r["question"], "answers": json.loads(r["possible_answers"])}
          for r in rows]
    return qa, [(p["title"], p["text"]) for r in rows for p in r["paragraphs"]]


def _popqa_contriever(raw: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Self-RAG's PopQA long-tail rows with their 25 Contriever ctxs (the paper's retriever for PopQA)."""
    rows = _jsonl(raw / "s2rag_popqa" / "popqa_longtail_w_gs_example.jsonl")
    return [{"id": f"popqa-contriever-{r['id']}", "question": r["question"], "answers": r["answers"],
             "ctxs": r["ctxs"]} for r in rows], []


def _twowiki(raw: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """FlashRAG's 200 2WikiMultiHopQA dev rows; each question's 10 paragraphs go into the BM25 pool."""
    rows = _jsonl(raw / "deepsearch_rl_flashrag200" / "2wikimultihopqa_dev_200.jsonl")
    qa = [{"id": f"2wiki-{r['id']}", "question": r["question"], "answers": r["golden_answers"]} for r in rows]
    passages = [(title, " ".join(sentences)) for r in rows
                for title, sentences in zip(r["metadata"]["context"]["title"], r["metadata"]["context"]["content"])]
    return qa, passages


def _nq(raw: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """NQ-open dev questions of lost-in-the-middle; each one's gold passage goes into the BM25 pool."""
    rows = _jsonl(raw / "lost_in_the_middle_nq" / "nq-open-oracle.jsonl.gz")
    qa = [{"id": f"nq-{i}", "question": r["question"], "answers": r["answers"]} for i, r in enumerate(rows)]
    return qa, [(c["title"], c["text"]) for r in rows for c in r["ctxs"]]


LOADERS = {"popqa-contriever": _popqa_contriever, "popqa-bm25": _popqa_bm25, "2wiki": _twowiki, "nq": _nq}


def question_key(question: str) -> str:
    return " ".join(question.lower().rstrip("?").split())


def build_splits(raw: Path, out: Path, datasets: list[str], train: int, test: int, seed: int) -> dict:
    """train.jsonl / test.jsonl (`train` and `test` questions of each dataset) and corpus.jsonl (the BM25
    pool: every paragraph of the BM25 datasets once). Each dataset is shuffled with its own seeded RNG;
    its test questions are drawn first, then its train questions from the rest, skipping any question
    (case and spacing aside) that is a test question of any dataset: PopQA's two sources share 87
    questions, and a question must never be trained on under one name and tested under the other."""
    loaded = {name: LOADERS[name](raw) for name in datasets}
    shuffled = {}
    for name, (qa, _) in loaded.items():
        qa = list({question_key(r["question"]): r for r in qa}.values())  # HippoRAG's subset repeats one
        random.Random(f"{seed}|{name}").shuffle(qa)
        if train + test > len(qa):
            raise SystemExit(f"--train {train} + --test {test} is more than the {len(qa)} questions of {name}")
        shuffled[name] = qa
    tests = {name: qa[:test] for name, qa in shuffled.items()}
    held_out = {question_key(r["question"]) for part in tests.values() for r in part}
    trains = {name: [r for r in qa[test:] if question_key(r["question"]) not in held_out][:train]
              for name, qa in shuffled.items()}
    passages: dict[tuple[str, str], str] = {}
    for _, pool in loaded.values():
        for passage in pool:
            passages.setdefault(passage, f"p{len(passages):05d}")
    out.mkdir(parents=True, exist_ok=True)
    for split, parts in (("train", trains), ("test", tests)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps({**r, "dataset": name}) + "\n"
                                                    for name, part in parts.items() for r in part))
    (out / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n"
                                              for (t, x), i in passages.items()))
    assert not ({question_key(r["question"]) for part in trains.values() for r in part} & held_out)
    return {"passages": len(passages), "questions": {name: len(qa) for name, qa in shuffled.items()},
            "train": {name: len(part) for name, part in trains.items()},
            "test": {name: len(part) for name, part in tests.items()}}


def timed(label: str, fn, *args):
    started = time.time()
    print(f"\n== {label}", flush=True)
    result = fn(*args)
    seconds = time.time() - started
    print(f"== {label}: {seconds:.0f} s", flush=True)
    return result, seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "demo_out" / "paper_mini")
    ap.add_argument("--raw", type=Path, default=ROOT.parent / "shared" / "data" / "raw")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    ap.add_argument("--train", type=int, default=10, help="training questions per dataset")
    ap.add_argument("--test", type=int, default=12, help="test questions per dataset")
    ap.add_argument("--num-docs", type=int, default=2)
    ap.add_argument("--rationale-tokens", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads of the generation actor (generation.num_cpus); training runs "
                         "configs/paper_mini.yaml's workers, one thread each")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.time()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in LOADERS]
    if unknown or not datasets:
        raise SystemExit(f"--datasets {args.datasets!r}: unknown {unknown}; choose from {', '.join(DATASETS)}")
    if not (args.raw / "neuropath_hipporag2" / "popqa.json").exists():
        raise SystemExit(f"{args.raw} has no neuropath_hipporag2/popqa.json; pass --raw with ../shared/data/raw")

    from instructrag_ray.config import (BuildIndexConfig, EvaluateConfig, SynthesizeConfig, TrainConfig,
                                        load_config)
    from instructrag_ray.evaluate import run_evaluation
    from instructrag_ray.retrieval.build import build_index
    from instructrag_ray.sft.job import run_training
    from instructrag_ray.synthesize import run_synthesis

    out, times, k = args.out, {}, args.num_docs
    data = build_splits(args.raw, out / "data", datasets, args.train, args.test, args.seed)
    for name in datasets:
        print(f"{DATASET_LABELS[name]}: {data['questions'][name]} questions; {data['train'][name]} train / "
              f"{data['test'][name]} test (seed {args.seed})")
    print(f"BM25 pool: {data['passages']} paragraphs")
    common = [f"prompt.num_docs={k}", "progress_interval_s=30"]
    if data["passages"]:
        index, corpus = out / "index", out / "data" / "corpus.jsonl"
        # A rerun keeps the index built from the same pool: a rebuilt index has a new fingerprint, and
        # the synthesis output written against the old one would refuse to resume.
        stamp, digest = out / "index.corpus.sha256", hashlib.sha256(corpus.read_bytes()).hexdigest()
        if not (stamp.exists() and stamp.read_text() == digest and (index / "meta.json").exists()):
            _, times["index"] = timed("BM25 index", build_index, load_config(BuildIndexConfig, None, [
                f"corpus={corpus}", f"index={index}", "overwrite=true"]))
            stamp.write_text(digest)
        common += [f"retrieval.index_path={index}", f"retrieval.top_k={k}"]
    decode = [f"generation.model={MODEL}", "generation.repetition_penalty=1.2", "generation.batch_size=16",
              "generation.micro_batch_size=8", f"generation.num_cpus={args.threads}"]
    synth, times["synthesis"] = timed("synthesis (SmolLM2 rationales, train split)", run_synthesis, load_config(
        SynthesizeConfig, None, [f"input={out / 'data' / 'train.jsonl'}", f"output={out / 'synthesis'}", *common,
                                 *decode, f"generation.max_new_tokens={args.rationale_tokens}"]))
    _, times["synthesis template"] = timed("synthesis (template rationales, train split)", run_synthesis, load_config(SynthesizeConfig, None, [
        f"input={out / 'data' / 'train.jsonl'}", f"output={out / 'template'}", *common,
        "generation.engine=template-baseline", f"generation.model={MODEL}"]))

    recipe = ROOT / "configs" / "paper_mini.yaml"
    models = {}
    for name, source, extra in [("instructrag-ft", "synthesis", []), ("ft-template", "template", []),
                                ("vanilla-sft", "synthesis", ["data.target=answer"])]:
        cfg = load_config(TrainConfig, recipe, [f"input={out / source}", f"output={out / 'sft' / name}",
                                                f"model={MODEL}", f"data.num_docs={k}", *extra])
        _, times[f"train {name}"] = timed(f"SFT: {LABELS[name]}", run_training, cfg)
        models[name] = str(out / "sft" / name / "model")

    # InstructRAG-ICL's demonstrations come from each dataset's own consistent rationales (the paper's
    # setting); a dataset with fewer than the 2 needed draws from every dataset's, and the report says so.
    consistent = consistent_per_dataset(out)
    few = [d for d in datasets if consistent.get(d, 0) < 2]
    demos = [f"demos.path={out / 'synthesis'}", *(["demos.pool=any"] if few else [])]
    answer_decode = [*decode, f"generation.max_new_tokens={args.answer_tokens}"]
    test = [f"input={out / 'data' / 'test.jsonl'}", *common, *answer_decode, *demos]
    # One evaluation job per model, one after the other: one generation actor at a time has the
    # --threads cores. (One job with the three models runs their actors at once, and two-thread torch
    # actors sharing 2 cores stall each other: 0 of 288 predictions in 8 minutes here.)
    for name, methods, key in EVALUATIONS:
        extra = [f"{key}={models[name]}"] if key else []
        _, times[f"evaluation {name}"] = timed(f"evaluation: {name} (test split)", run_evaluation, load_config(
            EvaluateConfig, None, [*test, f"output={out / 'eval' / name}", f"methods={methods}", *extra]))
    report(out, datasets, few, times, time.time() - started, args)


# (evaluation output = the fine-tuned model it scores, methods, that model's config key); "base" scores
# generation.model
EVALUATIONS = [("base", "no-retrieval,vanilla-rag,icl-qa,instructrag-icl", ""),
               ("vanilla-sft", "vanilla-sft", "sft_model"),
               ("instructrag-ft", "instructrag-ft", "ft_model"),
               ("ft-template", "instructrag-ft", "ft_model")]  # the template-rationale model, FT prompt


def consistent_per_dataset(out: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for r in pq.read_table(out / "synthesis" / "rationales", columns=["dataset", "consistent"]).to_pylist():
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + bool(r["consistent"])
    return counts


def prediction_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for name, _, _ in EVALUATIONS:
        for r in pq.read_table(out / "eval" / name / "predictions").to_pylist():
            rows.append({**r, "method": "ft-template"} if name == "ft-template" else r)
    return rows


def synthesis_numbers(out: Path) -> dict:
    """Consistency overall and on rows with an answer-bearing document, per dataset and in all."""
    import pyarrow.parquet as pq

    t = pq.read_table(out / "synthesis" / "rationales", columns=["dataset", "consistent", "answer_in_docs",
                                                                 "completion_tokens", "finish_reason"]).to_pylist()
    numbers = {}
    for name in [*sorted({r["dataset"] for r in t}), "overall"]:
        part = [r for r in t if name in ("overall", r["dataset"])]
        bearing = [r for r in part if r["answer_in_docs"]]
        numbers[name] = {"rows": len(part), "consistent": sum(r["consistent"] for r in part),
                         "bearing": len(bearing), "bearing_consistent": sum(r["consistent"] for r in bearing),
                         "length_stops": sum(r["finish_reason"] == "length" for r in part),
                         "tokens": sum(r["completion_tokens"] or 0 for r in part)}
    return numbers


def percent(part: int, whole: int) -> str:
    return f"{part}/{whole} = {100 * part / whole:.1f}%" if whole else "0/0"


def report(out: Path, datasets: list[str], few: list[str], times: dict, wall: float, args) -> None:
    from instructrag_ray.metrics import compute_metrics

    s = synthesis_numbers(out)
    total = s["overall"]
    lines = [f"# The paper in miniature: SmolLM2-135M-Instruct, top-{args.num_docs} documents",
             "", f"{', '.join(DATASET_LABELS[d] for d in datasets)}; {args.train} train / {args.test} test questions "
             "per dataset, disjoint by question; command: "
             f"`.venv/bin/python benchmarks/paper_mini.py --datasets {','.join(datasets)} --train {args.train} "
             f"--test {args.test} --num-docs {args.num_docs} --rationale-tokens {args.rationale_tokens} "
             f"--answer-tokens {args.answer_tokens} --threads {args.threads} --seed {args.seed}`", "",
             "## Synthesis (train split)", "",
             "| dataset | consistent | consistent, answer-bearing document | hit max_new_tokens |", "|---|---|---|---|"]
    for name in [*datasets, "overall"]:
        e = s.get(name, {"rows": 0, "consistent": 0, "bearing": 0, "bearing_consistent": 0, "length_stops": 0})
        lines.append(f"| {DATASET_LABELS.get(name, name)} | {percent(e['consistent'], e['rows'])} | "
                     f"{percent(e['bearing_consistent'], e['bearing'])} | {e['length_stops']} |")
    lines += ["", "Paper, Llama-3-8B: 89% consistent overall, 98% with an answer-bearing document.",
              f"{total['tokens']} rationale tokens in {times['synthesis']:.0f} s of the job "
              f"({total['tokens'] / times['synthesis']:.1f} tokens/s end to end)."]
    if few:
        lines += ["", f"InstructRAG-ICL's demonstrations: {', '.join(few)} had fewer than 2 consistent rationales, "
                      "so every dataset drew from the whole train split (demos.pool=any)."]
    lines.append("")
    metrics = compute_metrics(prediction_rows(out), ORDER, resamples=2000, seed=0)
    cut = {}
    for r in prediction_rows(out):
        cut.setdefault(r["method"], [0, 0])[0] += r["finish_reason"] == "length"
        cut[r["method"]][1] += 1
    lines += ["## Held-out accuracy (test split; 95% bootstrap intervals)", "",
              f"| method | accuracy | n | InstructRAG-FT minus it [95% CI] | FT better / worse | cut at {args.answer_tokens} "
              "tokens |", "|---|---|---|---|---|---|"]
    paired = {(p["a"], p["b"]): p for p in metrics["paired"] if p["dataset"] == "overall" and p["metric"] == "accuracy"}
    for m in ORDER:
        e = metrics["scores"].get(m, {}).get("overall")
        if not e:
            continue
        acc = e["accuracy"]
        cell = f"{100 * acc['value']:.1f} [{100 * acc['ci_low']:.1f}, {100 * acc['ci_high']:.1f}]"
        p = paired.get((m, "instructrag-ft")) or paired.get(("instructrag-ft", m))
        if p and m != "instructrag-ft":
            sign = 1 if p["a"] == "instructrag-ft" else -1
            d = p["difference"]
            lo, hi = sorted((sign * d["ci_low"] + 0.0, sign * d["ci_high"] + 0.0))  # + 0.0: no "-0.0"
            better, worse = (p["a_better"], p["b_better"]) if sign == 1 else (p["b_better"], p["a_better"])
            diff = f"{100 * sign * d['value'] + 0.0:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            wins = f"{better} / {worse}"
        else:
            diff, wins = "", ""
        lengths = cut.get(m, [0, 0])
        lines.append(f"| {LABELS[m]} | {cell} | {e['n']} | {diff} | {wins} | {lengths[0]}/{lengths[1]} |")
    lines += ["", "Per dataset (accuracy %, correct/n):", "",
              "| method | " + " | ".join(DATASET_LABELS[d] for d in datasets) + " |",
              "|---|" + "---|" * len(datasets)]
    for m in ORDER:
        cells = []
        for d in datasets:
            e = metrics["scores"].get(m, {}).get(d)
            cells.append(f"{100 * e['accuracy']['value']:.0f} ({e['correct']}/{e['n']})" if e else "")
        if any(cells):
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    icl = paired.get(("icl-qa", "instructrag-icl")) or paired.get(("instructrag-icl", "icl-qa"))
    if icl:
        sign = 1 if icl["a"] == "instructrag-icl" else -1
        lines += ["", f"InstructRAG-ICL minus ICL-QA: {100 * sign * icl['difference']['value'] + 0.0:+.1f} points "
                      f"on the same {icl['n']} questions."]
    lines += ["", "## Wall time (s)", "", *(f"- {k}: {v:.0f}" for k, v in times.items()),
              f"- total, start to report: {wall:.0f} ({wall / 60:.0f} min)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    with open(out / "report.json", "w") as f:
        json.dump({"synthesis": s, "demos_pool_any": few, "metrics": metrics, "times": times, "wall_s": wall}, f,
                  indent=1, default=str)
    print("\n" + text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
