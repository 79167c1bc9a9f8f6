"""CPU engines side by side on the same rendered prompts: the transformers engine (fp32 and bf16, micro-batch
1 and 4) against the llamacpp engine (the same model's Q4_1 GGUF file, n_parallel 1 and 4), smollm2-135m,
greedy, one process, one CPU thread per engine (so the comparison is the engines, not thread counts).

Prompts: the synthesis prompt (PAPER.md) of the first --rows real PopQA rows with their own retrieved
documents (`ctxs`, --docs of them), rendered by the project's prompt code with the model's chat template:
exactly what the generate stage receives. Printed per engine: completion tokens/s over the whole
generate() call (prefill included), how many outputs are identical to transformers fp32 micro-batch 1's,
how many are consistent (contain a gold answer: the synthesis job's `consistent`), and how many stopped at
end-of-turn; then llamacpp's best tokens/s over transformers' best.

    .venv/bin/python benchmarks/cpu_engines.py [--rows 8] [--docs 5] [--new-tokens 96] [--repetition-penalty 1.0]

Needs the `llamacpp` extra (pip install -e '.[llamacpp]'); other work on the machine skews every number
(the load average is printed).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from instructrag_ray import prompts  # noqa: E402
from instructrag_ray.answers import has_answer  # noqa: E402
from instructrag_ray.config import SMOLLM2_MODEL  # noqa: E402
from instructrag_ray.generation.stage import make_engine  # noqa: E402
from instructrag_ray.models import load_chat_tokenizer, resolve_max_model_len  # noqa: E402

POPQA = "/work/shared/data/raw/s2rag_popqa/popqa_longtail_w_gs_example.jsonl"
ENGINES = [  # (name, engine, dtype, micro-batch / n_parallel)
    ("transformers fp32 mb1", "transformers", "float32", 1),
    ("transformers fp32 mb4", "transformers", "float32", 4),
    ("transformers bf16 mb1", "transformers", "bfloat16", 1),
    ("transformers bf16 mb4", "transformers", "bfloat16", 4),
    ("llamacpp Q4_1 np1", "llamacpp", "auto", 1),
    ("llamacpp Q4_1 np4", "llamacpp", "auto", 4),
]


def rendered_rows(path: str, n: int, docs: int, max_new_tokens: int) -> list[dict]:
    model_path, tokenizer = load_chat_tokenizer("generation.model", SMOLLM2_MODEL)
    budget = resolve_max_model_len(model_path, 0) - max_new_tokens
    rows = []
    with open(path) as f:
        for line in f:
            qa = json.loads(line)
            parts = prompts.synthesis_parts(qa["question"], qa["answers"], "popqa", prompts.order_docs(qa["ctxs"], docs))
            rendered = prompts.render(tokenizer, parts, budget)
            rows.append({"prompt": rendered.text, "answers": qa["answers"], "prompt_tokens": rendered.tokens})
            if len(rows) == n:
                return rows
    return rows


def run(name: str, engine: str, dtype: str, batch: int, rows: list[dict], args) -> dict:
    settings = {"model": SMOLLM2_MODEL, "num_docs": args.docs, "max_new_tokens": args.new_tokens,
                "temperature": 0.0, "top_p": 1.0, "repetition_penalty": args.repetition_penalty}
    if engine == "llamacpp":
        e = make_engine("llamacpp", **settings, llamacpp={"parallel": batch, "threads": 1})
    else:
        e = make_engine("transformers", **settings, dtype=dtype, micro_batch_size=batch)
    start = time.perf_counter()
    outs = e.generate(rows)
    wall = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    print(f"  {name}: {wall:.1f} s", flush=True)
    return {"name": name, "wall_s": wall, "tokens": tokens, "texts": [o.text for o in outs],
            "consistent": sum(has_answer(o.text, r["answers"]) for o, r in zip(outs, rows)),
            "stopped": sum(o.finish_reason == "stop" for o in outs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--input", default=POPQA)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = rendered_rows(args.input, args.rows, args.docs, args.new_tokens)
    print(f"{len(rows)} PopQA prompts, {args.docs} docs, mean {sum(r['prompt_tokens'] for r in rows) / len(rows):.0f} "
          f"prompt tokens, {args.new_tokens} new tokens, greedy, repetition_penalty {args.repetition_penalty}; "
          f"load average {load:.1f}", flush=True)
    results = [run(*spec, rows, args) for spec in ENGINES]
    reference = results[0]["texts"]
    print(f"\n| engine | completion tokens | wall s | tokens/s | identical to {ENGINES[0][0]} | consistent | stopped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        same = sum(a == b for a, b in zip(r["texts"], reference))
        print(f"| {r['name']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens'] / r['wall_s']:.1f} | "
              f"{same}/{len(rows)} | {r['consistent']}/{len(rows)} | {r['stopped']}/{len(rows)} |")
    best = {kind: max((r for r in results if r["name"].startswith(kind)), key=lambda r: r["tokens"] / r["wall_s"])
            for kind in ("transformers", "llamacpp")}
    ratio = (best["llamacpp"]["tokens"] / best["llamacpp"]["wall_s"]) / (best["transformers"]["tokens"] / best["transformers"]["wall_s"])
    print(f"\nllamacpp best ({best['llamacpp']['name']}) / transformers best ({best['transformers']['name']}): "
          f"{ratio:.2f}x tokens/s (load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
