r"""Evaluate InstructRAG-FT and InstructRAG-ICL against baselines (vanilla-rag, icl-qa, no-retrieval).

Local (the synthetic world; the demonstrations come from a synthesis run's rationales):
    python jobs/evaluate.py --input demo_out/world/qa_test.jsonl --output out/eval \
        retrieval.index_path=demo_out/index demos.path=demo_out/synthesis ft_model=out/sft/model
On a Ray cluster:
    ray job submit --working-dir . -- python jobs/evaluate.py --input /shared/popqa_test.jsonl \
        --output /shared/eval demos.path=/shared/synthesis ft_model=/shared/sft/model \
        generation.model=/models/llama3-8b-instruct generation.num_gpus=1 generation.max_actors=4

Outputs: <output>/predictions/*.parquet, <output>/rejected/*.parquet, <output>/metrics.json,
<output>/report.md, <output>/report.png, <output>/manifest.json (written last). Rerunning into the same
output resumes (predictions already written are kept). `--help` lists every key.
"""

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the repo root that holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray.cli import job_main  # noqa: E402


def main(argv=None):
    return job_main("evaluate", argv, __doc__)


if __name__ == "__main__":
    main()
