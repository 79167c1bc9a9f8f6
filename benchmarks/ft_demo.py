"""InstructRAG-FT at CPU scale: does fine-tuning on rationales make the tiny model answer held-out questions?

Run by hand (a few CPU minutes; prints both accuracies):
    .venv/bin/python benchmarks/ft_demo.py [--out demo_out/ft_demo] [--seed 0] [--people 120] [--questions 500]

1. the synthetic world (train/test split by id) and a tantivy BM25 index over its passages;
2. the synthesis job on the train split with generation.engine=template-baseline (the paper's template
   rationales: "Document i (Title: t) contains the answer. Therefore, the answer is a.");
3. accuracy of the tiny model before fine-tuning on the test split;
4. the SFT job (`run_training`) on those rationales with configs/ft_demo.yaml: the paper's recipe with a
   higher learning rate and more epochs, because the tiny model starts from random weights;
5. accuracy of the fine-tuned model (<out>/sft/model) on the same test questions.

Accuracy is PAPER.md's: a prediction is correct when a normalised gold answer is a substring of the
normalised greedy generation (`answers.has_answer`). Generation uses the FT prompt (documents retrieved
by BM25 for each test question + the question), rendered by the model's chat template, exactly as in
training; decoding is greedy and stops at the end-of-turn token. Test questions never appear in
training. The same comparison can be run with the evaluation job:
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
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare_rationales(out: Path, seed: int, people: int, questions: int, num_docs: int = 5) -> dict:
    """World, index and template rationales (K = num_docs) on the train split (reused when already there)."""
    from instructrag_ray.config import SynthesizeConfig, load_config
    from instructrag_ray.retrieve import build_tantivy_index, read_corpus
    from instructrag_ray.synthesize import run_synthesis
    from instructrag_ray.synthetic import write_world

    world = write_world(out / "world", seed=seed, n_people=people, n_questions=questions)
    index = out / "index"
    if not index.exists():
        build_tantivy_index(read_corpus(world["corpus"]), index)
    synthesis = out / "synthesis"
    if not (synthesis / "manifest.json").exists():
        run_synthesis(load_config(SynthesizeConfig, None, [
            f"input={world['train']}", f"output={synthesis}", f"retrieval.index_path={index}",
            "generation.engine=template-baseline", "progress_interval_s=30", f"prompt.num_docs={num_docs}"]))
    return {"world": world, "index": index, "synthesis": synthesis}


def accuracy(model: str, rows: list[dict], index: Path, num_docs: int, max_length: int, max_new_tokens: int) -> dict:
    """Greedy generations with the FT prompt; PAPER.md's accuracy (overall and per question style)."""
    from transformers import AutoTokenizer

    from instructrag_ray import prompts
    from instructrag_ray.answers import has_answer
    from instructrag_ray.generate import TransformersEngine
    from instructrag_ray.retrieve import TantivyRetriever
    from instructrag_ray.tiny_model import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    hits = TantivyRetriever(index).batch_search([r["question"] for r in rows], num_docs)
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
    return {"accuracy": sum(correct) / len(rows), "correct": sum(correct), "n": len(rows),
            "by_style": {s: round(by_style[s] / n_style[s], 3) for s in sorted(n_style)},
            "examples": [{"question": r["question"], "answers": r["answers"], "output": o.text, "correct": ok}
                         for r, o, ok in list(zip(rows, outputs, correct))[:5]]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "ft_demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=120)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--config", default=str(ROOT / "configs" / "ft_demo.yaml"))
    parser.add_argument("--num-docs", type=int, default=2, help="K: documents in the synthesis and FT prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the training job")
    args = parser.parse_args(argv)

    import ray

    from instructrag_ray.config import TrainConfig, load_config
    from instructrag_ray.train import resolve_num_docs, run_training

    out = Path(args.out).resolve()
    started = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    data = prepare_rationales(out, args.seed, args.people, args.questions, args.num_docs)
    cfg = load_config(TrainConfig, args.config, [f"input={data['synthesis']}", f"output={out / 'sft'}",
                                                 *args.overrides])
    test = [json.loads(line) for line in data["world"]["test"].read_text().splitlines() if line.strip()]
    n_train = sum(1 for line in data["world"]["train"].read_text().splitlines() if line.strip())
    print(f"[ft_demo] {n_train} training questions (template rationales), {len(test)} held-out test questions")

    num_docs = resolve_num_docs(str(data["synthesis"]), cfg.data.num_docs)
    eval_args = dict(rows=test, index=data["index"], num_docs=num_docs, max_length=cfg.data.max_length,
                     max_new_tokens=args.max_new_tokens)
    before = accuracy(cfg.model, **eval_args)
    print(f"[ft_demo] before fine-tuning: accuracy {before['accuracy']:.1%} ({before['correct']}/{before['n']})")
    t = time.time()
    manifest = run_training(cfg)
    train_s = time.time() - t
    after = accuracy(str(out / "sft" / "model"), **eval_args)
    print(f"[ft_demo] after fine-tuning:  accuracy {after['accuracy']:.1%} ({after['correct']}/{after['n']})")

    report = {
        "before": before, "after": after, "train_seconds": round(train_s, 1),
        "train_examples": manifest["data"]["examples"], "steps": manifest["final_step"],
        "loss": [manifest["first_loss"], manifest["final_loss"]], "config": args.config,
        "overrides": args.overrides, "world": {"seed": args.seed, "people": args.people, "questions": args.questions},
        "wall_seconds": round(time.time() - started, 1),
    }
    (out / "ft_demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| model | accuracy on held-out questions | by style |")
    print("|---|---|---|")
    for name, r in (("tiny, before fine-tuning", before), ("tiny, InstructRAG-FT on template rationales", after)):
        styles = ", ".join(f"{s} {v:.0%}" for s, v in r["by_style"].items())
        print(f"| {name} | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | {styles} |")
    print(f"\ntraining: {report['train_examples']} examples, {report['steps']} steps, loss "
          f"{report['loss'][0]:.3f} -> {report['loss'][1]:.3f}, {train_s:.0f}s; "
          f"whole demo {report['wall_seconds']:.0f}s")
    for ex in after["examples"][:3]:
        verdict = "correct" if ex["correct"] else "wrong"
        print(f"  Q: {ex['question']}  gold: {ex['answers']}\n  A: {ex['output'][:160]!r} ({verdict})")
    print(f"report: {out / 'ft_demo.json'}")


if __name__ == "__main__":
    main()
