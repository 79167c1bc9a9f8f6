"""The vllm engine: the whole synthesis job through ray.data.llm's vLLM processor.

- On a CUDA GPU (marked `gpu`): real vLLM with the project's tiny model.
- On CPU (integration): the same chain, with every ray.data.llm stage real except the engine inside the
  vLLM stage, which a stand-in replaces (greedy transformers generation on CPU; it refuses prompts whose
  length is divisible by 5, to show that a row vLLM fails on is rejected while the job goes on). This
  checks our side of the alpha API: the columns we send, the rows we get back, rejected rows riding along.
"""

import json
import sys

import pyarrow.parquet as pq
import pytest

from instructrag_ray import schemas
from instructrag_ray.generation import vllm_engine as generate_vllm
from instructrag_ray.config import SynthesizeConfig, load_config
from instructrag_ray.synthesize import run_synthesis

BAD_ROWS = ['{"id": "bad-1", "question": "Who?"}', '{"id": "bad-5", "question": "zzzqqq xxyyzz", "answers": ["x"]}']


@pytest.fixture
def qa(world, tmp_path):
    lines = world["qa"].read_text().splitlines()[:12]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines + BAD_ROWS) + "\n")
    return path, [json.loads(line)["id"] for line in lines]


def config(qa, out, index, *extra):
    return load_config(SynthesizeConfig, None, [
        f"input={qa}", f"output={out}", f"retrieval.index_path={index}", "generation.engine=vllm",
        "generation.max_new_tokens=8", "generation.batch_size=8", "progress_interval_s=0", *extra])


def read(path):
    return pq.read_table(path).to_pylist() if any(path.glob("*.parquet")) else []


def check_outputs(out, ids, manifest):
    good, bad = read(out / "rationales"), read(out / "rejected")
    for f in out.rglob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(schemas.load(f.parent.name).remove_metadata()), f
    assert sorted([r["id"] for r in good] + [r["id"] for r in bad]) == sorted(ids + ["bad-1", "bad-5"])
    assert {r["id"]: r["reason"] for r in bad if r["id"].startswith("bad-")} == {"bad-1": "missing_answers",
                                                                                  "bad-5": "no_documents"}
    assert all(r["generator"] == "vllm:tiny" and r["prompt"].startswith("<|begin_of_text|>") for r in good)
    assert all(0 < r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in good)
    assert manifest["config"]["generation"]["engine"] == "vllm"
    return good, bad


@pytest.mark.gpu
def test_vllm_engine_on_a_gpu(ray_local, tiny_model, index, qa, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run `pytest -m gpu` on a GPU machine after pip install -e '.[vllm,test]'")
    pytest.importorskip("vllm", reason="needs vLLM: pip install -e '.[vllm,test]' on the GPU machine")
    qa_path, ids = qa
    out = tmp_path / "out"
    manifest = run_synthesis(config(qa_path, out, index, "generation.gpu_memory_utilization=0.3"))
    good, bad = check_outputs(out, ids, manifest)
    assert len(good) == len(ids) and len(bad) == 2  # vLLM generates for every healthy row
    assert manifest["this_run"]["completion_tokens"] == sum(r["completion_tokens"] for r in good)
    # a rerun with the transformers engine is a different kind of rationale: refused
    from instructrag_ray.errors import OutputConflict as ResumeConflict

    with pytest.raises(ResumeConflict):
        run_synthesis(config(qa_path, out, index, "generation.engine=transformers"))


# --- CPU: the ray.data.llm chain with a stand-in engine ---------------------------------------------------


def stand_in_stage_udf():
    """A vLLMEngineStageUDF whose vLLM engine is replaced by greedy transformers generation on CPU."""
    import types

    from ray.llm._internal.batch.stages.base import StatefulStageUDF
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF, vLLMOutputData

    class StandInEngine:
        def __init__(self, model_path):
            from transformers import AutoModelForCausalLM

            self.lm = AutoModelForCausalLM.from_pretrained(model_path).eval()
            self.engine = types.SimpleNamespace(do_log_stats=self._no_stats)
            self.request_id = 0

        async def _no_stats(self):
            return None

        async def generate_async(self, row):
            import torch

            ids = [int(t) for t in row.pop("tokenized_prompt")]
            params = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.pop("sampling_params").items()}
            if len(ids) % 5 == 0:
                raise ValueError(f"stand-in engine refuses a prompt of {len(ids)} tokens")
            with torch.inference_mode():
                prompt = torch.tensor([ids])
                out = self.lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=params["max_tokens"], eos_token_id=params["stop_token_ids"])
            new = out[0, len(ids):].tolist()
            self.request_id += 1
            request = types.SimpleNamespace(request_id=self.request_id, idx_in_batch=row["__idx_in_batch"],
                                            params=params)
            output = vLLMOutputData(prompt="", prompt_token_ids=ids, num_input_tokens=len(ids),
                                    generated_tokens=new, num_generated_tokens=len(new))
            return request, output.model_dump(), 0.0

        def shutdown(self):
            pass

    class StandInStageUDF(vLLMEngineStageUDF):
        def __init__(self, data_column, expected_input_keys, model, engine_kwargs, should_continue_on_error=False,
                     **_):
            StatefulStageUDF.__init__(self, data_column, expected_input_keys)
            self.model, self.engine_kwargs, self.task_type = model, engine_kwargs, "generate"
            self.should_continue_on_error = should_continue_on_error
            self.llm = StandInEngine(model)

    return StandInStageUDF


@pytest.mark.integration
def test_vllm_chain_on_cpu_with_a_stand_in_engine(ray_local, tiny_model, index, qa, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    real = generate_vllm._vllm_processor

    def processor_with_stand_in(**kwargs):
        processor = real(**kwargs)
        stage = processor.get_stage_by_name("vLLMEngineStage")
        stage.fn = stand_in_stage_udf()
        stage.map_batches_kwargs.update(num_gpus=0, num_cpus=0.5)
        assert processor.list_stage_names() == ["vLLMEngineStage", "DetokenizeStage"]
        assert kwargs["engine_kwargs"]["dtype"] == "bfloat16"
        return processor

    monkeypatch.setattr(generate_vllm, "_require_vllm", lambda: None)
    monkeypatch.setattr(generate_vllm, "_vllm_processor", processor_with_stand_in)
    qa_path, ids = qa
    out = tmp_path / "out"
    manifest = run_synthesis(config(qa_path, out, index))
    good, bad = check_outputs(out, ids, manifest)

    refused = [r for r in bad if r["stage"] == "generate"]
    assert refused and all(r["reason"] == "generation_error" and "stand-in engine refuses" in r["detail"]
                           for r in refused)
    assert len(good) + len(refused) == len(ids) and all(r["prompt_tokens"] % 5 for r in good)
    # the stand-in generates as the transformers engine does, so the chain returns exactly its rationales
    from instructrag_ray.generation.transformers_engine import TransformersEngine

    reference = TransformersEngine(model="tiny", max_new_tokens=8, micro_batch_size=1).generate(good)
    assert [(r["rationale"], r["completion_tokens"], r["finish_reason"]) for r in good] == [
        (c.text, c.completion_tokens, c.finish_reason) for c in reference]
