"""InstructRAG-FT at CPU scale: does fine-tuning on rationales make the tiny model answer held-out questions?

Run by hand (about eight CPU minutes on 2 cores; prints both accuracies):
    .venv/bin/python benchmarks/ft_demo.py [--out demo_out/ft_demo] [--relations all] [--train-on all] ...

1. the synthetic world (train/test split by question id) and a tantivy BM25 index over its passages;
2. the synthesis job on the train split with generation.engine=template-baseline (the paper's template
   rationales: "Document 1 (Title: t) contains the answer. Therefore, the answer is a.");
3. accuracy of the tiny model before fine-tuning, on the held-out test split;
4. the SFT job (`run_training`, 2 CPU workers, ZeRO-2) on those rationales with configs/ft_demo.yaml: the
   paper's recipe with a far higher learning rate and more epochs, because the tiny model starts from
   random weights;
5. accuracy of the fine-tuned model (<out>/sft/model) on the same test questions.

Accuracy is PAPER.md's: a prediction is correct when a normalised gold answer is a substring of the
normalised greedy generation (`answers.has_answer`). Generation uses the FT prompt (the documents BM25
retrieves for each test question, then the question), rendered by the model's chat template exactly as
in training; decoding is greedy and stops at the end-of-turn token. No test question is trained on.

The task setting is simplified, and says so in its report, because a 1.3M-parameter model trained for a
few CPU minutes from random weights learns little from the full one: by default only questions whose
answers come from closed sets (occupation, genre, sport, instrument) are used, one document is shown,
BM25 searches titles only (the synthetic passages are titled by their entity, so the top document holds
the answer far more often), and training keeps the rationales whose document holds the answer
(`--train-on answer-in-docs`; the test questions are all kept, whatever their document holds). Trained
on every rationale, more than half of the targets say "None of the documents contains the answer ...
the answer is X", which teaches the small model to guess answers rather than read them.
`--relations all --num-docs 5 --fields title,text --train-on all` is the full setting.

Read the two accuracies against two reference points the script prints for the same test questions:
how often the shown document holds a gold answer (what reading it can reach) and the accuracy of
answering each relation's most frequent training answer (what guessing without reading reaches); and
the paired count of questions right only after / only before fine-tuning, with an exact sign test.

The evaluation job runs the same comparison at any scale:
`jobs/evaluate.py ... methods=instructrag-ft,vanilla-rag ft_model=<out>/sft/model` (vanilla-rag is the
base model with the same prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Relations whose answers come from small closed sets (occupations, genres, sports, instruments): an
# answer can be picked from the document or from what training showed, without copying a made-up name.
CLOSED_SET = ("occupation", "genre", "sport", "instrument")
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare_rationales(out: Path, seed: int, people: int, questions: int, num_docs: int = 5,
                       relations: set[str] | None = None, fields: str = "title,text") -> dict:
    """World, index and template rationales (K = num_docs) on the train split, keeping only questions
    about `relations` (None: all); reused when already there."""
    from instructrag_ray.config import SynthesizeConfig, load_config
    from instructrag_ray.retrieval.corpus import read_corpus
    from instructrag_ray.retrieval.tantivy_index import build_tantivy_index
    from instructrag_ray.synthesize import run_synthesis
    from instructrag_ray.testing.synthetic import write_world

    world = write_world(out / "world", seed=seed, n_people=people, n_questions=questions)
    if relations:
        for split in ("train", "test"):
            rows = [line for line in world[split].read_text().splitlines()
                    if line.strip() and json.loads(line)["relation"] in relations]
            world[split] = out / "world" / f"qa_{split}_selected.jsonl"
            world[split].write_text("\n".join(rows) + "\n")
    index = out / "index"
    if not index.exists():
        build_tantivy_index(read_corpus(world["corpus"]), index)
    synthesis = out / "synthesis"
    if not (synthesis / "manifest.json").exists():
        run_synthesis(load_config(SynthesizeConfig, None, [
            f"input={world['train']}", f"output={synthesis}", f"retrieval.index_path={index}",
            "generation.engine=template-baseline", "progress_interval_s=30", f"prompt.num_docs={num_docs}",
            f"retrieval.fields={fields}"]))
    return {"world": world, "index": index, "synthesis": synthesis}


def accuracy(model: str, rows: list[dict], index: Path, fields: str, num_docs: int, max_length: int,
             max_new_tokens: int) -> dict:
    """Greedy generations with the FT prompt; PAPER.md's accuracy (overall and per question style)."""
    from transformers import AutoTokenizer

    from instructrag_ray import prompts
    from instructrag_ray.answers import has_answer
    from instructrag_ray.generation.transformers_engine import TransformersEngine
    from instructrag_ray.retrieval.tantivy_index import TantivyRetriever
    from instructrag_ray.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    hits = TantivyRetriever(index, fields=fields).batch_search([r["question"] for r in rows], num_docs)
    batch = []
    for row, found in zip(rows, hits):
        docs = [{"id": h.id, "title": h.title, "text": h.text, "score": h.score} for h in found]
        parts = prompts.ft_parts(row["question"], prompts.order_docs(docs, num_docs))
        batch.append({"prompt": prompts.render(tokenizer, parts, max_length - max_new_tokens).text})
    engine = TransformersEngine(model=model, max_new_tokens=max_new_tokens, micro_batch_size=16)
    outputs = engine.generate(batch)
    correct = [has_answer(o.text, r["answers"]) for o, r in zip(outputs, rows)]
    by_style, n_style = Counter(), Counter()
    for ok, r in zip(correct, rows):
        by_style[r.get("style", "all")] += ok
        n_style[r.get("style", "all")] += 1
    return {"accuracy": sum(correct) / len(rows), "correct": sum(correct), "n": len(rows), "per_row": correct,
            "by_style": {s: round(by_style[s] / n_style[s], 3) for s in sorted(n_style)},
            "examples": [{"question": r["question"], "answers": r["answers"], "output": o.text, "correct": ok}
                         for r, o, ok in list(zip(rows, outputs, correct))[:5]]}


