"""Reading a large QA input: on the driver (how the jobs read before) vs on the cluster (read.read_raw),
side by side in one run, each in its own process so that each reports its own peak driver memory.

    .venv/bin/python benchmarks/read_input.py                 # 1M rows, a JSONL file of about 100 MB
    .venv/bin/python benchmarks/read_input.py --rows 200000   # quicker

For each mode: the read stage alone (every raw row materialised on the cluster), then the id pass the
synthesis job makes to plan a run (parse every row, bring only the id columns to the driver), wall
seconds, and the driver's peak resident memory (ru_maxrss). `--split-mb` sets the byte range per read task
(a 100 MB file is read by several tasks on the cluster; the driver reads it alone, in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"q{i:07d}", "question": f"Who was the mayor of town number {i}?",
                                "answers": [f"Mayor {i}", f"M. {i}"], "dataset": "popqa"}) + "\n")


def driver_side(path: str, block_rows: int):
    """The jobs' old reader: every record read on the driver, then handed to Ray as blocks."""
    import ray

    from instructrag_ray import read

    blocks, rows = [], []
    for record in read.iter_raw(path):
        rows.append(record)
        if len(rows) == block_rows:
            blocks.append(read.raw_block(rows))
            rows = []
    if rows:
        blocks.append(read.raw_block(rows))
    return ray.data.from_arrow(blocks)


def run_mode(mode: str, path: str, block_rows: int, split_mb: int) -> dict:
    import ray

    from instructrag_ray import read
    from instructrag_ray.output import ExistingOutput
    from instructrag_ray.rows import TASK_CPUS
    from instructrag_ray.synthesize import plan_rows

    read.SPLIT_BYTES = split_mb << 20
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.time()
    raw = driver_side(path, block_rows) if mode == "driver" else read.read_raw(path, block_rows=block_rows)
    rows = raw.materialize().count()
    read_s = time.time() - started
    started = time.time()
    raw = driver_side(path, block_rows) if mode == "driver" else read.read_raw(path, block_rows=block_rows)
    parsed = raw.map_batches(read.parse_batch, batch_format="pyarrow", fn_kwargs={"dataset": "popqa"},
                             num_cpus=TASK_CPUS)
    plan = plan_rows(parsed, ExistingOutput(), 0)
    id_pass_s = time.time() - started
    ray.shutdown()
    return {"mode": mode, "rows": rows, "planned": plan.total, "read_s": round(read_s, 2),
            "read_and_id_pass_s": round(id_pass_s, 2),
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--block-rows", type=int, default=2000)
    parser.add_argument("--split-mb", type=int, default=16)
    parser.add_argument("--mode", choices=["driver", "cluster"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.input, args.block_rows, args.split_mb)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qa.jsonl"
        write_input(path, args.rows)
        print(f"input: {args.rows} rows, {path.stat().st_size / 2**20:.0f} MiB JSONL; blocks of {args.block_rows} rows; "
              f"cluster-side byte ranges of {args.split_mb} MiB")
        results = {}
        for mode in ("driver", "cluster"):
            done = subprocess.run([sys.executable, __file__, "--mode", mode, "--input", str(path), "--block-rows",
                                   str(args.block_rows), "--split-mb", str(args.split_mb)],
                                  capture_output=True, text=True, check=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    d, c = results["driver"], results["cluster"]
    print(f"{'':28} {'driver-side':>12} {'cluster-side':>13} {'driver/cluster':>15}")
    for key, label in (("read_s", "read stage (s)"), ("read_and_id_pass_s", "read + id pass (s)"),
                       ("driver_peak_rss_mib", "driver peak memory (MiB)")):
        print(f"{label:28} {d[key]:>12} {c[key]:>13} {d[key] / c[key]:>14.2f}x")
    assert d["rows"] == c["rows"] == d["planned"] == c["planned"] == args.rows


if __name__ == "__main__":
    main()
