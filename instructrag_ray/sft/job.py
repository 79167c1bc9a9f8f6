"""jobs/train.py: read the rationales, build the examples, run the Ray Train + DeepSpeed job, report.

See the package docstring for the output layout, resume and the loss.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict


from .. import dryrun
from ..config import TrainConfig, parse_resources, to_dict
from ..console import Progress
from ..errors import InputError, OutputConflict, TrainingError
from ..models import load_chat_tokenizer
from ..output import manifest_header, write_manifest, write_table
from ..rows import TASK_CPUS, rejected_record, rejected_table
from ..storage import Location, check_location, dumps, location
from .examples import INPUT_COLUMNS, ExampleStage, TemplateError, ft_texts, trainable
from .loop import deepspeed_config, log, plan_steps, resolve_precision, train_loop_per_worker

CHECKPOINTS, MODEL, METRICS, REJECTED, RUN, MANIFEST = (
    "checkpoints", "model", "metrics.jsonl", "rejected", "run.json", "manifest.json")


def rationale_files(path: str) -> list[Location]:
    """Parquet files of a synthesis output (its rationales/), a directory of Parquet files, or one file
    (local or at a URI)."""
    p = location(path, "input")
    if not p.exists():
        raise InputError(f"input {path} does not exist; pass --input a jobs/synthesize.py output directory")
    if p.is_file():
        return [p]
    if (p / "rationales").is_dir():
        p = p / "rationales"
    files = p.files((".parquet",))
    if not files:
        raise InputError(f"input {path} holds no Parquet files (expected jobs/synthesize.py's output)")
    return files


def prepare_output(cfg: TrainConfig, fingerprint: str, check_only: bool = False) -> bool:
    """Resume, clear (overwrite) or refuse an output; True when it holds a finished run. Call it after the
    other checks: with overwrite it deletes the old output. With `check_only` (a dry run) nothing is
    changed."""
    out = location(cfg.output, "output")
    run_file = out / RUN
    if run_file.is_file():
        old = json.loads(run_file.read_text())["fingerprint"]
        if old != fingerprint and not cfg.overwrite:
            raise OutputConflict(
                f"{out.uri} holds a training run with other settings (fingerprint {old}, now {fingerprint}); "
                "use a new --output, or pass overwrite=true to delete it and start again")
        if check_only:
            return not cfg.overwrite and finished_run(out, cfg)
        if old != fingerprint or cfg.overwrite:
            for name in (CHECKPOINTS, MODEL, REJECTED, METRICS, RUN, MANIFEST):
                (out / name).delete()
    elif check_only:
        return False
    elif cfg.overwrite:
        (out / CHECKPOINTS).delete()
    run_file.write_bytes(dumps({"fingerprint": fingerprint, "config": to_dict(cfg)}))
    return finished_run(out, cfg)


def finished_run(out: Location, cfg: TrainConfig) -> bool:
    manifest = out / MANIFEST
    return (manifest.is_file() and (out / MODEL).is_dir()
            and json.loads(manifest.read_text()).get("completed") is True and not cfg.max_steps)


def synthesis_num_docs(path: str) -> int | None:
    """prompt.num_docs of the synthesis run that wrote the rationales (its manifest.json), when known."""
    p = location(path, "input")
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
    path, tokenizer = load_chat_tokenizer("model", model)
    try:
        ft_texts(tokenizer, "probe?", [{"title": "t", "text": "x", "score": 1.0}], "rationale")
    except TemplateError as e:
        raise TrainingError(f"model={model!r}: {e}") from None
    return path


def build_examples(cfg: TrainConfig, num_docs: int):
    """Ray Data: read the rationales, build examples; returns the materialized dataset (input order)."""
    import ray

    files = rationale_files(cfg.input)
    ds = ray.data.read_parquet([f.path for f in files], filesystem=files[0].fs, columns=INPUT_COLUMNS)
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
                               "consistent_only": d.consistent_only, "target": d.target}).materialize()


def summarize_examples(examples) -> tuple[dict, list[dict]]:
    """Counts by outcome and token statistics (small columns only); the rejected rows."""
    counts: Counter = Counter()
    rejected, lengths = [], []
    truncated = question_cut = targets = 0
    cols = ["id", "dataset", "tokens", "prompt_tokens", "target_tokens", "truncated_tokens", "question_cut",
            "inconsistent", "reject_stage", "reject_reason", "reject_detail", "original"]
    for batch in examples.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if row["reject_stage"] is not None:
                counts[row["reject_reason"]] += 1
                rejected.append(row)
            elif row["inconsistent"]:
                counts["inconsistent"] += 1
            else:
                counts["trainable"] += 1
                lengths.append(row["tokens"])
                targets += row["target_tokens"]
                truncated += row["truncated_tokens"] > 0
                question_cut += bool(row["question_cut"])
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


def write_rejected(output: Location, rows: list[dict], fingerprint: str) -> None:
    """rejected/ (schemas/rejected.json): rebuilt from the same input on every run."""
    directory = output / REJECTED
    directory.delete()
    write_table(rejected_table([rejected_record(r["id"], r["dataset"], r["reject_stage"], r["reject_reason"],
                                                r["reject_detail"], r["original"], fingerprint) for r in rows]),
                directory)


def run_training(cfg: TrainConfig, dry_run: bool = False) -> dict:
    """Run the whole SFT job; returns the manifest (also written to <output>/manifest.json). With
    `dry_run`, run every check and return what would run, without starting Ray."""
    from .. import cli

    started = time.time()
    fingerprint = cfg.fingerprint()
    out = location(cfg.output, "output")
    rationale_files(cfg.input)  # a missing input fails before the output is touched
    check_location(out, "output", write=True)
    path = check_model(cfg.model)
    if dry_run:
        return training_dry_run(cfg, prepare_output(cfg, fingerprint, check_only=True), out)
    if prepare_output(cfg, fingerprint):
        log(f"{out} already holds the finished run with these settings (model in {out / MODEL}); nothing to do")
        return json.loads((out / MANIFEST).read_text())
    cli.init_ray(cfg.ray_address, verbose=cfg.verbose)

    num_docs = resolve_num_docs(cfg.input, cfg.data.num_docs)
    log(f"building examples from {cfg.input} ({num_docs} document{'s' if num_docs != 1 else ''} per prompt)")
    examples = build_examples(cfg, num_docs)
    summary, rejected = summarize_examples(examples)
    summary["seconds"] = round(time.time() - started, 2)
    write_rejected(out, rejected, fingerprint)
    _print_examples(summary, cfg)
    if summary["examples"] < cfg.scaling.num_workers:
        raise TrainingError(f"{summary['examples']} trainable examples in {cfg.input}; at least scaling.num_workers="
                            f"{cfg.scaling.num_workers} are needed (data.consistent_only=true keeps only rationales "
                            "that contain a gold answer)")
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
    fit_started = time.time()
    with Progress("train", plan.total_steps, "steps", interval=cfg.progress_interval_s, rejects=False,
                  poll=MetricsTail(out / METRICS).poll):
        result = make_trainer(cfg, plan, train_ds, out).fit()
    manifest = training_manifest(cfg, fingerprint, path, summary, num_docs, plan, result, out,
                                 wall=time.time() - started, fit_s=time.time() - fit_started)
    write_manifest(out, manifest)
    if (out / MODEL).is_dir():
        write_model_card(out / MODEL, manifest)
    _summary(manifest)
    return manifest


def make_trainer(cfg: TrainConfig, plan, train_ds, out: Location):
    """The TorchTrainer: `train_loop_per_worker` on scaling.num_workers workers, checkpoints under <output>."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    o, s = cfg.optim, cfg.scaling
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    loop_config = {
        "plan": asdict(plan), "model": cfg.model, "seed": cfg.seed, "max_steps": cfg.max_steps,
        "packing": cfg.data.packing, "shuffle_buffer": cfg.data.shuffle_buffer,
        "log_every": cfg.log_every, "checkpoint_every": cfg.checkpoint_every,
        "attn_implementation": cfg.attn_implementation, "gradient_checkpointing": cfg.deepspeed.gradient_checkpointing,
        "metrics_path": str(out / METRICS), "export_dir": str(out / MODEL), "export_check": cfg.export_check,
        "verbose": cfg.verbose,
        "deepspeed": deepspeed_config(
            zero_stage=cfg.deepspeed.zero_stage, micro_batch_size=o.micro_batch_size, grad_accum=plan.grad_accum,
            world_size=s.num_workers, learning_rate=o.learning_rate, weight_decay=o.weight_decay,
            betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, grad_clip=o.grad_clip,
            precision=resolve_precision(cfg.deepspeed.precision, s.use_gpu)),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **parse_resources(s.resources, "scaling.resources")}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=out.uri,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (worker group started, each checkpoint reported) only with verbose=true
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": train_ds},
        dataset_config=DataConfig(execution_options=ingest, enable_shard_locality=False),
    )


