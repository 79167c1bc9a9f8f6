"""The SFT job on a local Ray: 2 CPU workers over gloo, the tiny model, rationales from the real synthesis
job on the synthetic world. ZeRO-2 is stopped (max_steps) and resumed by a rerun; ZeRO-3 loses a worker
mid-epoch and Ray Train restarts it from the latest checkpoint. Both must train (loss falls, weights
change), export a model that loads with from_pretrained and gives the engine's logits, leave checkpoints
that reload to the same logits, and see the same data in the same order at every step."""

import json

import pytest

from instructrag_ray.config import SynthesizeConfig, TrainConfig, load_config
from instructrag_ray.synthesize import run_synthesis
from instructrag_ray.errors import OutputConflict
from instructrag_ray.sft import job
from instructrag_ray.sft.job import read_metrics, run_training

pytestmark = pytest.mark.integration

# 18 examples over 2 workers: 9 each, 4 per step (2 x 2 accumulation) -> 3 steps per epoch, the last one
# with a single example (one empty micro-batch); 2 epochs -> 6 steps.
COMMON = ["data.max_length=160", "optim.micro_batch_size=2", "optim.global_batch_size=8",
          "optim.learning_rate=1e-3", "optim.warmup_ratio=0.1", "scaling.num_workers=2", "data.shuffle_buffer=8",
          "max_failures=1", "data.num_cpus=0.25"]


