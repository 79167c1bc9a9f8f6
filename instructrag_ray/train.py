"""InstructRAG-FT: supervised fine-tuning on the synthesized rationales (Ray Train + DeepSpeed ZeRO).

    rationale Parquet -> select (consistent rows) -> build examples -> one fixed order
        -> TorchTrainer: `train_loop_per_worker` on every worker (DeepSpeed engine; its shard from
           `ray.train.get_dataset_shard`; checkpoints through `ray.train.report`)
        -> <output>/model/ (Hugging Face format)

An example is PAPER.md's FT prompt (documents + question, `prompts.ft_parts`) as the user turn and the
rationale as the assistant turn, both rendered by the model's own chat template. The target is the
rendered assistant turn (the rationale and the template's end-of-turn token); every other token has
label -100. When prompt + target exceed `data.max_length`, document tokens are cut from the left
(`prompts.render`, the same rule as synthesis: lowest-ranked documents first, question kept); a target
that alone does not fit is not trained on and goes to rejected/ with reason `target_too_long`.

Layout of an output directory:
    checkpoints/step_XXXXXXXX/   DeepSpeed checkpoints (weights, optimizer, scheduler, step, data
                                 position), written and pruned by Ray Train
    metrics.jsonl                one line per logging step: loss, lr, tokens/s (and GPU memory)
    rejected/part-*.parquet      examples that cannot be trained on (schemas/rejected.json, stage train)
    model/                       the fine-tuned model with tokenizer and generation config
    run.json                     this output's settings fingerprint: a rerun with other settings is refused
    manifest.json                written last: counts, steps, loss, timings

Resume. The data order is a pure function of the input and the config: rows keep their input order
(Ray Data `preserve_order`), are re-blocked into fixed-size blocks, split over the workers in order,
and every worker shuffles its shard with a buffer seeded by (seed, epoch). A checkpoint stores the
global step and the data position (epoch, steps done in it) with the DeepSpeed state; a rerun into
the same output, or Ray Train restarting a failed worker group (`max_failures`), loads the latest
checkpoint and skips exactly the batches already trained on.

Loss. One optimizer step covers `optim.global_batch_size` examples: each worker runs `gradient
accumulation` micro-batches of `optim.micro_batch_size`. The loss is the mean over every target token
of the step (the token count is all-reduced first), so it does not depend on how examples are laid
out in micro-batches; with `data.packing` a micro-batch's examples are concatenated into one row
without padding (position ids restart per example and attention stays within each example: varlen
flash attention when named, else per-example sdpa) and the loss and gradient are the same as padded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa

from . import prompts
from .config import TrainConfig, parse_resources, to_dict
from .tiny_model import ModelError, load_chat_tokenizer, resolve_model

IGNORE_INDEX = -100
CHECKPOINTS, MODEL, METRICS, REJECTED, RUN, MANIFEST = (
    "checkpoints", "model", "metrics.jsonl", "rejected", "run.json", "manifest.json")
# Stateless Ray Data tasks are light; little CPU leaves room for actors on small nodes (see synthesize.py).
TASK_CPUS = 0.1
# Input columns the examples are built from.
INPUT_COLUMNS = ["id", "dataset", "question", "answers", "ctxs", "rationale", "consistent"]


def log(message: str) -> None:
    # Not print(): on Ray Train workers print is patched to go to the console twice (stdout and logger).
    sys.stdout.write(f"[train] {message}\n")
    sys.stdout.flush()


# --- examples -----------------------------------------------------------------------------------


class TargetTooLong(ValueError):
    """The rendered rationale and end-of-turn token alone leave no room for a prompt."""


class TemplateError(ValueError):
    """The chat template does not render the prompt as a prefix of the prompt + reply conversation."""


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt tokens (label -100) then the target tokens."""

    input_ids: list[int]
    prompt_tokens: int      # leading tokens without loss
    truncated_tokens: int   # prompt tokens cut to fit max_length (0 when it fit)
    question_cut: bool      # even without documents the prompt did not fit: it was cut from the left

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_tokens + self.input_ids[self.prompt_tokens:]

    @property
    def target_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_tokens


def ft_texts(tokenizer, question: str, docs: list[dict], rationale: str) -> tuple[prompts.PromptParts, str]:
    """The FT user turn (as parts) and the target text: the chat-template-rendered assistant turn.

    The target is what the template adds after the generation prompt, so it ends with the model's own
    end-of-turn token (PAPER.md: rationale, then end-of-turn), and the prompt seen in training is
    exactly the prompt rendered at inference.
    """
    parts = prompts.ft_parts(question, docs)
    user = prompts.messages(parts.text)
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": rationale}], tokenize=False)
    if not full.startswith(prompt):
        raise TemplateError(
            "the chat template does not render the prompt with the generation header as a prefix of the "
            "conversation with the reply, so the reply tokens cannot be told apart; use a model whose "
            "template does (Llama-3-Instruct, Mistral, Qwen2.5 do)")
    return parts, full[len(prompt):]


