"""Padding share and generation time with and without length sorting, measured side by side.

Prompts are the real synthesis prompts of the synthetic world (retrieved with tantivy, rendered by
the tiny model's chat template); the same batches go through TransformersEngine twice.

    .venv/bin/python benchmarks/padding.py [--rows 128] [--batch 128] [--micro 8] [--new-tokens 16]

--batch is the number of rows per engine call, the window sorted by length (generation.batch_size).
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray import prompts  # noqa: E402
from instructrag_ray.config import GenerationConfig  # noqa: E402
from instructrag_ray.generation.transformers_engine import TransformersEngine  # noqa: E402
from instructrag_ray.retrieval.tantivy_index import TantivyRetriever, build_tantivy_index  # noqa: E402
from instructrag_ray.testing.synthetic import generate_world  # noqa: E402
from instructrag_ray.models import resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    defaults = GenerationConfig()
    ap.add_argument("--batch", type=int, default=defaults.batch_size, help="rows per engine call (generation.batch_size)")
    ap.add_argument("--micro", type=int, default=defaults.micro_batch_size)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    world = generate_world(seed=args.seed, n_people=120, n_questions=max(args.rows, 300))
    with tempfile.TemporaryDirectory() as tmp:
        build_tantivy_index(world.passages, Path(tmp) / "idx")
        retriever = TantivyRetriever(Path(tmp) / "idx")
        questions = world.questions[: args.rows]
        hits = retriever.batch_search([q["question"] for q in questions], 5)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    rows = []
    for q, found in zip(questions, hits):
        # Vary K like real corpora do (some questions get fewer documents), so lengths differ.
        docs = [{"title": h.title, "text": h.text, "score": h.score} for h in found]
        docs = prompts.order_docs(docs, random.Random(q["id"]).randint(1, 5))
        parts = prompts.synthesis_parts(q["question"], q["answers"], q["dataset"], docs)
        rows.append({"prompt": prompts.render(tokenizer, parts, 4096).text})

    results = {}
    for sort in (False, True):
        engine = TransformersEngine(model="tiny", max_new_tokens=args.new_tokens, micro_batch_size=args.micro,
                                    sort_by_length=sort)
        engine.generate(rows[: args.micro])  # warm-up
        engine.stats.prompt_tokens = engine.stats.pad_tokens = 0
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch):
            engine.generate(rows[i:i + args.batch])
        results[sort] = (engine.stats.pad_share, time.perf_counter() - start)

    print(f"{len(rows)} synthesis prompts, engine call (sorting window) {args.batch} rows, micro-batch {args.micro}, "
          f"{args.new_tokens} new tokens, tiny model on CPU")
    print(f"{'':16}{'pad share':>12}{'seconds':>10}")
    for sort, (share, secs) in results.items():
        print(f"{'sorted' if sort else 'unsorted':16}{share:>12.1%}{secs:>10.2f}")
    print(f"padding ratio unsorted/sorted: {results[False][0] / max(results[True][0], 1e-9):.1f}x; "
          f"time ratio unsorted/sorted: {results[False][1] / results[True][1]:.2f}x")


if __name__ == "__main__":
    main()