@pytest.fixture(scope="module")
def rationales(ray_local, tiny_model, world, index, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "synthesis"
    run_synthesis(load_config(SynthesizeConfig, None, [
        f"input={world['train']}", f"output={out}", f"retrieval.index_path={index}", "limit=18",
        "prompt.num_docs=2", "generation.engine=template-baseline", "progress_interval_s=0"]))
    return out


def train_config(rationales, out, *extra):
    return load_config(TrainConfig, None, [f"input={rationales}", f"output={out}", *COMMON, *extra])


def losses_by_step(history):
    """step -> the last record of that step (a step trained again after a restart appears twice)."""
    return {r["step"]: r for r in history if "loss" in r}


def probe_logits(model):
    import torch

    ids = torch.tensor([[1, 7, 300, 42, 1000, 5, 77, 2048]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_trained_model(out, manifest, tiny_model):
    """The export loads, differs from the start, equals the engine and the last checkpoint's weights."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert manifest["completed"] and manifest["export_max_abs_logit_diff"] == 0.0
    model_dir = out / "model"
    trained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.named_parameters()))
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    assert trained.config.use_cache  # off only while training
    card = (model_dir / "README.md").read_text()  # the model card
    assert "## Base model" in card and "`model`: " in card and f"{manifest['data']['examples']} trained on" in card
    assert f"{manifest['final_loss']:.4f} at step {manifest['final_step']}" in card
    assert GenerationConfig.from_pretrained(model_dir).eos_token_id == base.generation_config.eos_token_id

    # The latest DeepSpeed checkpoint (ZeRO shards consolidated offline) reloads to identical logits.
    state = get_fp32_state_dict_from_zero_checkpoint(manifest["outputs"]["latest_checkpoint"])
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    missing, unexpected = reloaded.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    assert torch.equal(probe_logits(reloaded), probe_logits(trained))


@pytest.fixture(scope="module")
def zero2(rationales, tmp_path_factory):
    """ZeRO-2, stopped after step 2 (max_steps), then the same command again without the stop."""
    out = tmp_path_factory.mktemp("zero2") / "sft"
    first = run_training(train_config(rationales, out, "deepspeed.zero_stage=2", "max_steps=2"))
    second = run_training(train_config(rationales, out, "deepspeed.zero_stage=2"))
    return out, first, second


@pytest.fixture(scope="module")
def zero3(rationales, tmp_path_factory):
    """ZeRO-3 with checkpoints every 2 steps; the last worker dies before step 6 (Ray Train restarts it)."""
    out = tmp_path_factory.mktemp("zero3") / "sft"

    def loop_whose_last_worker_dies_before_step_6(config):
        # Runs on the workers (a nested function, so Ray pickles it by value). On a fresh start the last
        # worker exits in its 6th optimizer step; FailureConfig restarts the group from the checkpoint.
        import os

        import ray.train

        from instructrag_ray.sft import loop

        ctx = ray.train.get_context()
        if ray.train.get_checkpoint() is None and ctx.get_world_rank() == ctx.get_world_size() - 1:
            real, calls = loop.train_step, []

            def dying_step(*args, **kwargs):
                calls.append(1)
                if len(calls) == 6:
                    os._exit(1)
                return real(*args, **kwargs)

            loop.train_step = dying_step
        loop.train_loop_per_worker(config)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job, "train_loop_per_worker", loop_whose_last_worker_dies_before_step_6)
        manifest = run_training(train_config(rationales, out, "deepspeed.zero_stage=3", "checkpoint_every=2"))
    return out, manifest


def test_zero2_stop_then_rerun_resumes_at_the_right_step(zero2):
    out, first, second = zero2
    assert not first["completed"] and first["final_step"] == 2 and first["plan"]["total_steps"] == 6
    assert first["data"]["examples"] == 18 and first["data"]["examples_with_documents_truncated"] > 0
    assert first["data"]["num_docs"] == 2  # as many documents as the synthesis prompt showed
    history = read_metrics(out / "metrics.jsonl")
    resumes = [r for r in history if r.get("event") == "resume"]
    assert [(r["step"], r["epoch"], r["step_in_epoch"]) for r in resumes] == [(2, 0, 2)]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4, 5, 6]  # nothing repeated or skipped
    assert second["completed"] and second["final_step"] == 6 and second["resumes"] == 1
    by_step = losses_by_step(history)
    assert by_step[6]["loss"] < by_step[1]["loss"]
    assert by_step[2]["lr"] > 0 and by_step[6]["lr"] < by_step[2]["lr"]  # warm-up, then cosine decay
    assert all(r["tokens_per_s"] > 0 for r in by_step.values())


def test_zero3_worker_failure_resumes_from_the_latest_checkpoint(zero3):
    out, manifest = zero3
    history = read_metrics(out / "metrics.jsonl")
    resumes = [r for r in history if r.get("event") == "resume"]
    assert len(resumes) == 1 and manifest["resumes"] == 1
    # Ray Train restarts from the latest checkpoint it had registered when the worker died: step 4, or
    # step 2 when the controller had not yet taken in the step-4 report (it arrives asynchronously).
    resumed = resumes[0]["step"]
    assert (resumed, resumes[0]["epoch"], resumes[0]["step_in_epoch"]) in {(4, 1, 1), (2, 0, 2)}
    steps = [r for r in history if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] + list(range(resumed + 1, 7))
    # the records the restart repeated are marked, so each step has one current record
    assert [r["step"] for r in steps if r.get("superseded")] == list(range(resumed + 1, 6))
    assert [r["step"] for r in steps if not r.get("superseded")] == [1, 2, 3, 4, 5, 6]
    # Every step trained twice saw the same data with the same learning rate, weights and optimizer state.
    for again in steps[5:-1]:
        before = steps[again["step"] - 1]
        assert (again["batch_digest"], again["lr"]) == (before["batch_digest"], before["lr"])
        assert again["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert manifest["completed"] and steps[-1]["loss"] < steps[0]["loss"]


def test_zero2_and_zero3_train_on_the_same_data_in_the_same_order(zero2, zero3):
    a = losses_by_step(read_metrics(zero2[0] / "metrics.jsonl"))
    b = losses_by_step(read_metrics(zero3[0] / "metrics.jsonl"))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:  # separate runs and restarts read the examples in one fixed order
        assert (a[step]["batch_digest"], a[step]["lr"]) == (b[step]["batch_digest"], b[step]["lr"])
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_exported_model_loads_and_equals_the_latest_checkpoint(run, request, tiny_model):
    out, *_, manifest = request.getfixturevalue(run)
    check_trained_model(out, manifest, tiny_model)


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(zero2, rationales):
    out, _, second = zero2
    lines = len(read_metrics(out / "metrics.jsonl"))
    again = run_training(train_config(rationales, out, "deepspeed.zero_stage=2"))
    assert again == json.loads(json.dumps(second, default=str)) and len(read_metrics(out / "metrics.jsonl")) == lines
    with pytest.raises(OutputConflict, match="overwrite=true"):
        run_training(train_config(rationales, out, "deepspeed.zero_stage=2", "optim.learning_rate=1e-4"))


def test_packed_training_takes_the_same_steps_as_padded(zero2, rationales, tmp_path_factory):
    """data.packing=true in the real job (the packed attention registered inside each Ray worker): the
    same examples in the same order give the same loss at every step, with no padding computed."""
    out = tmp_path_factory.mktemp("packed") / "sft"
    manifest = run_training(train_config(rationales, out, "deepspeed.zero_stage=2", "data.packing=true",
                                         "max_steps=3"))
    assert manifest["final_step"] == 3
    packed = losses_by_step(read_metrics(out / "metrics.jsonl"))
    padded = losses_by_step(read_metrics(zero2[0] / "metrics.jsonl"))
    assert sorted(packed) == [1, 2, 3]
    for step, record in packed.items():
        assert record["batch_digest"] == padded[step]["batch_digest"]
        assert record["loss"] == pytest.approx(padded[step]["loss"], rel=1e-4)
        assert record["padding_share"] <= padded[step]["padding_share"]
    # Only step 3's empty micro-batch (a single padding token, see COMMON) computes any padding.
    assert packed[1]["padding_share"] == packed[2]["padding_share"] == 0.0


def test_vanilla_sft_trains_on_the_answers_and_evaluates_as_its_own_method(rationales, index, world, tmp_path_factory):
    """The paper's vanilla SFT baseline in one command each: jobs/train.py with data.target=answer
    (the same FT prompts, the first gold answer as the target, every row), then jobs/evaluate.py with
    methods=vanilla-sft sft_model=<its model>."""
    from instructrag_ray.config import EvaluateConfig
    from instructrag_ray.evaluate import run_evaluation

    root = tmp_path_factory.mktemp("vanilla-sft")
    manifest = run_training(train_config(rationales, root / "sft", "deepspeed.zero_stage=2", "data.target=answer",
                                         "data.consistent_only=true", "optim.epochs=1", "data.limit=8"))
    # every row is trained on (consistent_only does not apply to answers); targets are short answers
    assert manifest["data"]["examples"] == manifest["data"]["rows_read"] == 8 and manifest["final_step"] == 1
    assert manifest["data"]["target_tokens"] < manifest["data"]["tokens"] / 4
    card = (root / "sft" / "model" / "README.md").read_text()
    assert "# Vanilla SFT:" in card and "`sft_model=<this directory>`" in card
    evaluation = run_evaluation(load_config(EvaluateConfig, None, [
        f"input={world['test']}", f"output={root / 'eval'}", f"retrieval.index_path={index}", "limit=4",
        "methods=vanilla-sft", f"sft_model={root / 'sft' / 'model'}", "generation.max_new_tokens=4",
        "metrics.resamples=50", "progress_interval_s=0"]))
    assert evaluation["predictions"]["vanilla-sft"] == 4, evaluation["predictions"]
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "eval" / "predictions").to_pylist()
    generators = {r["method"]: r["generator"] for r in rows}
    assert generators == {"vanilla-sft": f"transformers:{root / 'sft' / 'model'}"}