def rationales_with_answer_in_docs(synthesis: Path, out: Path) -> Path:
    """The synthesis output's rationales whose shown documents hold a gold answer (`answer_in_docs`),
    as one Parquet file: training data in which the answer can always be read off a document."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(synthesis / "rationales")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.filter(pc.field("answer_in_docs")), out / "part-0.parquet")
    return out


def reference_points(train: list[dict], test: list[dict], index: Path, fields: str, num_docs: int) -> dict:
    """What the two accuracies are to be read against, by the same metric on the same test questions:
    `answer_in_docs`, the share whose shown documents hold a gold answer (what reading them can reach);
    `majority_answer`, answering every question with its relation's most frequent training answer (what
    guessing without reading reaches)."""
    from instructrag_ray.answers import has_answer
    from instructrag_ray.retrieval.tantivy_index import TantivyRetriever

    hits = TantivyRetriever(index, fields=fields).batch_search([r["question"] for r in test], num_docs)
    shown = [" ".join(f"{h.title} {h.text}" for h in found) for found in hits]
    in_docs = [has_answer(text, r["answers"]) for text, r in zip(shown, test)]
    counts: dict[str, Counter] = {}
    for r in train:
        counts.setdefault(r["relation"], Counter())[r["answers"][0]] += 1
    majority = sum(has_answer(counts[r["relation"]].most_common(1)[0][0], r["answers"])
                   for r in test if r["relation"] in counts)
    return {"answer_in_docs": sum(in_docs) / len(test), "majority_answer": majority / len(test),
            "in_docs_per_row": in_docs}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test over the questions that one model gets right and the other wrong."""
    from math import comb

    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "ft_demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=2400)
    parser.add_argument("--questions", type=int, default=16000)
    parser.add_argument("--relations", default=",".join(CLOSED_SET),
                        help="comma-separated question relations to train and test on, or 'all'")
    parser.add_argument("--config", default=str(ROOT / "configs" / "ft_demo.yaml"))
    parser.add_argument("--num-docs", type=int, default=1, help="K: documents in the synthesis and FT prompts")
    parser.add_argument("--fields", default="title", help="BM25 fields (retrieval.fields) for synthesis and test")
    parser.add_argument("--train-on", choices=("answer-in-docs", "all"), default="answer-in-docs",
                        help="train on the rationales whose document holds the answer (default), or on all")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the training job")
    args = parser.parse_args(argv)

    import ray

    from instructrag_ray.config import TrainConfig, load_config
    from instructrag_ray.sft.job import resolve_num_docs, run_training

    out = Path(args.out).resolve()
    started = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    relations = None if args.relations == "all" else set(args.relations.split(","))
    data = prepare_rationales(out, args.seed, args.people, args.questions, args.num_docs, relations, args.fields)
    train_input = data["synthesis"]
    if args.train_on == "answer-in-docs":
        train_input = rationales_with_answer_in_docs(data["synthesis"], out / "rationales_answer_in_docs")
    cfg = load_config(TrainConfig, args.config, [
        f"input={train_input}", f"output={out / 'sft'}",
        f"data.num_docs={resolve_num_docs(str(data['synthesis']), 0)}", *args.overrides])
    num_docs = cfg.data.num_docs
    test = [json.loads(line) for line in data["world"]["test"].read_text().splitlines() if line.strip()]
    train = [json.loads(line) for line in data["world"]["train"].read_text().splitlines() if line.strip()]
    n_train = len(train)
    print(f"[ft_demo] {n_train} training questions (template rationales; trained on: {args.train_on}), "
          f"{len(test)} held-out test questions; relations: {args.relations}")

    eval_args = dict(rows=test, index=data["index"], fields=args.fields, num_docs=num_docs,
                     max_length=cfg.data.max_length, max_new_tokens=args.max_new_tokens)
    before = accuracy(cfg.model, **eval_args)
    print(f"[ft_demo] before fine-tuning: accuracy {before['accuracy']:.1%} ({before['correct']}/{before['n']})")
    t = time.time()
    manifest = run_training(cfg)
    train_s = time.time() - t
    after = accuracy(str(out / "sft" / "model"), **eval_args)
    print(f"[ft_demo] after fine-tuning:  accuracy {after['accuracy']:.1%} ({after['correct']}/{after['n']})")
    reference = reference_points(train, test, data["index"], args.fields, num_docs)
    in_docs = reference.pop("in_docs_per_row")
    after_rows = after.pop("per_row")
    pairs = list(zip(after_rows, before.pop("per_row")))
    for holds in (True, False):
        rows = [ok for ok, inside in zip(after_rows, in_docs) if inside == holds]
        reference[f"after_accuracy_{'with' if holds else 'without'}_answer_in_docs"] = (
            sum(rows) / len(rows) if rows else None)
    wins, losses = sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs)

    report = {
        "before": before, "after": after, "train_seconds": round(train_s, 1),
        "train_examples": manifest["data"]["examples"], "steps": manifest["final_step"],
        "loss": [manifest["first_loss"], manifest["final_loss"]], "config": args.config,
        "reference": reference, "paired": {"right_only_after": wins, "right_only_before": losses,
                                           "sign_test_p": sign_test(wins, losses)},
        "overrides": args.overrides, "train_on": args.train_on, "relations": args.relations, "num_docs": num_docs, "fields": args.fields,
        "world": {"seed": args.seed, "people": args.people, "questions": args.questions},
        "wall_seconds": round(time.time() - started, 1),
    }
    (out / "ft_demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| model | accuracy on held-out questions | by style |")
    print("|---|---|---|")
    for name, r in (("tiny, before fine-tuning", before), ("tiny, InstructRAG-FT on template rationales", after)):
        styles = ", ".join(f"{s} {v:.0%}" for s, v in r["by_style"].items())
        print(f"| {name} | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | {styles} |")
    print(f"\npaired: {wins} questions right only after fine-tuning, {losses} only before "
          f"(exact sign test p = {report['paired']['sign_test_p']:.1e})")
    print(f"read against: a gold answer is in the shown document(s) for {reference['answer_in_docs']:.1%} "
          f"(what reading can reach); answering each relation's most frequent training answer scores "
          f"{reference['majority_answer']:.1%} (guessing without reading)")
    with_, without = (reference[f"after_accuracy_{k}_answer_in_docs"] for k in ("with", "without"))
    if with_ is not None and without is not None:
        print(f"after fine-tuning: {with_:.1%} on questions whose shown document holds a gold answer, "
              f"{without:.1%} on the others")
    print(f"training: {report['train_examples']} examples, {report['steps']} steps, loss "
          f"{report['loss'][0]:.3f} -> {report['loss'][1]:.3f}, {train_s:.0f}s; "
          f"whole demo {report['wall_seconds']:.0f}s")
    for ex in after["examples"][:3]:
        verdict = "correct" if ex["correct"] else "wrong"
        print(f"  Q: {ex['question']}  gold: {ex['answers']}\n  A: {ex['output'][:160]!r} ({verdict})")
    print(f"report: {out / 'ft_demo.json'}")


if __name__ == "__main__":
    main()