def build_example(tokenizer, question: str, ctxs: list[dict], rationale: str, num_docs: int,
                  max_length: int) -> Example:
    """PAPER.md's FT example: documents + question -> rationale + end-of-turn, at most max_length tokens.

    The prompt and the target are tokenized separately (as at inference, where generation starts after
    the rendered prompt). The target is kept whole; the prompt loses document tokens from the left
    (`prompts.render`); if even the bare question does not fit, the prompt's own tokens are cut from
    the left (the reference code's plain left truncation). Raises TargetTooLong when the target
    leaves no room for a single prompt token.
    """
    parts, target = ft_texts(tokenizer, question, prompts.order_docs(ctxs, num_docs), rationale)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    budget = max_length - len(target_ids)
    if budget < 1:
        raise TargetTooLong(f"the rationale and end-of-turn are {len(target_ids)} tokens; data.max_length="
                            f"{max_length} leaves no room for the prompt; raise data.max_length")
    try:
        rendered = prompts.render(tokenizer, parts, budget)
        prompt_ids = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
        return Example(prompt_ids + target_ids, len(prompt_ids), rendered.truncated_tokens, False)
    except prompts.PromptTooLong:
        bare = tokenizer.apply_chat_template(prompts.messages(parts.head + parts.tail), tokenize=False,
                                             add_generation_prompt=True)
        bare_ids = tokenizer(bare, add_special_tokens=False)["input_ids"]
        doc_ids = tokenizer(parts.docs, add_special_tokens=False)["input_ids"]
        cut = len(bare_ids) - budget
        return Example(bare_ids[cut:] + target_ids, budget, len(doc_ids) + cut, True)


EXAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()), ("dataset", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("tokens", pa.int32()), ("prompt_tokens", pa.int32()),
    ("target_tokens", pa.int32()),
    ("truncated_tokens", pa.int32()), ("question_cut", pa.bool_()),
    ("skip_reason", pa.string()), ("skip_detail", pa.string()), ("original", pa.string()),
])
TRAIN_COLUMNS = ["id", "input_ids", "prompt_tokens"]


class ExampleStage:
    """Stage `examples` (actor; the tokenizer is loaded once): reads id, dataset, question, ctxs,
    rationale, consistent; writes id, dataset, input_ids, prompt_tokens, target_tokens,
    truncated_tokens, question_cut, tokens, and skip_reason/skip_detail/original for rows not trained on
    (`inconsistent` when only consistent rows are used; `target_too_long`)."""

    def __init__(self, model: str, num_docs: int, max_length: int, consistent_only: bool):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.num_docs, self.max_length, self.consistent_only = num_docs, max_length, consistent_only

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in INPUT_COLUMNS if c not in batch.column_names]
        if missing:
            raise KeyError(f"stage 'examples' needs column(s) {missing}; the batch has {batch.column_names}")
        out = []
        for row in batch.to_pylist():
            rec = {"id": row["id"], "dataset": row["dataset"], "input_ids": None, "tokens": None, "prompt_tokens": None,
                   "target_tokens": None, "truncated_tokens": None, "question_cut": None,
                   "skip_reason": None, "skip_detail": None, "original": None}
            if self.consistent_only and not row["consistent"]:
                rec["skip_reason"] = "inconsistent"
                out.append(rec)
                continue
            try:
                ex = build_example(self.tokenizer, row["question"], row["ctxs"], row["rationale"], self.num_docs,
                                   self.max_length)
            except TargetTooLong as e:
                rec.update(skip_reason="target_too_long", skip_detail=str(e),
                           original=json.dumps(row, ensure_ascii=False, default=str))
            else:
                rec.update(input_ids=ex.input_ids, tokens=len(ex.input_ids), prompt_tokens=ex.prompt_tokens,
                           target_tokens=ex.target_tokens,
                           truncated_tokens=ex.truncated_tokens, question_cut=ex.question_cut)
            out.append(rec)
        return pa.Table.from_pylist(out, schema=EXAMPLE_SCHEMA)


