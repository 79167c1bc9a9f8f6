"""The training loop that runs on every Ray Train worker, its schedule and its DeepSpeed config.

`train_loop_per_worker(config)` builds the DeepSpeed engine, resumes from the latest checkpoint
(`ray.train.get_checkpoint`), trains on its shard (`ray.train.get_dataset_shard`), checkpoints through
`ray.train.report`, and exports the model in Hugging Face format.
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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from .. import prompts
from ..console import quiet_worker
from ..errors import TrainingError
from ..models import resolve_model
from ..storage import location
from .packing import make_micro_batch, token_losses, use_packed_sdpa


def log(message: str) -> None:
    # Not print(): on Ray Train workers print is patched to go to the console twice (stdout and logger).
    sys.stdout.write(f"[train] {message}\n")
    sys.stdout.flush()


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

    def advance(self, plan: StepPlan) -> None:
        """One optimizer step done; the epoch rolls over after its last step."""
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == plan.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def train_loop_per_worker(config: dict) -> None:
    """Run on every Ray Train worker: build the DeepSpeed engine, resume, train, checkpoint, export."""
    import ray.train
    import torch

    if not config.get("verbose"):
        quiet_worker()  # the driver shows the steps (metrics.jsonl); see console.py
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # known, not detected: no "unable to detect" warning
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = StepPlan(**config["plan"])
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers but running on {world}")
    torch.manual_seed(config["seed"])
    engine, tokenizer, path, hf_ds = build_engine(config, plan)
    checkpoint = ray.train.get_checkpoint()
    metrics = MetricsLog(config["metrics_path"]) if rank == 0 else None
    pos = resume(engine, checkpoint, plan, metrics)
    stop = min(plan.total_steps, config["max_steps"] or plan.total_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    last_saved = pos.step if checkpoint else -1
    window = _Window()  # the steps between two log lines (a window may span an epoch's end)
    engine.train()
    while pos.step < stop:
        last_saved = train_epoch(engine, ray.train.get_dataset_shard("train"), pos, plan, stop, pad_id, rank,
                                 config, last_saved, window, metrics)
    if last_saved != pos.step:
        save_checkpoint(engine, pos, {"step": pos.step})

    stage = config["deepspeed"]["zero_optimization"]["stage"]
    export_dir = config["export_dir"]
    diff = export_model(engine, tokenizer, path, export_dir, stage, rank, hf_ds, check=config["export_check"])
    if rank == 0:
        check = "" if diff is None else f" (max |logit difference| to the trained engine: {diff:g})"
        if config.get("verbose"):
            log(f"exported {export_dir}{check}")
        metrics.append({"event": "export", "step": pos.step, "path": export_dir, "max_abs_logit_diff": diff,
                        "completed": pos.step >= plan.total_steps, "time": time.time()}, flush=True)


def build_engine(config: dict, plan: StepPlan):
    """The model (partitioned at load time under ZeRO-3) wrapped in a DeepSpeed engine with the job's
    optimizer and schedule. Returns (engine, tokenizer, model path, HfDeepSpeedConfig or None)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = config["deepspeed"]["zero_optimization"]["stage"]
    bf16 = config["deepspeed"]["bf16"]["enabled"]
    path = resolve_model(config["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
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
    return engine, tokenizer, path, hf_ds


def resume(engine, checkpoint, plan: StepPlan, metrics: MetricsLog | None) -> Position:
    """Load the latest checkpoint into the engine (when there is one); returns where training stands.
    Rank 0 (the one with `metrics`) marks the records of the steps that will be trained again as
    superseded and logs the resume."""
    pos = Position()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d)
        pos = Position(**client["position"])
    if metrics is None:
        return pos
    metrics.supersede(pos.step)
    if checkpoint:
        log(f"resumed from {checkpoint.path} at step {pos.step} (epoch {pos.epoch + 1}, "
            f"{pos.step_in_epoch}/{plan.steps_per_epoch} steps into it)")
        metrics.append({"event": "resume", "step": pos.step, "epoch": pos.epoch,
                        "step_in_epoch": pos.step_in_epoch, "time": time.time()}, flush=True)
    return pos


def train_epoch(engine, shard, pos: Position, plan: StepPlan, stop: int, pad_id: int, rank: int, config: dict,
                last_saved: int, window, metrics: MetricsLog | None) -> int:
    """Train from `pos` to the end of its epoch (or to `stop`), skipping the batches a resumed run already
    trained on; logs, checkpoints and advances `pos`. Returns the step of the last checkpoint saved."""
    buffer = max(config["shuffle_buffer"], plan.rows_per_step) if config["shuffle_buffer"] else None
    batches = shard.iter_batches(batch_size=plan.rows_per_step, batch_format="pyarrow", drop_last=False,
                                 local_shuffle_buffer_size=buffer,
                                 local_shuffle_seed=config["seed"] * 100003 + pos.epoch if buffer else None)
    seen, skip = 0, pos.step_in_epoch
    for index, batch in enumerate(batches):
        seen += batch.num_rows
        if index < skip:
            continue  # trained on before the checkpoint this run resumed from
        rows = list(zip(batch["input_ids"].to_pylist(), batch["prompt_tokens"].to_pylist()))
        stats = train_step(engine, rows, plan.grad_accum, pad_id, config["packing"])
        # Which examples this worker trained on in this step: equal digests = the same data position.
        stats["batch_digest"] = hashlib.sha1("\n".join(batch["id"].to_pylist()).encode()).hexdigest()[:12]
        pos.advance(plan)
        window.add(stats)
        if pos.step % config["log_every"] == 0 or pos.step == stop:
            record = window.flush(pos, plan)
            if metrics is not None:
                metrics.append(record)
                if config.get("verbose"):  # else the driver's progress display shows the step
                    log(_format(record, plan))
        if config["checkpoint_every"] and pos.step % config["checkpoint_every"] == 0 and pos.step < stop:
            if metrics is not None:
                metrics.flush()
            save_checkpoint(engine, pos, {"step": pos.step, "loss": stats["loss"]})
            last_saved = pos.step
        if pos.step >= stop:
            return last_saved
    if seen != plan.shard_examples:
        raise TrainingError(f"worker {rank} read {seen} examples this epoch, the plan says "
                           f"{plan.shard_examples}: did the input change since the checkpoint?")
    return last_saved


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op (C++, one to two minutes on first
    use) that only its inference all-reduce uses; ZeRO training talks through torch.distributed (gloo).
    Marking the op incompatible skips the build (DeepSpeed keeps the probed dict for the process)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train_step(engine, rows: list[tuple[list[int], int]], grad_accum: int, pad_id: int, packing: bool) -> dict:
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


class MetricsLog:
    """metrics.jsonl (local or at a URI), kept by rank 0. On a local disk each record is appended as it
    comes; on an object store (no appends) the whole file is rewritten at most every FLUSH_S seconds and
    at each checkpoint, resume and the end. A resumed run marks the records past the step it resumed from
    (trained again) with "superseded": true, rewriting the file once, so each step has one record without
    it; the old ones show what was repeated."""

    FLUSH_S = 10.0

    def __init__(self, uri: str):
        self.loc = location(uri, "output")
        self.records = _read_records(self.loc.read_text()) if self.loc.is_file() else []
        self.written = -1  # unknown until the first write: a torn last line is rewritten away
        self.flushed = 0.0

    def supersede(self, step: int) -> None:
        """Mark the records of steps after `step` (and what was logged after them) as superseded."""
        cut = next((i for i, r in enumerate(self.records) if r.get("step", 0) > step), len(self.records))
        if cut < len(self.records):
            for r in self.records[cut:]:
                r["superseded"] = True
            self.rewrite()

    def append(self, record: dict, flush: bool = False) -> None:
        self.records.append(record)
        if self.loc.local and self.written >= 0:
            with open(self.loc.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.records[self.written:]))
            self.written = len(self.records)
        elif self.loc.local or flush or time.time() - self.flushed >= self.FLUSH_S:
            self.rewrite()

    def flush(self) -> None:
        if len(self.records) > self.written:
            self.rewrite()

    def rewrite(self) -> None:
        self.loc.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.written, self.flushed = len(self.records), time.time()


