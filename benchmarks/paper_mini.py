"""The paper in miniature: InstructRAG with a real model on real data, on CPU.

    .venv/bin/python benchmarks/paper_mini.py                      # make paper-mini; the defaults below
    .venv/bin/python benchmarks/paper_mini.py --train 24 --test 24  # a quick look (far wider intervals)

SmolLM2-135M-Instruct (`smollm2-135m`, fetched and converted on first use) is both the rationale
generator and the backbone, as in the paper (self-synthesized rationales). Data: PopQA, the 1000
questions of HippoRAG 2's subset (../shared/data/raw/neuropath_hipporag2/popqa.json), retrieved with
our tantivy BM25 over the pool of all their paragraphs (2 gold paragraphs per question, so most
retrieved documents belong to other questions: real noise). Questions are split once, by a seeded
shuffle of their ids, into a train and a test split that never overlap; the test split is only read by
the evaluation job.

1. build_index over the paragraph pool;
2. synthesis on the train split: the model sees question, gold answers and K documents and writes a
   rationale (consistency overall and on rows with an answer-bearing document; tokens/s);
   and the paper's template rationales on the same rows (for the ablation);
3. three SFT runs on the train split, the same recipe (configs/paper_mini.yaml): InstructRAG-FT on the
   model's rationales, InstructRAG-FT on template rationales, vanilla SFT on the gold answers
   (`data.target=answer`);
4. one evaluation on the test split: no-retrieval, vanilla-rag, icl-qa, instructrag-icl (2
   demonstrations drawn from the train split's consistent rationales), vanilla-sft, instructrag-ft; and
   the template-rationale model with the FT prompt. Accuracy is PAPER.md's (a normalised gold answer is
   a substring of the normalised output), with bootstrap 95% intervals and paired differences on the
   same test questions.

Sizes (defaults: 40 train and 48 test questions, K=2 documents, 96 new tokens for rationales and 64
for answers) are meant to fit about an hour on 2 cores, where training runs at about 60-80 tokens/s and a
prompt with documents takes seconds to read; they were chosen from those speeds, and nothing was tuned
on the test split. (A first run with 24 answer tokens cut most InstructRAG-ICL outputs before their
answer: the methods that explain first need room; the "cut at" column counts outputs that hit the
limit.) The paper's recipe (global batch 128, lr 2.5e-5, 2 epochs) would be well under one
optimizer step on 40 examples, so the SFT runs (configs/paper_mini.yaml) use global batch 8, 2 epochs
and lr 1e-4 (a small model, a few steps), the same for all three models.
"""

from __future__ import annotations

import argparse
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