def trainable(batch: pa.Table) -> pa.Table:
    """Stage `select`: keeps rows without a skip_reason, and only the columns the workers need."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_null(batch["skip_reason"])).select(TRAIN_COLUMNS)


# --- micro-batches: padded or packed -------------------------------------------------------------


def shifted_labels(input_ids: list[int], prompt_tokens: int) -> list[int]:
    """Next-token labels of one example: position i is scored on token i+1 when that is a target token.

    Built per example, so a packed row never scores one example's token from another's.
    """
    n = len(input_ids)
    return [input_ids[i + 1] if i + 1 >= prompt_tokens else IGNORE_INDEX for i in range(n - 1)] + [IGNORE_INDEX]


@dataclass
class MicroBatch:
    input_ids: "torch.Tensor"          # (rows, length)
    labels: "torch.Tensor"             # shifted labels, -100 where no loss
    attention_mask: "torch.Tensor | None"
    position_ids: "torch.Tensor | None"
    example_of: "torch.Tensor"         # which example each position belongs to (-1: padding)
    tokens: int                        # real (non-padding) tokens
    target_tokens: int                 # tokens with a loss


def pad_batch(examples: list[tuple[list[int], int]], pad_id: int) -> MicroBatch:
    """One example per row, right-padded to the longest (attention mask marks the padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    rows = len(examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    example_of = torch.full((rows, width), -1, dtype=torch.long)
    for r, (ids, p) in enumerate(examples):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(shifted_labels(ids, p))
        mask[r, :n] = 1
        example_of[r, :n] = r
    return MicroBatch(input_ids, labels, mask, None, example_of, int(mask.sum()), int((labels != IGNORE_INDEX).sum()))


def pack_batch(examples: list[tuple[list[int], int]], pad_id: int) -> MicroBatch:
    """All examples of the micro-batch concatenated into one row: no padding at all.

    Position ids restart at 0 for every example and no attention mask is passed. transformers reads the
    restarts as sequence boundaries: `flash_attention_2` runs them as varlen attention, sdpa/eager build
    a block-diagonal causal mask, and this module's `packed_sdpa` (the default when packing) runs sdpa
    on each example's span alone. Either way no token attends across examples.
    """
    import torch

    ids = [t for example, _ in examples for t in example]
    labels = [t for example, p in examples for t in shifted_labels(example, p)]
    positions = [i for example, _ in examples for i in range(len(example))]
    owner = [i for i, (example, _) in enumerate(examples) for _ in example]
    mb_labels = torch.tensor([labels])
    return MicroBatch(torch.tensor([ids]), mb_labels, None, torch.tensor([positions]), torch.tensor([owner]),
                      len(ids), int((mb_labels != IGNORE_INDEX).sum()))


def make_micro_batch(examples: list[tuple[list[int], int]], pad_id: int, packing: bool) -> MicroBatch:
    if not examples:
        # Every worker must run the same number of forward passes (ZeRO-3 gathers parameters in them):
        # an empty micro-batch at the end of an epoch becomes one padding token without loss.
        return pad_batch([([pad_id], 1)], pad_id)
    return pack_batch(examples, pad_id) if packing else pad_batch(examples, pad_id)


PACKED_SDPA = "instructrag_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                **kwargs):
    """Varlen attention without a varlen kernel: sdpa on each packed example's span alone (causal).

    Registered with transformers' AttentionInterface (`use_packed_sdpa`). Spans start wherever the
    position ids do not count up by one, as transformers itself detects packed rows; no (length x
    length) mask is built and nothing is computed across examples, so a packed row costs what its
    examples cost alone. With no mask and no restarts (padded batches are right-padded) it is plain
    causal sdpa, exact for every real token.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    kwargs.pop("is_causal", None)
    if position_ids is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    length = query.shape[2]
    rows = []
    for r in range(query.shape[0]):
        pos = position_ids[r if position_ids.shape[0] > 1 else 0]
        cuts = [0] + (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist() + [length]
        spans = [sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b],
                                        value[r:r + 1, :, a:b], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)[0] for a, b in zip(cuts, cuts[1:])]
        rows.append(torch.cat(spans, dim=1))
    return torch.cat(rows, dim=0), None


def use_packed_sdpa() -> str:
    """Register `packed_sdpa` with transformers; returns its attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    return PACKED_SDPA


def token_losses(model, mb: MicroBatch) -> "torch.Tensor":
    """Per-position next-token loss (0 where there is no label), shape (rows, length)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = model(input_ids=mb.input_ids.to(device),
                attention_mask=None if mb.attention_mask is None else mb.attention_mask.to(device),
                position_ids=None if mb.position_ids is None else mb.position_ids.to(device), use_cache=False)
    logits = out.logits.float()
    labels = mb.labels.to(device)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def example_losses(losses: "torch.Tensor", mb: MicroBatch, n_examples: int) -> list[float]:
    """Mean loss over each example's target tokens (index = position in the list given to the batcher)."""
    out = []
    for i in range(n_examples):
        sel = (mb.example_of == i) & (mb.labels != IGNORE_INDEX)
        out.append(float(losses[sel.to(losses.device)].sum() / sel.sum()))
    return out


# --- the schedule and DeepSpeed's config -----------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    examples: int             # trainable examples
    world_size: int
    micro_batch_size: int
    grad_accum: int
    epochs: int
    shard_examples: int       # examples per worker per epoch (Ray's equal split drops the remainder)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def rows_per_step(self) -> int:
        """Examples one worker reads per optimizer step."""
        return self.micro_batch_size * self.grad_accum


def plan_steps(examples: int, world_size: int, micro_batch_size: int, global_batch_size: int, epochs: int,
               warmup_ratio: float) -> StepPlan:
    """Steps of the whole schedule. A last, smaller step takes an epoch's leftover examples."""
    grad_accum = global_batch_size // (micro_batch_size * world_size)
    shard = examples // world_size
    if shard == 0:
        raise ValueError(f"{examples} trainable examples cannot be split over {world_size} workers")
    steps_per_epoch = math.ceil(shard / (micro_batch_size * grad_accum))
    total = steps_per_epoch * epochs
    # DeepSpeed-independent linear warm-up; at least one step so the first update is not at full lr.
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    return StepPlan(examples, world_size, micro_batch_size, grad_accum, epochs, shard, steps_per_epoch, total,
                    warmup)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """auto: bf16 on GPU (the paper), fp32 on CPU."""
    return ("bf16" if use_gpu else "fp32") if precision == "auto" else precision


def deepspeed_config(*, zero_stage: int, micro_batch_size: int, grad_accum: int, world_size: int,
                     learning_rate: float, weight_decay: float, betas: tuple[float, float], eps: float,
                     grad_clip: float, precision: str) -> dict:
    """The DeepSpeed config of a run: ZeRO stage, precision, batch geometry, clipping, torch AdamW.

    The optimizer is torch's AdamW (`torch_adam`): DeepSpeed's fused and CPU Adam ops compile C++ on
    first use (about a minute each). The learning-rate schedule (`lr_schedule`) is given to
    deepspeed.initialize as a callable, so it is transformers' cosine-with-warm-up, the paper's.
    """
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # The export gathers the shards into one state dict on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": learning_rate, "betas": list(betas), "eps": eps,
                                                   "weight_decay": weight_decay, "torch_adam": True}},
        # torch AdamW is not on DeepSpeed's list of ZeRO-tested optimizers; it works with ZeRO 1-3.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is ours (metrics.jsonl and the console)
        "wall_clock_breakdown": False,
    }


