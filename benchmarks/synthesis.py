"""Rows/s of the synthesis job on the synthetic world, measured side by side in one run:
the demo configuration (tiny model, transformers engine) against the template baseline (no model),
which isolates the pipeline's own overhead (read, retrieve, prompt, check, write on Ray Data).

    .venv/bin/python benchmarks/synthesis.py [--rows 200] [--new-tokens 48]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from instructrag_ray.config import SynthesizeConfig, load_config  # noqa: E402
from instructrag_ray.retrieval.corpus import read_corpus
from instructrag_ray.retrieval.tantivy_index import build_tantivy_index  # noqa: E402
from instructrag_ray.synthesize import run_synthesis  # noqa: E402
from instructrag_ray.testing.synthetic import write_world  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = write_world(Path(tmp) / "world", seed=0)
        build_tantivy_index(read_corpus(world["corpus"]), Path(tmp) / "index")
        results = {}
        for engine in ("template-baseline", "transformers"):
            cfg = load_config(SynthesizeConfig, str(Path(__file__).parent.parent / "configs" / "demo.yaml"), [
                f"input={world['qa']}", f"output={tmp}/out-{engine}", f"retrieval.index_path={tmp}/index",
                f"limit={args.rows}", f"generation.engine={engine}", f"generation.max_new_tokens={args.new_tokens}",
                "progress_interval_s=30", "generation.model=tiny", "generation.repetition_penalty=1.0"])
            results[engine] = run_synthesis(cfg)["this_run"]
    print(f"\nsynthesis job, {args.rows} synthetic questions, local Ray on {os.cpu_count()} CPUs")
    print(f"{'engine':22}{'rows/s':>10}{'wall s':>10}{'completion tok/s':>18}")
    for engine, run in results.items():
        print(f"{engine:22}{run['rows_per_s']:>10.2f}{run['wall_time_s']:>10.1f}{run['completion_tokens_per_s']:>18.1f}")
    ratio = results["template-baseline"]["rows_per_s"] / results["transformers"]["rows_per_s"]
    print(f"pipeline-only / with tiny-model generation: {ratio:.2f}x")


if __name__ == "__main__":
    main()
