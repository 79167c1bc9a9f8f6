"""Sequence packing against padding: training tokens/s of the SFT job on the same data, in one run.

Run by hand (prints a table and the ratio):
    .venv/bin/python benchmarks/packing.py [--out demo_out/bench_packing] [--steps 12] [--repeats 1]

The synthetic world's template rationales (as benchmarks/ft_demo.py builds them) are trained on by
`run_training` with configs/bench_packing.yaml, once with data.packing=false and once with
data.packing=true, alternating `--repeats` times; nothing else differs (same examples, same steps, same
micro-batches). Each run stops after `--steps` optimizer steps (max_steps). Throughput is real
(non-padding) tokens over all workers per second of step time (`compute_tokens_per_s` in
metrics.jsonl), the median over the steps after the first; `padding_share` is the share of computed
token slots that are padding. The loss of each step must agree between the two layouts (it is the
same computation, laid out differently), which the table shows too.

What to expect: packing computes no padding at all (each micro-batch is one row of its examples end to
end), and attention stays per example (`packed_sdpa`: causal sdpa on each example's span; varlen
flash attention on GPU with attn_implementation=flash_attention_2), so packed costs what the real tokens
cost. The gain grows with the spread of example lengths in a micro-batch (the padding share of the
padded run); the per-example attention loop costs a little Python per example.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out" / "bench_packing"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=120)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--num-docs", type=int, default=2, help="K: documents per prompt (lengths vary with them)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench_packing.yaml"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the training job")
    args = parser.parse_args(argv)

    import ray
    from ft_demo import prepare_rationales

    from instructrag_ray.config import TrainConfig, load_config
    from instructrag_ray.sft.job import read_metrics, run_training

    out = Path(args.out).resolve()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    data = prepare_rationales(out, args.seed, args.people, args.questions, args.num_docs)
    runs = {False: [], True: []}
    for repeat in range(args.repeats):
        for packing in (False, True):
            name = f"{'packed' if packing else 'padded'}-{repeat}"
            cfg = load_config(TrainConfig, args.config, [
                f"input={data['synthesis']}", f"output={out / name}", f"max_steps={args.steps}", "overwrite=true",
                f"data.packing={str(packing).lower()}", "log_every=1", *args.overrides])
            started = time.time()
            run_training(cfg)
            steps = [r for r in read_metrics(out / name / "metrics.jsonl") if "loss" in r]
            runs[packing].append({"name": name, "steps": steps, "wall": time.time() - started})

    def summary(packing: bool) -> dict:
        steps = [s for run in runs[packing] for s in run["steps"][1:]]  # the first step warms up
        return {"tokens_per_s": statistics.median(s["compute_tokens_per_s"] for s in steps),
                "padding_share": statistics.mean(s["padding_share"] for s in steps),
                "tokens_per_step": statistics.mean(s["tokens"] for s in steps),
                "losses": [s["loss"] for s in runs[packing][0]["steps"]]}

    padded, packed = summary(False), summary(True)
    ratio = packed["tokens_per_s"] / padded["tokens_per_s"]
    worst = max(abs(a - b) / a for a, b in zip(padded["losses"], packed["losses"]))
    print("\n| layout | training tokens/s (median, 2 workers) | padding share of computed tokens | tokens/step |")
    print("|---|---|---|---|")
    for name, r in (("padded", padded), ("packed", packed)):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['padding_share']:.1%} | {r['tokens_per_step']:.0f} |")
    print(f"\npacked / padded tokens/s: {ratio:.2f}x  ({args.steps} steps x {args.repeats} repeat(s) each, "
          f"same examples and micro-batches; largest relative loss difference per step {worst:.1e})")
    (out / "packing.json").write_text(json.dumps({"padded": padded, "packed": packed, "ratio": ratio,
                                                  "max_rel_loss_diff": worst, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