def lr_schedule(optimizer, *, warmup_steps: int, total_steps: int):
    """Linear warm-up then cosine decay to 0 (transformers' schedule, as the paper's training used)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


# --- the training loop ----------------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: the global step and the data position (epoch, steps done in it)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def train_loop_per_worker(config: dict) -> None:
    """Run on every Ray Train worker: build the DeepSpeed engine, resume, train, checkpoint, export."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = StepPlan(**config["plan"])
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers but running on {world}")
    torch.manual_seed(config["seed"])
    stage = config["deepspeed"]["zero_optimization"]["stage"]
    bf16 = config["deepspeed"]["bf16"]["enabled"]
    path = resolve_model(config["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    if not torch.cuda.is_available():
        _skip_shm_comm_build()
    # Ray Train has set up torch.distributed; DeepSpeed wraps that process group (its world size must be
    # known before HfDeepSpeedConfig checks the batch geometry).
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    hf_ds = None
    if stage == 3:
        # Keeps transformers' ZeRO-3 mode on while loading, so from_pretrained builds the model already
        # partitioned (zero.Init) instead of a full copy per worker.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(config["deepspeed"])
    # Packed rows need attention that stops at example boundaries: a varlen kernel when one is named
    # (flash_attention_2 on GPU), else per-example sdpa. transformers' default sdpa would build a dense
    # block-diagonal mask over the whole row and compute every masked-out score.
    attn = config["attn_implementation"] or (use_packed_sdpa() if config["packing"] else "")
    extra = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32, **extra)
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config["deepspeed"],
        lr_scheduler=partial(lr_schedule, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps))

    pos = Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d)
        pos = Position(**client["position"])
        if rank == 0:
            log(f"resumed from {checkpoint.path} at step {pos.step} (epoch {pos.epoch + 1}, "
                f"{pos.step_in_epoch}/{plan.steps_per_epoch} steps into it)")
            _append_metrics(config["metrics_path"], {"event": "resume", "step": pos.step, "epoch": pos.epoch,
                                                     "step_in_epoch": pos.step_in_epoch, "time": time.time()})
    stop = min(plan.total_steps, config["max_steps"] or plan.total_steps)
    fail_at = config.get("fail_at_step", 0)
    failing = bool(fail_at) and checkpoint is None  # testing hook: one crash, on a fresh start only

    shard = ray.train.get_dataset_shard("train")
    window = _Window()
    last_saved = pos.step if checkpoint else -1
    engine.train()
    while pos.step < stop:
        buffer = max(config["shuffle_buffer"], plan.rows_per_step) if config["shuffle_buffer"] else None
        batches = shard.iter_batches(batch_size=plan.rows_per_step, batch_format="pyarrow", drop_last=False,
                                     local_shuffle_buffer_size=buffer,
                                     local_shuffle_seed=config["seed"] * 100003 + pos.epoch if buffer else None)
        seen, skip = 0, pos.step_in_epoch
        for index, batch in enumerate(batches):
            seen += batch.num_rows
            if index < skip:
                continue  # trained on before the checkpoint this run resumed from
            if failing and pos.step + 1 == fail_at and rank == world - 1:
                os._exit(1)  # a worker dies mid-epoch (tests FailureConfig recovery)
            rows = list(zip(batch["input_ids"].to_pylist(), batch["prompt_tokens"].to_pylist()))
            stats = _train_step(engine, rows, plan.grad_accum, pad_id, config["packing"])
            # Which examples this worker trained on in this step: equal digests = the same data position.
            stats["batch_digest"] = hashlib.sha1("\n".join(batch["id"].to_pylist()).encode()).hexdigest()[:12]
            pos.step += 1
            pos.step_in_epoch += 1
            if pos.step_in_epoch == plan.steps_per_epoch:
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
            window.add(stats)
            if pos.step % config["log_every"] == 0 or pos.step == stop:
                record = window.flush(pos, plan)
                if rank == 0:
                    _append_metrics(config["metrics_path"], record)
                    log(_format(record, plan))
            if config["checkpoint_every"] and pos.step % config["checkpoint_every"] == 0 and pos.step < stop:
                _save_checkpoint(engine, pos, {"step": pos.step, "loss": stats["loss"]})
                last_saved = pos.step
            if pos.step >= stop:
                break
        else:
            if seen != plan.shard_examples:
                raise RuntimeError(f"worker {rank} read {seen} examples this epoch, the plan says "
                                   f"{plan.shard_examples}: did the input change since the checkpoint?")
    if last_saved != pos.step:
        _save_checkpoint(engine, pos, {"step": pos.step})

    export_dir = config["export_dir"]
    diff = export_model(engine, tokenizer, path, export_dir, stage, rank, hf_ds, check=config["export_check"])
    if rank == 0:
        check = "" if diff is None else f" (max |logit difference| to the trained engine: {diff:g})"
        log(f"exported {export_dir}{check}")
        _append_metrics(config["metrics_path"], {"event": "export", "step": pos.step, "path": export_dir,
                                                 "max_abs_logit_diff": diff,
                                                 "completed": pos.step >= plan.total_steps, "time": time.time()})


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op (C++, one to two minutes on first
    use) that only its inference all-reduce uses; ZeRO training talks through torch.distributed (gloo).
    Marking the op incompatible skips the build (DeepSpeed keeps the probed dict for the process)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _train_step(engine, rows: list[tuple[list[int], int]], grad_accum: int, pad_id: int, packing: bool) -> dict:
    """One optimizer step: grad_accum micro-batches; loss = mean over the step's target tokens (all workers)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    started = time.perf_counter()
    per = math.ceil(len(rows) / grad_accum)
    micro = [rows[i * per:(i + 1) * per] for i in range(grad_accum)]
    local = torch.tensor([sum(len(ids) - p for ids, p in rows), sum(len(ids) for ids, _ in rows)],
                         dtype=torch.float64)
    dist.all_reduce(local)
    global_targets, global_tokens = float(local[0]), float(local[1])
    # engine.backward divides by grad_accum and the gradient all-reduce averages over workers: undo both,
    # so the gradient is that of (sum of token losses) / (target tokens in the whole step).
    scale = grad_accum * world / global_targets
    lr = engine.get_lr()[0]
    sums = torch.zeros(2, dtype=torch.float64)  # summed token loss, token slots computed (with padding)
    for part in micro:
        mb = make_micro_batch(part, pad_id, packing)
        nll = token_losses(engine, mb).sum()
        engine.backward(nll * scale)
        engine.step()
        sums[0] += float(nll.detach())
        sums[1] += mb.input_ids.numel()
    dist.all_reduce(sums)
    return {"loss": float(sums[0]) / global_targets, "lr": lr, "tokens": global_tokens, "slots": float(sums[1]),
            "target_tokens": global_targets, "examples": len(rows) * world, "seconds": time.perf_counter() - started}


class _Window:
    """Accumulates steps between two log lines."""

    def __init__(self):
        self.steps, self.started = [], time.perf_counter()

    def add(self, stats: dict) -> None:
        self.steps.append(stats)

    def flush(self, pos: Position, plan: StepPlan) -> dict:
        import torch

        now = time.perf_counter()
        s = self.steps
        targets = sum(x["target_tokens"] for x in s)
        tokens = sum(x["tokens"] for x in s)
        record = {
            "step": pos.step, "epoch": pos.epoch + pos.step_in_epoch / plan.steps_per_epoch,
            "loss": sum(x["loss"] * x["target_tokens"] for x in s) / targets,
            "lr": s[-1]["lr"], "tokens_per_s": tokens / (now - self.started),
            "compute_tokens_per_s": tokens / sum(x["seconds"] for x in s),
            "tokens": int(tokens), "target_tokens": int(targets), "examples": sum(x["examples"] for x in s),
            "padding_share": 1 - tokens / sum(x["slots"] for x in s),
            "batch_digest": s[-1]["batch_digest"], "time": time.time(),
        }
        if torch.cuda.is_available():
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.steps, self.started = [], now
        return record


def _format(r: dict, plan: StepPlan) -> str:
    gpu = f", GPU memory {r['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in r else ""
    return (f"step {r['step']}/{plan.total_steps} epoch {r['epoch']:.2f} loss {r['loss']:.4f} lr {r['lr']:.3g} "
            f"{r['tokens_per_s']:.0f} tokens/s{gpu}")


def _append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _save_checkpoint(engine, pos: Position, metrics: dict) -> None:
    """Every worker writes its DeepSpeed shard files; Ray Train merges them into one checkpoint directory."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="instructrag-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step{pos.step}", client_state={"position": asdict(pos)})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{pos.step:08d}")


