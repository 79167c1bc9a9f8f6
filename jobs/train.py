r"""Fine-tune a model on synthesized rationales (InstructRAG-FT): Ray Train + DeepSpeed ZeRO.

Local (CPU workers over gloo, fp32; the synthesis output of `make demo`):
    python jobs/train.py --input demo_out/synthesis --output out/sft
On a Ray cluster (GPU workers, NCCL, bf16; input and output on storage every node sees):
    ray job submit --working-dir . -- python jobs/train.py --input /shared/synthesis --output /shared/sft \
        model=/models/Meta-Llama-3-8B-Instruct scaling.use_gpu=true scaling.num_workers=4 \
        optim.micro_batch_size=2 deepspeed.zero_stage=3 deepspeed.gradient_checkpointing=true

Outputs: <output>/model/ (Hugging Face model directory: AutoModelForCausalLM.from_pretrained, the
synthesis job's generation.model and the evaluation job's ft_model load it), <output>/checkpoints/,
<output>/metrics.jsonl, <output>/rejected/*.parquet, <output>/manifest.json (written last).
Rerunning into the same output resumes from the latest checkpoint. `--help` lists every key.
"""

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the repo root that holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray.cli import job_main  # noqa: E402


def main(argv=None):
    return job_main("train", argv, __doc__)


if __name__ == "__main__":
    main()
