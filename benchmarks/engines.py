"""Rows/s of the `openai` engine against the `transformers` engine on CPU: same model (the project's tiny
one), same rows, one run. The openai engine talks to a real OpenAI-compatible server on localhost,
`transformers serve`, once as it starts by default (one request at a time) and once with its continuous
batching (paged attention; concurrent requests share decode steps).

Two measurements:
- job: the whole synthesis job (read, retrieve, prompt, generate, check, write on a local Ray) per engine,
  plus the template baseline (no model) for the pipeline's own rate;
- engine: the engines alone on the same rendered prompts (no Ray): TransformersEngine.generate against
  OpenAIEngine.generate, which isolates batching and HTTP from the pipeline.

Every generator gets one CPU thread (a generation actor with num_cpus=1 gets OMP_NUM_THREADS=1 from Ray;
the server is started with the same), so the comparison is the engines, not the thread counts.

    .venv/bin/python benchmarks/engines.py [--rows 192] [--new-tokens 32] [--concurrency 8]

Needs the `serve` extra (pip install -e '.[serve]').
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the server launcher the tests use
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402

from instructrag_ray.config import SynthesizeConfig, load_config  # noqa: E402
from instructrag_ray.generation.transformers_engine import TransformersEngine  # noqa: E402
from instructrag_ray.generation.openai_engine import OpenAIEngine  # noqa: E402
from instructrag_ray.retrieval.corpus import read_corpus
from instructrag_ray.retrieval.tantivy_index import build_tantivy_index  # noqa: E402
from instructrag_ray.synthesize import run_synthesis  # noqa: E402
from instructrag_ray.testing.synthetic import write_world  # noqa: E402
from instructrag_ray.testing.tiny_model import ensure_tiny_model  # noqa: E402
from local_server import LocalServer  # noqa: E402

SERVERS = {"openai, serve sequential": False, "openai, serve continuous batching": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="openai engine: requests in flight")
    ap.add_argument("--engine-rows", type=int, default=64, help="rows for the engine-only measurement")
    args = ap.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews every number
    model = str(ensure_tiny_model())
    job, engine = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        world = write_world(Path(tmp) / "world", seed=0, n_questions=max(300, args.rows))
        build_tantivy_index(read_corpus(world["corpus"]), Path(tmp) / "index")

        def run_job(name, *overrides):
            cfg = load_config(SynthesizeConfig, str(ROOT / "configs" / "demo.yaml"), [
                f"input={world['qa']}", f"output={tmp}/out-{len(job)}", f"retrieval.index_path={tmp}/index",
                f"limit={args.rows}", f"generation.max_new_tokens={args.new_tokens}", "progress_interval_s=60",
                "generation.model=tiny", "generation.repetition_penalty=1.0", *overrides])
            job[name] = run_synthesis(cfg)["this_run"]

        def time_engine(name, e, rows):
            e.generate(rows[:2])  # warm-up
            start = time.perf_counter()
            out = e.generate(rows)
            wall = time.perf_counter() - start
            engine[name] = {"rows_per_s": len(rows) / wall, "tokens_per_s": sum(c.completion_tokens for c in out) / wall}

        run_job("template-baseline (no model)", "generation.engine=template-baseline")
        run_job("transformers", "generation.engine=transformers")
        rows = pq.read_table(f"{tmp}/out-1/rationales", columns=["prompt"]).to_pylist()[:args.engine_rows]

        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        time_engine("transformers", TransformersEngine(model="tiny", max_new_tokens=args.new_tokens,
                                                       micro_batch_size=8), rows)
        torch.set_num_threads(threads)
        for name, batching in SERVERS.items():
            server = LocalServer(model, Path(tmp) / f"server-{batching}.log", continuous_batching=batching).start()
            try:
                run_job(name, "generation.engine=openai", f"generation.base_url={server.url}",
                        "generation.num_cpus=0.25", f"generation.concurrency={args.concurrency}")
                time_engine(name, OpenAIEngine(model="tiny", base_url=server.url, max_new_tokens=args.new_tokens,
                                               concurrency=args.concurrency, api_key_env=""), rows)
            finally:
                server.stop()

    print(f"\n{args.rows} synthetic questions, {args.new_tokens} new tokens, tiny model, {os.cpu_count()} CPUs "
          f"(load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f})")
    print(f"\njob (local Ray, whole pipeline){'rows/s':>14}{'wall s':>9}{'tok/s':>9}{'vs transformers':>17}")
    for name, run in job.items():
        print(f"  {name:42}{run['rows_per_s']:>7.2f}{run['wall_time_s']:>9.1f}{run['completion_tokens_per_s']:>9.1f}"
              f"{run['rows_per_s'] / job['transformers']['rows_per_s']:>16.2f}x")
    print(f"\nengine alone ({len(rows)} rendered prompts){'rows/s':>16}{'tok/s':>18}{'vs transformers':>17}")
    for name, run in engine.items():
        print(f"  {name:42}{run['rows_per_s']:>7.2f}{run['tokens_per_s']:>18.1f}"
              f"{run['rows_per_s'] / engine['transformers']['rows_per_s']:>16.2f}x")


if __name__ == "__main__":
    main()