def export_model(engine, tokenizer, source: str, out_dir: str, zero_stage: int, rank: int, hf_ds=None,
                 check: bool = True) -> float | None:
    """Write the trained weights as a Hugging Face model directory (rank 0), with the tokenizer and the
    source model's generation config. With `check`, reload the export and return the largest logit
    difference to the engine on a probe input (0.0 when exact). All ranks must call it (ZeRO-3 gathers
    the shards, and every rank runs the probe through the engine)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # DeepSpeed's own ZeRO-3 gather (HF Trainer uses it)
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    probe = torch.tensor([tokenizer(prompts.FT_QUESTION.format(question="who wrote the probe?"),
                                    add_special_tokens=False)["input_ids"]]).to(engine.device)
    expected = None
    if check:
        engine.eval()
        with torch.no_grad():
            expected = engine(input_ids=probe, use_cache=False).logits.float()
        engine.train()
    if rank != 0:
        return None
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    except OSError:
        pass  # the source model has no generation config; transformers derives one from config.json
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if hf_ds is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # load the export as one plain model, not under ZeRO-3
    if not check:
        return None
    dtype = next(iter(state_dict.values())).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(engine.device).eval()
    with torch.no_grad():
        got = reloaded(input_ids=probe, use_cache=False).logits.float()
    return float((got - expected).abs().max())


# --- the job (driver) ---------------------------------------------------------------------------


class OutputConflict(RuntimeError):
    """The output directory was written with other settings."""


def rationale_files(path: str) -> list[str]:
    """Parquet files of a synthesis output (its rationales/), a directory of Parquet files, or one file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if p.is_file():
        return [str(p)]
    if (p / "rationales").is_dir():
        p = p / "rationales"
    files = sorted(str(f) for f in p.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"input {path} holds no Parquet files (expected jobs/synthesize.py's output)")
    return files