def _read_records(text: str) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short by a kill mid-append is dropped."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def save_checkpoint(engine, pos: Position, metrics: dict) -> None:
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
    target = location(out_dir, "output")
    # saved on local disk first: beside the target (then renamed into place), or in a temp dir (then uploaded)
    tmp = Path(target.path + ".tmp") if target.local else Path(tempfile.mkdtemp(prefix="instructrag-export-"))
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.config.use_cache = True  # off only while training (build_engine); generation wants the cache
    engine.module.save_pretrained(tmp, state_dict=state_dict)
    engine.module.config.use_cache = False
    tokenizer.save_pretrained(tmp)
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    except OSError:
        pass  # the source model has no generation config; transformers derives one from config.json
    if target.local:
        shutil.rmtree(target.path, ignore_errors=True)
        os.replace(tmp, target.path)
        out = Path(target.path)
    else:
        target.upload_from(tmp)
        out = tmp  # the check below reloads the local copy of what was uploaded
    if hf_ds is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # load the export as one plain model, not under ZeRO-3
    try:
        if not check:
            return None
        dtype = next(iter(state_dict.values())).dtype
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(engine.device).eval()
        with torch.no_grad():
            got = reloaded(input_ids=probe, use_cache=False).logits.float()
        return float((got - expected).abs().max())
    finally:
        if not target.local:
            shutil.rmtree(tmp, ignore_errors=True)
