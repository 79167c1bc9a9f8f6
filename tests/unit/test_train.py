"""SFT pieces without Ray: example rendering and label masking, truncation, padded vs packed batches,
the step plan, the DeepSpeed config and the learning-rate schedule."""

import json

import pyarrow as pa
import pytest

from instructrag_ray import prompts
from instructrag_ray.sft import examples, job, loop, packing
from instructrag_ray.config import ConfigError, TrainConfig, load_config
from instructrag_ray.testing.tiny_model import EOT

DOCS = [
    {"id": "1", "title": "Paris", "text": "Paris is the capital of France.", "score": 9.0},
    {"id": "2", "title": "Lyon", "text": "Lyon is a city in France, on the Rhone and the Saone.", "score": 5.0},
    {"id": "3", "title": "Nice", "text": "Nice is on the coast of the Mediterranean Sea.", "score": 1.0},
]
RATIONALE = "Document 3 (Title: Paris) states that Paris is the capital. Therefore, the answer is Paris."
# PAPER.md's FT user turn, written out by hand: DOCS (best last) + the question line.
FT_USER = (
    "Document 1 (Title: Nice): Nice is on the coast of the Mediterranean Sea.\n\n"
    "Document 2 (Title: Lyon): Lyon is a city in France, on the Rhone and the Saone.\n\n"
    "Document 3 (Title: Paris): Paris is the capital of France.\n\n"
    "Based on your knowledge and the provided information, answer the question:\nwhat is the capital of France?"
)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def lm(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_labels_cover_exactly_the_rationale_and_end_of_turn(tok):
    ex = examples.build_example(tok, "What is the capital of France", DOCS, RATIONALE, num_docs=5, max_length=4096)
    labels = ex.labels
    assert len(labels) == len(ex.input_ids) and ex.truncated_tokens == 0 and not ex.question_cut
    n = ex.prompt_tokens
    assert all(label == -100 for label in labels[:n]) and all(label != -100 for label in labels[n:])
    assert decode(tok, labels[n:]) == RATIONALE + EOT
    # The prompt is the chat-template rendering of PAPER.md's FT user turn, ending with the reply header:
    # exactly what generation is given at inference.
    prompt = decode(tok, ex.input_ids[:n])
    assert prompt == tok.apply_chat_template([{"role": "user", "content": FT_USER}], tokenize=False,
                                             add_generation_prompt=True)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ex.target_tokens == len(labels) - n


def test_the_target_is_what_the_chat_template_adds(tok):
    parts, target = examples.ft_texts(tok, "What is the capital of France", prompts.order_docs(DOCS, 5), RATIONALE)
    assert parts.text == FT_USER and target == RATIONALE + EOT


def test_long_prompt_loses_documents_from_the_left_and_keeps_the_target(tok):
    full = examples.build_example(tok, "What is the capital of France", DOCS, RATIONALE, num_docs=5, max_length=4096)
    max_length = len(full.input_ids) - 12
    ex = examples.build_example(tok, "What is the capital of France", DOCS, RATIONALE, num_docs=5, max_length=max_length)
    assert len(ex.input_ids) <= max_length and ex.truncated_tokens >= 12 and not ex.question_cut
    assert decode(tok, ex.labels[ex.prompt_tokens:]) == RATIONALE + EOT
    prompt = decode(tok, ex.input_ids[:ex.prompt_tokens])
    # The lowest-ranked document (rendered first) is cut; the best one and the question stay whole.
    assert "Document 1 (Title: Nice)" not in prompt
    assert "Document 3 (Title: Paris): Paris is the capital of France." in prompt
    assert prompt.endswith("answer the question:\nwhat is the capital of France?<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_when_even_the_question_does_not_fit_the_prompt_is_cut_from_the_left(tok):
    target = len(tok(RATIONALE + EOT, add_special_tokens=False)["input_ids"])
    ex = examples.build_example(tok, "What is the capital of France", DOCS, RATIONALE, num_docs=5,
                             max_length=target + 5)
    assert ex.question_cut and ex.prompt_tokens == 5 and len(ex.input_ids) == target + 5
    assert decode(tok, ex.input_ids[ex.prompt_tokens:]) == RATIONALE + EOT


def test_a_target_that_alone_does_not_fit_is_refused(tok):
    target = len(tok(RATIONALE + EOT, add_special_tokens=False)["input_ids"])
    with pytest.raises(examples.TargetTooLong, match="raise data.max_length"):
        examples.build_example(tok, "What is the capital of France", DOCS, RATIONALE, num_docs=5, max_length=target)


def test_example_stage_skips_inconsistent_rows_and_rejects_too_long_targets(tiny_model):
    stage = examples.ExampleStage(model="tiny", num_docs=2, max_length=40, consistent_only=True)
    rows = [
        {"id": "a", "dataset": "d", "question": "Q?", "answers": ["x"], "ctxs": DOCS, "rationale": "x.",
         "consistent": True},
        {"id": "b", "dataset": "d", "question": "Q?", "answers": ["x"], "ctxs": DOCS, "rationale": "y.",
         "consistent": False},
        {"id": "c", "dataset": "d", "question": "Q?", "answers": ["x"], "ctxs": DOCS, "rationale": "x " * 80,
         "consistent": True},
    ]
    out = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["inconsistent"] for r in out] == [False, True, False]
    assert [(r["reject_stage"], r["reject_reason"]) for r in out] == [(None, None), (None, None),
                                                                      ("train", "target_too_long")]
    assert len(out[0]["input_ids"]) <= 40 and out[0]["truncated_tokens"] > 0
    assert "data.max_length=40" in out[2]["reject_detail"] and json.loads(out[2]["original"])["id"] == "c"
    assert examples.trainable(stage(pa.Table.from_pylist(rows))).column("id").to_pylist() == ["a"]
    everything = examples.ExampleStage(model="tiny", num_docs=2, max_length=40, consistent_only=False)
    assert not everything(pa.Table.from_pylist(rows[1:2])).to_pylist()[0]["inconsistent"]


def test_answer_target_trains_every_row_on_its_first_gold_answer(tiny_model, tok):
    """data.target=answer (vanilla SFT): the assistant turn is the first gold answer, whatever the rationale."""
    stage = examples.ExampleStage(model="tiny", num_docs=2, max_length=40, consistent_only=True, target="answer")
    rows = [{"id": "a", "dataset": "d", "question": "Q?", "answers": ["Paris", "City of Light"], "ctxs": DOCS,
             "rationale": "x " * 80, "consistent": False},
            {"id": "b", "dataset": "d", "question": "Q?", "answers": [" "], "ctxs": DOCS, "rationale": "r",
             "consistent": True}]
    out = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert not out[0]["inconsistent"] and out[0]["reject_stage"] is None
    _, expected = examples.ft_texts(tok, "Q?", DOCS[:2], "Paris")
    assert expected.startswith("Paris")
    assert out[0]["input_ids"][out[0]["prompt_tokens"]:] == tok(expected, add_special_tokens=False)["input_ids"]
    assert (out[1]["reject_stage"], out[1]["reject_reason"]) == ("train", "no_answer")


def test_shifted_labels_score_only_target_tokens_within_the_example():
    # tokens 0..4, prompt of 2: positions 1, 2, 3 predict tokens 2, 3, 4; the last position predicts nothing.
    assert packing.shifted_labels([10, 11, 12, 13, 14], 2) == [-100, 12, 13, 14, -100]


def _examples(tok):
    texts = [("Who wrote it", "Alma wrote it."), ("Where is Lyon", "Lyon is in France, by two rivers."),
             ("Q", "A."), ("What is the capital of France", RATIONALE), ("Who", "Nobody knows who, really.")]
    out = []
    for q, r in texts:
        ex = examples.build_example(tok, q, DOCS[: 1 + len(q) % 3], r, num_docs=3, max_length=4096)
        out.append((ex.input_ids, ex.prompt_tokens))
    return out


@pytest.fixture(scope="module")
def lm_packed_sdpa(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=packing.use_packed_sdpa()).eval()


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
def test_packed_batch_gives_each_example_the_same_loss_as_padded(tok, lm, lm_packed_sdpa, attention):
    """The job's per-example sdpa, and transformers' own block-diagonal mask from restarting position ids."""
    import torch

    model = lm_packed_sdpa if attention == "packed_sdpa" else lm
    examples = _examples(tok)
    lengths = [len(ids) for ids, _ in examples]
    assert len(set(lengths)) > 1
    padded = packing.pad_batch(examples, tok.pad_token_id)
    packed = packing.pack_batch(examples, tok.pad_token_id)
    assert packed.input_ids.shape == (1, sum(lengths)) and padded.input_ids.shape == (5, max(lengths))
    assert packed.tokens == padded.tokens == sum(lengths) and packed.target_tokens == padded.target_tokens
    with torch.no_grad():
        lp, lk = packing.token_losses(lm, padded), packing.token_losses(model, packed)
    per_padded = packing.example_losses(lp, padded, len(examples))
    per_packed = packing.example_losses(lk, packed, len(examples))
    assert per_packed == pytest.approx(per_padded, rel=1e-5, abs=1e-5)
    assert float(lk.sum()) == pytest.approx(float(lp.sum()), rel=1e-5)
    # Each example alone gives the same loss too.
    for i, ex in enumerate(examples):
        single = packing.pad_batch([ex], tok.pad_token_id)
        with torch.no_grad():
            alone = packing.example_losses(packing.token_losses(lm, single), single, 1)[0]
        assert alone == pytest.approx(per_padded[i], rel=1e-5, abs=1e-5)
    # Control: without the position restarts the packed examples see each other, and losses change.
    leaky = packing.MicroBatch(packed.input_ids, packed.labels, None,
                             torch.arange(packed.input_ids.shape[1]).unsqueeze(0),
                             packed.example_of, packed.tokens, packed.target_tokens)
    with torch.no_grad():
        per_leaky = packing.example_losses(packing.token_losses(model, leaky), leaky, len(examples))
    assert per_leaky != pytest.approx(per_padded, rel=1e-4, abs=1e-4)


def test_packed_sdpa_on_padded_rows_is_plain_causal_attention(tok, lm, lm_packed_sdpa):
    import torch

    padded = packing.pad_batch(_examples(tok), tok.pad_token_id)
    with torch.no_grad():
        a, b = packing.token_losses(lm, padded), packing.token_losses(lm_packed_sdpa, padded)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_losses_from_the_kept_logits_equal_those_from_all_logits(tok, lm, packed):
    """token_losses runs the LM head only where a row has a label; the losses (and so the gradient) are
    those of the full logits."""
    import torch
    import torch.nn.functional as F

    examples = _examples(tok)
    mb = (packing.pack_batch if packed else packing.pad_batch)(examples, tok.pad_token_id)
    assert packing._keeps_logits(lm)
    kept = packing.token_losses(lm, mb)
    logits = lm(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                use_cache=False).logits.float()
    full = F.cross_entropy(logits.view(-1, logits.shape[-1]), mb.labels.view(-1), ignore_index=-100,
                           reduction="none").view(mb.labels.shape)
    assert torch.allclose(kept.detach(), full.detach(), atol=1e-5) and float(full.sum()) > 0
    params = [p for p in lm.parameters() if p.requires_grad]
    g_kept = torch.autograd.grad(kept.sum(), params, allow_unused=True)
    g_full = torch.autograd.grad(full.sum(), params, allow_unused=True)
    assert all((a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))
               for a, b in zip(g_kept, g_full))