def prepare_output(cfg: TrainConfig, fingerprint: str) -> bool:
    """Resume, clear (overwrite) or refuse an output directory; True when it holds a finished run."""
    out = Path(cfg.output)
    run_file = out / RUN
    if run_file.is_file():
        old = json.loads(run_file.read_text())["fingerprint"]
        if old != fingerprint and not cfg.overwrite:
            raise OutputConflict(
                f"{cfg.output} holds a training run with other settings (fingerprint {old}, now {fingerprint}); "
                "use a new --output, or pass overwrite=true to delete it and start again")
        if old != fingerprint or cfg.overwrite:
            for name in (CHECKPOINTS, MODEL, REJECTED):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (METRICS, RUN, MANIFEST):
                (out / name).unlink(missing_ok=True)
    elif cfg.overwrite:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"fingerprint": fingerprint, "config": to_dict(cfg)}, indent=2) + "\n")
    manifest = out / MANIFEST
    return (manifest.is_file() and (out / MODEL).is_dir()
            and json.loads(manifest.read_text()).get("completed") is True and not cfg.max_steps)


def synthesis_num_docs(path: str) -> int | None:
    """prompt.num_docs of the synthesis run that wrote the rationales (its manifest.json), when known."""
    p = Path(path)
    for manifest in (p / MANIFEST, p.parent / MANIFEST, p.parent.parent / MANIFEST):
        if manifest.is_file():
            try:
                return int(json.loads(manifest.read_text())["config"]["prompt"]["num_docs"])
            except (KeyError, TypeError, ValueError):
                return None
    return None


def resolve_num_docs(path: str, num_docs: int) -> int:
    """The documents shown in the FT prompt: the rationales' own K unless data.num_docs says otherwise.

    A template or model rationale names documents by their number in the synthesis prompt ("Document 4
    (Title: ...)"), so the FT prompt must show the same K documents in the same order.
    """
    written_with = synthesis_num_docs(path)
    if num_docs == 0:
        return written_with or 5
    if written_with is not None and written_with != num_docs:
        log(f"note: data.num_docs={num_docs}, but the rationales were written seeing {written_with} documents; "
            "their 'Document i' references will point at other documents")
    return num_docs


