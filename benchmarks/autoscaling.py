"""Scale-up and scale-down times of GPU worker nodes for the synthesis job, on Ray's fake multi-node
autoscaling cluster with cluster/launcher.yaml's node types (tests/cluster/scenario.py's `autoscale`,
run in its own PID/network/mount namespaces, so other Ray instances on the machine are safe).

    .venv/bin/python benchmarks/autoscaling.py [--runs 3] [--rows 12] [--actors 2] [--gpus-per-actor 0.75]

Scale-up: from the first generation actor waiting for a GPU to the first GPU node up, and to all of
them. Scale-down: from the GPUs' last use to no GPU node left; it is dominated by the idle timeout
(--idle-timeout-minutes). On one machine a "node" is a set of Ray processes, so these times are Ray's
own (autoscaler loop, node start, registration), not a cloud's (VM boot, image pull: minutes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import ray_namespace  # noqa: E402

from instructrag_ray.retrieval.corpus import read_corpus
from instructrag_ray.retrieval.tantivy_index import build_tantivy_index  # noqa: E402
from instructrag_ray.testing.synthetic import write_world  # noqa: E402
from instructrag_ray.testing.tiny_model import ensure_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--actors", type=int, default=2, help="generation actors (min = max)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.75)
    ap.add_argument("--idle-timeout-minutes", type=float, default=0.1)
    args = ap.parse_args()
    why = ray_namespace.unavailable()
    if why:
        raise SystemExit(f"benchmarks/autoscaling.py {why}")
    ensure_tiny_model()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = write_world(tmp / "world", seed=7, n_people=60, n_questions=60)
        build_tantivy_index(read_corpus(world["corpus"]), tmp / "index")
        for i in range(args.runs):
            private, result, log = tmp / f"ray-tmp-{i}", tmp / f"result-{i}.json", tmp / f"run-{i}.log"
            private.mkdir()
            argv = [sys.executable, str(ROOT / "tests" / "cluster" / "scenario.py"), "autoscale",
                    "--result", str(result), "--log", str(log),
                    "--idle-timeout-minutes", str(args.idle_timeout_minutes), "--", "--input", str(world["qa"]),
                    "--output", str(tmp / f"out-{i}"), f"retrieval.index_path={tmp / 'index'}", f"limit={args.rows}",
                    "generation.max_new_tokens=8", "generation.batch_size=4", "progress_interval_s=0",
                    f"generation.num_gpus={args.gpus_per_actor}", "generation.num_cpus=0.5",
                    f"generation.resources=gpu_worker:{args.gpus_per_actor}",
                    f"generation.min_actors={args.actors}", f"generation.max_actors={args.actors}"]
            with log.open("w") as out:
                subprocess.run(ray_namespace.command(private, argv), env=ray_namespace.ray_environment(),
                               stdout=out, stderr=subprocess.STDOUT, timeout=900, check=True)
            r = json.loads(result.read_text())
            print(f"run {i + 1}: job {r['job']['status']}, peak {r['peak_gpu_nodes']} GPU nodes, scale-up "
                  f"{r['scale_up_first_s']}s / {r['scale_up_all_s']}s, scale-down {r['scale_down_s']}s", flush=True)
            runs.append(r)
    print(f"\nfake multi-node cluster on {os.cpu_count()} CPUs, {args.actors} generation actors x "
          f"{args.gpus_per_actor} GPU, idle timeout {args.idle_timeout_minutes * 60:.0f}s, {args.runs} runs (median)")
    for key, label in (("scale_up_first_s", "first GPU node up after the demand"),
                       ("scale_up_all_s", "all GPU nodes up after the demand"),
                       ("scale_down_s", "no GPU node left after the GPUs fell idle"),
                       ("job_end_t", "job done after submission")):
        values = [r[key] for r in runs if r.get(key) is not None]
        print(f"  {label:44}{statistics.median(values):>8.1f} s" if values else f"  {label:44}{'n/a':>8}")


if __name__ == "__main__":
    main()
