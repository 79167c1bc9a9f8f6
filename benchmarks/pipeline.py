"""Where the synthesis job's time goes: its Ray Data chain against a plain Python loop doing the same work,
side by side in one run, on the same input and the same machine.

    .venv/bin/python benchmarks/pipeline.py                  # 1k, 10k and 50k rows
    .venv/bin/python benchmarks/pipeline.py --rows 10000     # one size

The input is the synthetic world's questions repeated under fresh ids (no ctxs: every row is searched),
with its corpus in a tantivy index. The template baseline stands in for the model, so what is measured
is the pipeline itself: read, parse, select, retrieve (top-5), prompt (tiny tokenizer, chat template),
generate (no model), check, write. The plain loop calls the job's own stage functions and classes on
batches of generation.batch_size rows, in this process, and writes the same Parquet files; the Ray job is
`run_synthesis` with the configuration's defaults (local Ray on this machine's CPUs).

Each run is a fresh process, as a user's is (nothing imported, no Ray started yet; the loop's wall time
includes loading the tokenizer and opening the index, the Ray job's includes starting Ray and its actors).
Printed per size: rows/s of each, their ratio, the time to the first written row (loop: the first batch
written; Ray job: the first batch committed, counted from the job's start), and the Ray job's start-up,
planning, chain and compaction times, and per-stage wall and CPU time from Ray Data's own stats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from instructrag_ray import output, read, synthesize  # noqa: E402
from instructrag_ray.config import SynthesizeConfig, load_config  # noqa: E402
from instructrag_ray.generation.stage import GenerateStage, engine_options  # noqa: E402
from instructrag_ray.retrieval.corpus import read_corpus  # noqa: E402
from instructrag_ray.retrieval.stage import RetrieveStage, retriever_options  # noqa: E402
from instructrag_ray.retrieval.tantivy_index import build_tantivy_index  # noqa: E402
from instructrag_ray.storage import location  # noqa: E402
from instructrag_ray.testing.synthetic import write_world  # noqa: E402


def write_input(world_qa: Path, path: Path, rows: int) -> None:
    """`rows` QA rows: the world's questions in turn, each copy under its own id."""
    questions = [json.loads(line) for line in world_qa.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for i in range(rows):
            q = questions[i % len(questions)]
            f.write(json.dumps({**q, "id": f"{q['id']}-{i}"}) + "\n")


def config(qa: Path, out: Path, index: Path, extra: list[str]) -> SynthesizeConfig:
    return load_config(SynthesizeConfig, None, [
        f"input={qa}", f"output={out}", f"retrieval.index_path={index}", "generation.engine=template-baseline",
        "generation.model=tiny", "progress_interval_s=3600", *extra])


def plain_loop(cfg: SynthesizeConfig) -> dict:
    """The job's stages called one after the other on each batch, in this process."""
    g = cfg.generation
    started = time.perf_counter()
    retrieve = RetrieveStage(top_k=cfg.retrieval.top_k, batch_size=cfg.retrieval.batch_size, **retriever_options(cfg.retrieval))
    prompt = synthesize.PromptStage(g.prompt_model(g.model), cfg.prompt.num_docs, g.max_model_len, g.max_new_tokens)
    generate = GenerateStage(**engine_options(g, g.model, cfg.prompt.num_docs))
    out = location(cfg.output)
    run = output.new_run(out)
    commit = output.Committer(run)
    rows = written = 0
    first = None
    for task in read.raw_tasks(cfg.input):
        for raw in read.read_task(*task, block_rows=g.batch_size):
            batch = read.parse_batch(raw, dataset="popqa")
            batch = synthesize.check_batch(generate(prompt(retrieve(batch))), cfg.prompt.num_docs)
            stats = output.write_batch(batch, run, fingerprint="bench").to_pylist()[0]
            commit(json.loads(stats["staged"]))
            rows += batch.num_rows
            written += stats["written"]
            if first is None:
                first = time.perf_counter() - started
    commit.finish()
    wall = time.perf_counter() - started
    return {"rows": rows, "written": written, "wall_s": wall, "rows_per_s": rows / wall, "first_row_s": first}


def ray_job(cfg: SynthesizeConfig) -> dict:
    """run_synthesis as a user runs it. Its steps are wrapped to time them: starting Ray, the id pass
    (planning), the first commit; the chain it built is kept to read Ray Data's stats afterwards."""
    built, first, phases = {}, [], {}
    started = time.perf_counter()
    originals = {"init_ray": synthesize.init_ray, "plan_rows": synthesize.plan_rows,
                 "synthesis_chain": synthesize.synthesis_chain, "_follow": synthesize._follow}
    committer, compact = output.Committer.__call__, output.compact

    def timed(name):
        def call(*args, **kwargs):
            t = time.perf_counter()
            result = originals[name](*args, **kwargs)
            phases[name] = time.perf_counter() - t
            if name == "synthesis_chain":
                built["ds"] = result
            return result
        return call

    def timed_commit(self, staged):
        if staged and not first:
            first.append(time.perf_counter() - started)
        return committer(self, staged)

    def timed_compact(*args, **kwargs):
        t = time.perf_counter()
        result = compact(*args, **kwargs)
        phases["compact"] = time.perf_counter() - t
        return result

    for name in originals:
        setattr(synthesize, name, timed(name))
    output.Committer.__call__, output.compact = timed_commit, timed_compact
    try:
        manifest = synthesize.run_synthesis(cfg)
    finally:
        for name, fn in originals.items():
            setattr(synthesize, name, fn)
        output.Committer.__call__, output.compact = committer, compact
    wall = time.perf_counter() - started
    run = manifest["this_run"]
    rows = run["written"] + run["rejected"]
    return {"rows": rows, "written": run["written"], "wall_s": wall, "rows_per_s": rows / wall,
            "first_row_s": first[0] if first else None, "init_s": phases.get("init_ray", 0.0),
            "plan_s": phases.get("plan_rows", 0.0), "chain_s": phases.get("_follow", 0.0),
            "compact_s": phases.get("compact", 0.0), "stats": built["ds"].stats() if "ds" in built else ""}


STAGE_LINE = re.compile(r"^Operator \d+ (?P<name>.+?): .* in (?P<wall>[\d.]+)s$")
CPU_LINE = re.compile(r"^\* Remote cpu time: .* (?P<total>[\d.]+)(?P<unit>us|ms|s) total$")
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def stage_times(stats: str) -> list[tuple[str, float, float]]:
    """(operator, wall s, total remote CPU s) per operator of Ray Data's stats text."""
    stages, current = [], None
    for line in stats.splitlines():
        line = line.strip()
        if m := STAGE_LINE.match(line):
            current = [m["name"], float(m["wall"]), 0.0]
            stages.append(current)
        elif current is not None and (m := CPU_LINE.match(line)):
            current[2] = float(m["total"]) * UNITS[m["unit"]]
    return [tuple(s) for s in stages]


def measure(mode: str, qa: str, out: str, index: str, overrides: list[str]) -> dict:
    """One measurement, in this (fresh) process: as a user's run starts, with nothing imported or started."""
    cfg = config(Path(qa), Path(out), Path(index), overrides)
    return plain_loop(cfg) if mode == "loop" else ray_job(cfg)


def in_subprocess(mode: str, qa: Path, out: Path, index: Path, overrides: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--mode", mode, "--input", str(qa), "--output", str(out),
                           "--index", str(index), "--set", *overrides], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000, 50_000])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both (e.g. retrieval.max_actors=2 prompt.max_actors=2)")
    parser.add_argument("--show-stats", action="store_true", help="print Ray Data's whole stats text too")
    for hidden in ("--mode", "--input", "--output", "--index"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.input, args.output, args.index, args.set)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = write_world(tmp / "world", seed=0)
        build_tantivy_index(read_corpus(world["corpus"]), tmp / "index")
        results = []
        for n in args.rows:
            qa = tmp / f"qa-{n}.jsonl"
            write_input(world["qa"], qa, n)
            loop = in_subprocess("loop", qa, tmp / f"loop-{n}", tmp / "index", args.set)
            job = in_subprocess("ray", qa, tmp / f"ray-{n}", tmp / "index", args.set)
            if loop["written"] != job["written"]:
                sys.exit(f"the loop wrote {loop['written']} rationales and the Ray job {job['written']}")
            results.append((n, loop, job))
            print(f"{n} rows: loop {loop['rows_per_s']:.1f} rows/s, Ray job {job['rows_per_s']:.1f} rows/s", flush=True)
            if args.show_stats:
                print(job["stats"])
    print(f"\nsynthesis pipeline (template baseline, tantivy top-5, tiny tokenizer), {os.cpu_count()} CPUs, each run "
          "in a fresh process" + (f", {' '.join(args.set)}" if args.set else ""))
    print(f"{'rows':>7} {'loop rows/s':>12} {'Ray rows/s':>11} {'Ray/loop':>9} {'loop 1st row s':>15} "
          f"{'Ray 1st row s':>14} {'loop wall s':>12} {'Ray wall s':>11}")
    for n, loop, job in results:
        print(f"{n:>7} {loop['rows_per_s']:>12.1f} {job['rows_per_s']:>11.1f} "
              f"{job['rows_per_s'] / loop['rows_per_s']:>8.2f}x {loop['first_row_s']:>15.2f} "
              f"{job['first_row_s'] or float('nan'):>14.2f} {loop['wall_s']:>12.1f} {job['wall_s']:>11.1f}")
    for n, _, job in results:
        print(f"\nRay job at {n} rows: starting Ray {job['init_s']:.1f} s, id pass (planning) {job['plan_s']:.1f} s, "
              f"the chain {job['chain_s']:.1f} s, compaction {job['compact_s']:.1f} s; Ray Data's stages "
              "(wall s of the operator, remote CPU s summed over its tasks):")
        for name, wall, cpu in stage_times(job["stats"]):
            print(f"  {name[:70]:<70} {wall:>8.2f} {cpu:>8.2f}")


if __name__ == "__main__":
    main()