def check_model(model: str) -> str:
    """Fail early, in one line, when the model cannot be loaded or its chat template cannot mark targets."""
    try:
        path, tokenizer = load_chat_tokenizer("model", model)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        ft_texts(tokenizer, "probe?", [{"title": "t", "text": "x", "score": 1.0}], "rationale")
    except TemplateError as e:
        raise SystemExit(f"error: model={model!r}: {e}") from None
    return path


def build_examples(cfg: TrainConfig, num_docs: int):
    """Ray Data: read the rationales, build examples; returns the materialized dataset (input order)."""
    import ray

    ds = ray.data.read_parquet(rationale_files(cfg.input), columns=INPUT_COLUMNS)
    # Input order everywhere: the order (and so the data position of a checkpoint) must be the same
    # every time the job runs on the same input.
    ds.context.execution_options.preserve_order = True
    if cfg.data.limit:
        ds = ds.limit(cfg.data.limit)
    d = cfg.data
    return ds.map_batches(
        ExampleStage, batch_format="pyarrow", batch_size=64, num_cpus=d.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=d.max_actors),
        fn_constructor_kwargs={"model": cfg.model, "num_docs": num_docs, "max_length": d.max_length,
                               "consistent_only": d.consistent_only}).materialize()


def summarize_examples(examples) -> tuple[dict, list[dict]]:
    """Counts by outcome and token statistics (small columns only); the rejected rows."""
    counts: Counter = Counter()
    rejected, lengths = [], []
    truncated = question_cut = targets = 0
    cols = ["id", "dataset", "tokens", "prompt_tokens", "target_tokens", "truncated_tokens", "question_cut",
            "skip_reason", "skip_detail", "original"]
    for batch in examples.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            counts[row["skip_reason"] or "trainable"] += 1
            if row["skip_reason"] is None:
                lengths.append(row["tokens"])
                targets += row["target_tokens"]
                truncated += row["truncated_tokens"] > 0
                question_cut += bool(row["question_cut"])
            elif row["skip_reason"] != "inconsistent":
                rejected.append(row)
    summary = {
        "rows_read": sum(counts.values()),
        "examples": counts["trainable"],
        "skipped_inconsistent": counts["inconsistent"],
        "rejected": dict(sorted((k, v) for k, v in counts.items() if k not in ("trainable", "inconsistent"))),
        "examples_with_documents_truncated": truncated,
        "examples_with_question_truncated": question_cut,
        "tokens": sum(lengths), "target_tokens": targets,
        "max_example_tokens": max(lengths, default=0),
        "mean_example_tokens": round(sum(lengths) / len(lengths), 1) if lengths else 0,
    }
    return summary, rejected


def write_rejected(output: str, rows: list[dict], fingerprint: str) -> None:
    from . import schemas
    from .write import write_table

    directory = Path(output) / REJECTED
    shutil.rmtree(directory, ignore_errors=True)  # rebuilt from the same input on every run
    table = pa.Table.from_pylist(
        [{"id": r["id"], "dataset": r["dataset"], "stage": "train", "reason": r["skip_reason"],
          "detail": r["skip_detail"], "original": r["original"], "config_fingerprint": fingerprint} for r in rows],
        schema=schemas.load("rejected"))
    write_table(table, directory)