def training_manifest(cfg: TrainConfig, fingerprint: str, path: str, summary: dict, num_docs: int, plan, result,
                      out: Location, *, wall: float, fit_s: float) -> dict:
    history = read_metrics(out / METRICS)
    steps = [r for r in history if "loss" in r and not r.get("superseded")]
    final = next((r for r in reversed(history) if r.get("event") == "export"), {})
    return {
        **manifest_header("train", cfg),
        "config_fingerprint": fingerprint,
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


class MetricsTail:
    """The training progress from <output>/metrics.jsonl (rank 0 rewrites it, atomically, as steps are
    logged; on an object store every few seconds): `poll()` -> (step, 0, 'loss x')."""

    def __init__(self, path: Location):
        self.path, self.step, self.note = path, 0, ""

    def poll(self) -> tuple[int, int, str]:
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if "step" in record:
                    self.step = record["step"]
                if "loss" in record:
                    self.note = f"loss {record['loss']:.4f}, {record['tokens_per_s']:.0f} tokens/s"
        return self.step, 0, self.note


def write_model_card(model_dir: Location, m: dict) -> Location:
    """README.md in the exported model directory: what it was trained from, how, and how far it got."""
    c, data, plan = m["config"], m["data"], m["plan"]
    o, ds, sc = c["optim"], c["deepspeed"], c["scaling"]
    rejected = ", ".join(f"{k}: {v}" for k, v in data["rejected"].items()) or "none"
    answer = c["data"].get("target") == "answer"
    title, key = ("Vanilla SFT", "sft_model") if answer else ("InstructRAG-FT", "ft_model")
    trained_on = "the first gold answer (the paper's vanilla SFT baseline)" if answer else "denoising rationales"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [instructrag, rag]", "---", "",
        f"# {title}: {c['model'].rstrip('/').rsplit('/', 1)[-1] or c['model']}, fine-tuned on {trained_on}", "",
        "Written by instructrag-ray's jobs/train.py (InstructRAG, Wei, Chen and Meng, ICLR 2025). Load it with "
        "`AutoModelForCausalLM.from_pretrained(<this directory>)`; evaluate it with jobs/evaluate.py "
        f"`{key}=<this directory>`. The prompt it was trained on: PAPER.md's FT prompt (documents, then the "
        f"question) as the user turn, rendered by the model's own chat template; the target: {trained_on}.", "",
        "## Base model", "", f"- `model`: {c['model']} (loaded from {m['model_source']})", "",
        "## Training data", "",
        f"- input: {c['input']}",
        f"- {data['rows_read']} rationale rows read; {data['examples']} trained on; {data['skipped_inconsistent']} "
        f"skipped as not consistent (`data.consistent_only={str(c['data']['consistent_only']).lower()}`); rejected: "
        f"{rejected}",
        f"- {data['num_docs']} documents per prompt; at most {c['data']['max_length']} tokens per example "
        f"({data['examples_with_documents_truncated']} examples had documents cut); {data['target_tokens']} target "
        f"tokens of {data['tokens']}", "",
        "## Settings", "",
        f"- {plan['epochs']} epochs, {plan['total_steps']} optimizer steps, global batch {o['global_batch_size']} "
        f"({o['micro_batch_size']} x {plan['grad_accum']} accumulation x {sc['num_workers']} workers)",
        f"- AdamW, learning rate {o['learning_rate']:g} (cosine, warm-up ratio {o['warmup_ratio']:g}), weight decay "
        f"{o['weight_decay']:g}, gradient clip {o['grad_clip']:g}; seed {c['seed']}",
        f"- DeepSpeed ZeRO-{ds['zero_stage']}, {'GPU' if sc['use_gpu'] else 'CPU'} workers, "
        f"{resolve_precision(ds['precision'], sc['use_gpu'])}; packing {'on' if c['data']['packing'] else 'off'}",
        f"- config fingerprint {m['config_fingerprint']} (the whole config is in the run's manifest.json)", "",
        "## Training metrics", "",
        f"- loss (mean over target tokens): {_num(m['first_loss'])} at the first logged step, "
        f"{_num(m['final_loss'])} at step {m['final_step']} of {plan['total_steps']}"
        + ("" if m["completed"] else " (stopped early by max_steps: a rerun without it continues)"),
        f"- export check: largest |logit difference| between this export and the trained engine: "
        f"{m['export_max_abs_logit_diff']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v and k != 'platform')}", "",
        "Evaluation metrics are not part of this card: jobs/evaluate.py writes them to its own output "
        "(metrics.json, report.md).", ""]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def training_dry_run(cfg: TrainConfig, finished: bool, out: Location) -> dict:
    """What run_training would run (printed): the rationale rows, the step plan, the workers; nothing is
    started or written. Examples are counted before tokenizing, so rows whose rationale alone is longer
    than data.max_length (rejected as target_too_long in a run) are still counted."""
    files = rationale_files(cfg.input)
    flags = [bool(x) for f in files for x in f.read_parquet(["consistent"]).column("consistent").to_pylist()]
    flags = flags[:cfg.data.limit] if cfg.data.limit else flags  # data.limit: the first N rows, in file order
    rows, consistent = len(flags), sum(flags)
    usable = consistent if cfg.data.consistent_only and cfg.data.target == "rationale" else rows
    o, s = cfg.optim, cfg.scaling
    p = dryrun.Plan("train")
    p.add("input", f"{cfg.input}: {len(files)} Parquet files, {rows} rationale rows, {consistent} consistent")
    p.add("model", f"{cfg.model} (chat template marks the targets)")
    steps = checkpoint_steps(out / CHECKPOINTS)
    state = ("the finished run with these settings: nothing to do" if finished else
             f"resumes from checkpoint step {max(steps)}" if steps and not cfg.overwrite else "a new run")
    p.add("output", f"{cfg.output}: {state}")
    if usable < s.num_workers:
        raise TrainingError(f"{usable} usable rationale rows in {cfg.input}; at least scaling.num_workers={s.num_workers} "
                            "are needed (data.consistent_only=true keeps only rationales that contain a gold answer)")
    plan = plan_steps(usable, s.num_workers, o.micro_batch_size, o.global_batch_size, o.epochs, o.warmup_ratio)
    p.add("steps", f"at most {plan.total_steps} ({plan.epochs} epochs x {plan.steps_per_epoch}) for at most {usable} "
                   f"examples; global batch {o.global_batch_size} = {o.micro_batch_size} x {plan.grad_accum} x "
                   f"{s.num_workers} workers")
    p.add("workers", f"{s.num_workers} x ({s.cpus_per_worker:g} CPU{' + 1 GPU' if s.use_gpu else ''}"
                     f"{' + ' + s.resources if s.resources else ''}), DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, "
                     f"{resolve_precision(cfg.deepspeed.precision, s.use_gpu)}")
    p.add("ray", dryrun.ray_target(cfg.ray_address))
    return p.show()


def checkpoint_steps(directory: Location) -> list[int]:
    return [int(d.name[5:]) for d in directory.subdirs() if d.name.startswith("step_") and d.name[5:].isdigit()]


def read_metrics(path) -> list[dict]:
    p = location(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _print_examples(s: dict, cfg: TrainConfig) -> None:
    log(f"{s['rows_read']} rationale rows: {s['examples']} examples "
        f"({s['tokens']} tokens, {s['target_tokens']} with loss; longest {s['max_example_tokens']}, "
        f"mean {s['mean_example_tokens']}; built in {s['seconds']:.0f}s)")
    if s["skipped_inconsistent"]:
        log(f"  {s['skipped_inconsistent']} rows not used: rationale without a gold answer "
            "(data.consistent_only=true)")
    for reason, n in s["rejected"].items():
        log(f"  {n} rows rejected: {reason} (see {location(cfg.output) / REJECTED})")
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
