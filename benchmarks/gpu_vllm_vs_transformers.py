"""Output tokens/s of the synthesis job on one GPU: the `transformers` engine against the `vllm` engine
(ray.data.llm), same model, same rows, one run. Prints both and their ratio.

    pip install -e '.[vllm]'       # on the GPU machine (vLLM 0.29.0 + a CUDA torch 2.13.0)
    python benchmarks/gpu_vllm_vs_transformers.py [--rows 512] [--new-tokens 128] [--model DIR]

No model can be downloaded on these machines, so by default the script builds a "small" Llama locally
(~0.2B parameters, random weights, the tiny model's tokenizer and chat template). Random weights rarely
draw the end-of-turn token, so nearly every row generates --new-tokens tokens: a throughput workload, not
a quality one. Pass --model DIR for a real instruction-tuned model directory.

Job-level numbers: what a user sees, from start to manifest, with model loading and vLLM's start-up
(engine init, CUDA graphs) included; --rows controls how much of that start-up is amortised.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def build_small_model(out: Path, hidden: int, layers: int) -> str:
    """A Llama of the given size with random weights (bfloat16) and the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from instructrag_ray.testing.tiny_model import ensure_tiny_model

    if (out / "config.json").exists():
        return str(out)
    tiny = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.convert_tokens_to_ids("<|eot_id|>"),
                                                                            tokenizer.eos_token_id],
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {out}: {n / 1e6:.0f}M parameters (random weights)", flush=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--model", default="", help="a local model directory; default: build the small random Llama")
    ap.add_argument("--hidden", type=int, default=1024, help="small model: hidden size (multiple of 128)")
    ap.add_argument("--layers", type=int, default=16, help="small model: layers")
    ap.add_argument("--batch-size", type=int, default=128, help="rows per batch sent to a generation actor (vLLM keeps 8 batches in flight per replica)")
    ap.add_argument("--micro-batch-size", type=int, default=32, help="transformers: sequences per generate() call")
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (and pip install -e '.[vllm]'); see benchmarks/engines.py for CPU")
    from instructrag_ray.config import SynthesizeConfig, load_config
    from instructrag_ray.retrieval.corpus import read_corpus
    from instructrag_ray.retrieval.tantivy_index import build_tantivy_index
    from instructrag_ray.synthesize import run_synthesis
    from instructrag_ray.testing.synthetic import write_world

    cache = Path(os.environ.get("INSTRUCTRAG_CACHE", "~/.cache/instructrag-ray")).expanduser()
    model = args.model or build_small_model(cache / f"small-llama-h{args.hidden}-l{args.layers}", args.hidden,
                                            args.layers)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = write_world(Path(tmp) / "world", seed=0, n_questions=max(args.rows, 200))
        build_tantivy_index(read_corpus(world["corpus"]), Path(tmp) / "index")
        for engine in args.engines.split(","):
            gpu = ["generation.num_gpus=1"] if engine == "transformers" else ["generation.gpu_memory_utilization=0.85"]
            cfg = load_config(SynthesizeConfig, None, [
                f"input={world['qa']}", f"output={tmp}/out-{engine}", f"retrieval.index_path={tmp}/index",
                f"limit={args.rows}", f"generation.engine={engine}", f"generation.model={model}",
                f"generation.max_new_tokens={args.new_tokens}", f"generation.batch_size={args.batch_size}",
                f"generation.micro_batch_size={args.micro_batch_size}", "generation.max_model_len=4096",
                "progress_interval_s=15", *gpu])
            started = time.time()
            run = run_synthesis(cfg)["this_run"]
            results[engine] = {**run, "wall_time_s": round(time.time() - started, 1)}
            print(f"[bench] {engine}: {json.dumps(results[engine])}", flush=True)
    print(f"\nsynthesis job on {torch.cuda.get_device_name(0)}, {args.rows} rows, {args.new_tokens} new tokens, "
          f"model {model}")
    print(f"{'engine':14}{'rows/s':>9}{'wall s':>9}{'output tok/s':>14}{'tokens':>9}")
    for engine, run in results.items():
        print(f"{engine:14}{run['rows_per_s']:>9.2f}{run['wall_time_s']:>9.1f}{run['completion_tokens_per_s']:>14.1f}"
              f"{run['completion_tokens']:>9}")
    if {"transformers", "vllm"} <= results.keys():
        ratio = results["vllm"]["completion_tokens_per_s"] / results["transformers"]["completion_tokens_per_s"]
        print(f"vllm / transformers output tokens/s: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