def run_training(cfg: TrainConfig, *, fail_at_step: int = 0) -> dict:
    """Run the whole SFT job; returns the manifest (also written to <output>/manifest.json).

    `fail_at_step` is a testing hook: the last worker dies before that step on a fresh start, and Ray
    Train's FailureConfig must bring the run back from the latest checkpoint.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .cli import init_ray
    from .synthesize import package_versions

    started = time.time()
    fingerprint = cfg.fingerprint()
    out = Path(cfg.output).resolve()
    if prepare_output(cfg, fingerprint):
        log(f"{out} already holds the finished run with these settings (model in {out / MODEL}); nothing to do")
        return json.loads((out / MANIFEST).read_text())
    path = check_model(cfg.model)
    init_ray(cfg.ray_address)

    num_docs = resolve_num_docs(cfg.input, cfg.data.num_docs)
    log(f"building examples from {cfg.input} ({num_docs} document{'s' if num_docs != 1 else ''} per prompt)")
    examples = build_examples(cfg, num_docs)
    summary, rejected = summarize_examples(examples)
    summary["seconds"] = round(time.time() - started, 2)
    write_rejected(str(out), rejected, fingerprint)
    _print_examples(summary, cfg)
    if summary["examples"] < cfg.scaling.num_workers:
        raise SystemExit(f"error: {summary['examples']} trainable examples; at least scaling.num_workers="
                         f"{cfg.scaling.num_workers} are needed")
    o, s = cfg.optim, cfg.scaling
    plan = plan_steps(summary["examples"], s.num_workers, o.micro_batch_size, o.global_batch_size, o.epochs,
                      o.warmup_ratio)
    log(f"{plan.total_steps} steps ({plan.epochs} epochs x {plan.steps_per_epoch}), global batch "
        f"{o.global_batch_size} = {o.micro_batch_size} x {plan.grad_accum} accumulation x {s.num_workers} workers, "
        f"warm-up {plan.warmup_steps} steps, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{resolve_precision(cfg.deepspeed.precision, s.use_gpu)}, packing {'on' if cfg.data.packing else 'off'}")

    train_ds = examples.map_batches(trainable, batch_format="pyarrow", num_cpus=TASK_CPUS)
    # Fixed-size blocks in input order: Ray's in-order split then gives every worker the same rows each
    # run, whatever block sizes the read produced.
    train_ds = train_ds.repartition(target_num_rows_per_block=plan.rows_per_step, strict=True).materialize()
    del examples

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    precision = resolve_precision(cfg.deepspeed.precision, s.use_gpu)
    loop_config = {
        "plan": asdict(plan), "model": cfg.model, "seed": cfg.seed, "max_steps": cfg.max_steps,
        "packing": cfg.data.packing, "shuffle_buffer": cfg.data.shuffle_buffer,
        "log_every": cfg.log_every, "checkpoint_every": cfg.checkpoint_every,
        "attn_implementation": cfg.attn_implementation, "gradient_checkpointing": cfg.deepspeed.gradient_checkpointing,
        "metrics_path": str(out / METRICS), "export_dir": str(out / MODEL), "fail_at_step": fail_at_step,
        "export_check": cfg.export_check,
        "deepspeed": deepspeed_config(
            zero_stage=cfg.deepspeed.zero_stage, micro_batch_size=o.micro_batch_size, grad_accum=plan.grad_accum,
            world_size=s.num_workers, learning_rate=o.learning_rate, weight_decay=o.weight_decay,
            betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, grad_clip=o.grad_clip, precision=precision),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **parse_resources(s.resources, "scaling.resources")}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=str(out),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": train_ds},
        dataset_config=DataConfig(execution_options=ingest, enable_shard_locality=False),
    )
    fit_started = time.time()
    result = trainer.fit()
    fit_s = time.time() - fit_started
    history = read_metrics(out / METRICS)
    steps = [r for r in history if "loss" in r]
    final = next((r for r in reversed(history) if r.get("event") == "export"), {})
    wall = time.time() - started
    manifest = {
        "job": "train",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
        "config_fingerprint": fingerprint,
        "versions": package_versions(),
        "model_source": path,
        "data": {**summary, "num_docs": num_docs},
        "plan": asdict(plan),
        "completed": bool(final.get("completed")),
        "final_step": final.get("step"),
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "resumes": sum(r.get("event") == "resume" for r in history),
        "export_max_abs_logit_diff": final.get("max_abs_logit_diff"),
        "wall_time_s": round(wall, 2),
        "train_time_s": round(fit_s, 2),  # Ray Train: worker startup, steps, checkpoints, export
        "outputs": {"model": str(out / MODEL), "checkpoints": str(out / CHECKPOINTS),
                    "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
                    "metrics": str(out / METRICS), "rejected": str(out / REJECTED)},
    }
    from .write import write_manifest

    write_manifest(str(out), manifest)
    _summary(manifest)
    return manifest


def read_metrics(path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _print_examples(s: dict, cfg: TrainConfig) -> None:
    log(f"{s['rows_read']} rationale rows: {s['examples']} examples "
        f"({s['tokens']} tokens, {s['target_tokens']} with loss; longest {s['max_example_tokens']}, "
        f"mean {s['mean_example_tokens']}; built in {s['seconds']:.0f}s)")
    if s["skipped_inconsistent"]:
        log(f"  {s['skipped_inconsistent']} rows not used: rationale without a gold answer "
            "(data.consistent_only=true)")
    for reason, n in s["rejected"].items():
        log(f"  {n} rows rejected: {reason} (see {Path(cfg.output) / REJECTED})")
    if s["examples_with_documents_truncated"]:
        log(f"  {s['examples_with_documents_truncated']} examples had documents cut from the left to fit "
            f"data.max_length={cfg.data.max_length} ({s['examples_with_question_truncated']} also their question)")


def _summary(m: dict) -> None:
    log("done" if m["completed"] else f"stopped at step {m['final_step']} (max_steps); rerun without it to continue")
    print(f"  examples            {m['data']['examples']} (rejected: {sum(m['data']['rejected'].values())}, "
          f"not consistent: {m['data']['skipped_inconsistent']})")
    print(f"  steps               {m['final_step']}/{m['plan']['total_steps']}, loss {m['first_loss']:.4f} -> "
          f"{m['final_loss']:.4f}" if m["first_loss"] is not None else f"  steps               {m['final_step']}")
    print(f"  model               {m['outputs']['model']} (export check: max |logit diff| "
          f"{m['export_max_abs_logit_diff']})")
    print(f"  checkpoints         {m['outputs']['checkpoints']}")
    print(f"  metrics             {m['outputs']['metrics']}")
    print(f"  wall time           {m['wall_time_s']}s", flush=True)