def test_empty_micro_batch_is_a_single_padding_token_without_loss():
    mb = packing.make_micro_batch([], pad_id=5, packing=True)
    assert mb.input_ids.tolist() == [[5]] and mb.target_tokens == 0 and mb.tokens == 1


def test_step_plan_covers_every_example_of_a_shard():
    plan = loop.plan_steps(examples=101, world_size=2, micro_batch_size=4, global_batch_size=32, epochs=2,
                            warmup_ratio=0.03)
    assert plan.grad_accum == 4 and plan.shard_examples == 50 and plan.rows_per_step == 16
    assert plan.steps_per_epoch == 4 and plan.total_steps == 8 and plan.warmup_steps == 1
    with pytest.raises(ValueError, match="cannot be split"):
        loop.plan_steps(1, 2, 1, 2, 1, 0.0)


def test_deepspeed_config_from_the_job_config():
    cfg = loop.deepspeed_config(zero_stage=3, micro_batch_size=4, grad_accum=4, world_size=8, learning_rate=2.5e-5,
                                 weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0, precision="bf16")
    assert cfg["train_batch_size"] == 128 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] and opt["params"]["lr"] == 2.5e-5
    assert opt["params"]["weight_decay"] == 0.0
    cpu = loop.deepspeed_config(zero_stage=2, micro_batch_size=1, grad_accum=1, world_size=2, learning_rate=1e-3,
                                 weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6, grad_clip=0.0,
                                 precision=loop.resolve_precision("auto", use_gpu=False))
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"] == {"stage": 2}
    assert loop.resolve_precision("auto", use_gpu=True) == "bf16"