def popqa_split(raw: Path, out: Path, train: int, test: int, seed: int) -> dict:
    """train.jsonl / test.jsonl (question, answers; no documents: BM25 retrieves them) and corpus.jsonl
    (every paragraph once) from HippoRAG 2's PopQA subset."""
    rows = json.loads((raw / "neuropath_hipporag2" / "popqa.json").read_text(encoding="utf-8"))
    passages: dict[tuple[str, str], str] = {}
    qa = []
    for row in rows:
        for para in row["paragraphs"]:
            passages.setdefault((para["title"], para["text"]), f"p{len(passages):05d}")
        qa.append({"id": f"popqa-{row['id']}", "dataset": "popqa", "question": row["question"],
                   "answers": json.loads(row["possible_answers"])})
    if train + test > len(qa):
        raise SystemExit(f"--train {train} + --test {test} is more than the {len(qa)} questions")
    random.Random(seed).shuffle(qa)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": qa[:train], "test": qa[train:train + test]}
    for name, part in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (out / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n"
                                              for (t, x), i in passages.items()))
    assert not {r["id"] for r in splits["train"]} & {r["id"] for r in splits["test"]}
    return {"questions": len(qa), "passages": len(passages), "train": train, "test": test}


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
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--test", type=int, default=48)
    ap.add_argument("--num-docs", type=int, default=2)
    ap.add_argument("--rationale-tokens", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.raw / "neuropath_hipporag2" / "popqa.json").exists():
        raise SystemExit(f"{args.raw} has no neuropath_hipporag2/popqa.json; pass --raw with ../shared/data/raw")

    from instructrag_ray.config import (BuildIndexConfig, EvaluateConfig, SynthesizeConfig, TrainConfig,
                                        load_config)
    from instructrag_ray.evaluate import run_evaluation
    from instructrag_ray.retrieval.build import build_index
    from instructrag_ray.sft.job import run_training
    from instructrag_ray.synthesize import run_synthesis

    out, times, k = args.out, {}, args.num_docs
    data = popqa_split(args.raw, out / "data", args.train, args.test, args.seed)
    print(f"PopQA (HippoRAG 2 subset): {data['questions']} questions, {data['passages']} paragraphs; "
          f"{args.train} train / {args.test} test questions (seed {args.seed})")
    index = out / "index"
    _, times["index"] = timed("BM25 index", build_index, load_config(BuildIndexConfig, None, [
        f"corpus={out / 'data' / 'corpus.jsonl'}", f"index={index}", "overwrite=true"]))
    common = [f"retrieval.index_path={index}", f"prompt.num_docs={k}", f"retrieval.top_k={k}", "progress_interval_s=30"]
    decode = [f"generation.model={MODEL}", "generation.repetition_penalty=1.2", "generation.batch_size=16",
              "generation.micro_batch_size=8"]
    synth, times["synthesis"] = timed("synthesis (SmolLM2 rationales, train split)", run_synthesis, load_config(
        SynthesizeConfig, None, [f"input={out / 'data' / 'train.jsonl'}", f"output={out / 'synthesis'}", *common,
                                 *decode, f"generation.max_new_tokens={args.rationale_tokens}"]))
    timed("synthesis (template rationales, train split)", run_synthesis, load_config(SynthesizeConfig, None, [
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

    answer_decode = [*decode, f"generation.max_new_tokens={args.answer_tokens}"]
    test = [f"input={out / 'data' / 'test.jsonl'}", *common, *answer_decode, f"demos.path={out / 'synthesis'}"]
    _, times["evaluation"] = timed("evaluation (test split)", run_evaluation, load_config(EvaluateConfig, None, [
        *test, f"output={out / 'eval'}", f"ft_model={models['instructrag-ft']}", f"sft_model={models['vanilla-sft']}",
        "methods=no-retrieval,vanilla-rag,icl-qa,instructrag-icl,vanilla-sft,instructrag-ft"]))
    _, times["evaluation ft-template"] = timed("evaluation (template-FT model, test split)", run_evaluation,
                                               load_config(EvaluateConfig, None, [
                                                   *test, f"output={out / 'eval-template'}",
                                                   f"ft_model={models['ft-template']}", "methods=instructrag-ft"]))
    report(out, synth, times, args)


def prediction_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "eval" / "predictions").to_pylist()
    for r in pq.read_table(out / "eval-template" / "predictions").to_pylist():
        rows.append({**r, "method": "ft-template"})
    return rows


def synthesis_numbers(out: Path, manifest: dict) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(out / "synthesis" / "rationales", columns=["consistent", "answer_in_docs",
                                                                 "completion_tokens", "finish_reason"]).to_pylist()
    bearing = [r for r in t if r["answer_in_docs"]]
    return {"rows": len(t), "consistent": sum(r["consistent"] for r in t),
            "bearing": len(bearing), "bearing_consistent": sum(r["consistent"] for r in bearing),
            "length_stops": sum(r["finish_reason"] == "length" for r in t),
            "tokens": sum(r["completion_tokens"] or 0 for r in t)}


def report(out: Path, synth_manifest: dict, times: dict, args) -> None:
    from instructrag_ray.metrics import compute_metrics

    s = synthesis_numbers(out, synth_manifest)
    lines = [f"# The paper in miniature: SmolLM2-135M-Instruct, PopQA (HippoRAG 2 subset), BM25 top-{args.num_docs}",
             "", f"{args.train} train / {args.test} test questions, disjoint; command: "
             f"`.venv/bin/python benchmarks/paper_mini.py --train {args.train} --test {args.test} --num-docs {args.num_docs} "
             f"--rationale-tokens {args.rationale_tokens} --answer-tokens {args.answer_tokens} --seed {args.seed}`", "",
             "## Synthesis (train split)", "",
             f"- consistency: {s['consistent']}/{s['rows']} = {100 * s['consistent'] / max(s['rows'], 1):.1f}% overall "
             f"(paper, Llama-3-8B: 89%); {s['bearing_consistent']}/{s['bearing']} = "
             f"{100 * s['bearing_consistent'] / max(s['bearing'], 1):.1f}% on rows with an answer-bearing document "
             "(paper: 98%)",
             f"- {s['tokens']} rationale tokens in {times['synthesis']:.0f} s of the job "
             f"({s['tokens'] / times['synthesis']:.1f} tokens/s end to end); {s['length_stops']} rationales hit "
             f"max_new_tokens={args.rationale_tokens}", ""]
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
            lo, hi = sorted((sign * d["ci_low"], sign * d["ci_high"]))
            better, worse = (p["a_better"], p["b_better"]) if sign == 1 else (p["b_better"], p["a_better"])
            diff = f"{100 * sign * d['value']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            wins = f"{better} / {worse}"
        else:
            diff, wins = "", ""
        lengths = cut.get(m, [0, 0])
        lines.append(f"| {LABELS[m]} | {cell} | {e['n']} | {diff} | {wins} | {lengths[0]}/{lengths[1]} |")
    icl = paired.get(("icl-qa", "instructrag-icl")) or paired.get(("instructrag-icl", "icl-qa"))
    if icl:
        sign = 1 if icl["a"] == "instructrag-icl" else -1
        lines += ["", f"InstructRAG-ICL minus ICL-QA: {100 * sign * icl['difference']['value']:+.1f} points "
                      f"on the same {icl['n']} questions."]
    lines += ["", "## Wall time (s)", "", *(f"- {k}: {v:.0f}" for k, v in times.items()),
              f"- total: {sum(times.values()):.0f}"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    json.dump({"synthesis": s, "metrics": metrics, "times": times}, open(out / "report.json", "w"), indent=1,
              default=str)
    print("\n" + text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
