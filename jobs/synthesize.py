r"""Synthesize InstructRAG denoising rationales into Parquet.

Local:
    python jobs/synthesize.py --input data/qa.jsonl --output out/ retrieval.index_path=out/index
On a Ray cluster:
    ray job submit --working-dir . -- python jobs/synthesize.py --input /shared/qa.jsonl \
        --output /shared/out retrieval.index_path=/shared/index generation.model=/models/llama3-8b-instruct \
        generation.num_gpus=1 generation.max_actors=8

Outputs: <output>/rationales/*.parquet, <output>/rejected/*.parquet, <output>/manifest.json.
Rerunning into the same output resumes (ids already written are skipped). `--help` lists every key.
"""

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the repo root that holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray.cli import job_main  # noqa: E402


def main(argv=None):
    return job_main("synthesize", argv, __doc__)


if __name__ == "__main__":
    main()