def test_lr_schedule_is_linear_warmup_then_cosine_to_zero():
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-5)
    sched = loop.lr_schedule(opt, warmup_steps=3, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0, 2.5e-5 / 3, 2 * 2.5e-5 / 3, 2.5e-5])
    assert lrs[51] == pytest.approx(2.5e-5 / 2, rel=0.05) and lrs[-1] < 1e-7
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


BASE = ["input=in", "output=out"]


def test_train_defaults_are_the_papers_recipe():
    cfg = load_config(TrainConfig, None, BASE)
    o = cfg.optim
    assert (o.learning_rate, o.warmup_ratio, o.weight_decay, o.epochs, o.global_batch_size) == (2.5e-5, 0.03, 0, 2, 128)
    assert cfg.data.max_length == 4096 and cfg.data.consistent_only and not cfg.data.packing
    assert cfg.data.num_docs == 0 and cfg.deepspeed.precision == "auto"  # 0: the synthesis run's K


@pytest.mark.parametrize("override,message", [
    ("optim.global_batch_size=100", r"multiple of optim.micro_batch_size x scaling.num_workers \(4 x 2 = 8\)"),
    ("deepspeed.zero_stage=4", "allowed: 1, 2, 3"),
    ("deepspeed.precision=bf16", "needs scaling.use_gpu=true"),
    ("deepspeed.precision=fp16", "allowed: auto, bf16, fp32"),
    ("optim.warmup_ratio=1.5", "below 1"),
    ("scaling.resources=gpu_worker:0", "scaling.resources"),
    ("optim.learning_rte=1", "did you mean 'optim.learning_rate'"),
])
def test_bad_train_config_fails_early_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, BASE + [override])


def test_fingerprint_ignores_stops_cadence_and_layout():
    a = load_config(TrainConfig, None, BASE).fingerprint()
    for same in ("max_steps=3", "checkpoint_every=7", "data.packing=true", "log_every=5", "scaling.cpus_per_worker=2"):
        assert load_config(TrainConfig, None, BASE + [same]).fingerprint() == a, same
    for other in ("optim.learning_rate=1e-4", "data.max_length=512", "scaling.num_workers=4", "deepspeed.zero_stage=2",
                  "model=/m", "seed=1"):
        assert load_config(TrainConfig, None, BASE + [other]).fingerprint() != a, other


def test_the_job_script_refuses_a_bad_config_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "jobs" / "train.py"), "--input", "x", "--output", "y",
                           "optim.micro_batch_size=3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: optim.global_batch_size (128) must be a multiple of optim.micro_batch_size x scaling.num_workers "
        "(3 x 2 = 6)"]


def test_ft_prompt_shows_as_many_documents_as_the_rationales_were_written_with(tmp_path):
    synthesis = tmp_path / "synthesis"
    (synthesis / "rationales").mkdir(parents=True)
    (synthesis / "manifest.json").write_text(json.dumps({"config": {"prompt": {"num_docs": 3}}}))
    for path in (synthesis, synthesis / "rationales", synthesis / "rationales" / "part-1.parquet"):
        assert job.resolve_num_docs(str(path), 0) == 3
    assert job.resolve_num_docs(str(synthesis), 2) == 2  # an explicit value wins (with a note)
    assert job.resolve_num_docs(str(tmp_path / "elsewhere"), 0) == 5  # unknown: the paper's K


def test_metrics_log_appends_locally_and_marks_steps_trained_again(tmp_path):
    from instructrag_ray.sft.loop import MetricsLog

    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(str(path))
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0 / step})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    before = path.read_text()
    log.append({"step": 4, "loss": 0.2})
    after = path.read_text()
    assert after.startswith(before) and after[len(before):].count("\n") == 1  # one line appended

    resumed = MetricsLog(str(path))  # a restart from the checkpoint of step 2
    resumed.supersede(2)
    resumed.append({"step": 3, "loss": 0.3})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r.get("superseded", False)) for r in records] == [
        (1, False), (2, False), (3, True), (4, True), (3, False)]
    resumed.flush()  # nothing new: the file stays as it is
    assert [json.loads(line) for line in path.read_text().splitlines()] == records

    with open(path, "a") as f:  # a kill in the middle of an append leaves a torn last line
        f.write('{"step": 4, "lo')
    torn = MetricsLog(str(path))
    assert [r["step"] for r in torn.records] == [1, 2, 3, 4, 3]
    torn.append({"step": 4, "loss": 0.25})  # the first write rewrites the file: the torn line is gone
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 3, 4]
