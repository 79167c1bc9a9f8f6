"""Rationale synthesis (InstructRAG step 1) as one Ray Data chain.

    read -> parse/validate -> select (resume, duplicates, limit) -> retrieve -> prompt -> generate
         -> check -> write

Every stage is a function or a callable class taking and returning a pyarrow batch (see rows.py);
`run_synthesis` wires them with the resources from the config and reports progress as blocks land
(`block_rows`: a block is at least one generation batch and at most 512 rows).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from . import dryrun, output, prompts, read
from .answers import has_answer
from .cli import cluster_cpus, init_ray
from .config import SynthesizeConfig
from .console import Progress
from .errors import InputError
from .generation.stage import check_engine, generate
from .models import load_chat_tokenizer, resolve_max_model_len, resolve_model
from .progress import follow
from .retrieval.stage import check_retrieval, index_fingerprint, retrieve
from .rows import TASK_CPUS, add_columns, ok_rows, reblock, reject, require, select_rows
from .storage import check_location, location


def log(message: str) -> None:
    print(f"[synthesize] {message}", flush=True)


# --- stages ------------------------------------------------------------------------------------


class PromptStage:
    """Stage `prompt` (actor; the tokenizer is loaded once): reads question, answers, dataset, ctxs;
    adds prompt, prompt_tokens, truncated_tokens (PAPER.md's synthesis prompt, chat-template rendered,
    documents cut from the left to fit max_model_len - max_new_tokens)."""

    def __init__(self, model: str, num_docs: int, max_model_len: int, max_new_tokens: int):
        from transformers import AutoTokenizer

        path = resolve_model(model)
        self.renderer = prompts.Renderer(AutoTokenizer.from_pretrained(path))
        self.num_docs = num_docs
        self.budget = resolve_max_model_len(path, max_model_len) - max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, "prompt", "question", "answers", "dataset", "ctxs")
        rows = batch.to_pylist()
        todo = ok_rows(rows)
        parts = [prompts.synthesis_parts(rows[i]["question"], rows[i]["answers"], rows[i]["dataset"],
                                         prompts.order_docs(rows[i]["ctxs"], self.num_docs)) for i in todo]
        texts, tokens, cut = [None] * len(rows), [None] * len(rows), [None] * len(rows)
        for i, rendered in zip(todo, self.renderer.render_many(parts, self.budget)):
            if isinstance(rendered, prompts.PromptTooLong):
                reject(rows[i], "prompt", "prompt_too_long", str(rendered))
            else:
                texts[i], tokens[i], cut[i] = rendered.text, rendered.tokens, rendered.truncated_tokens
        return add_columns(batch, rows, {"prompt": texts, "prompt_tokens": tokens, "truncated_tokens": cut})


def check_batch(batch: pa.Table, num_docs: int) -> pa.Table:
    """Stage `check`: reads rationale, answers, ctxs; adds consistent (a gold answer occurs in the
    rationale, PAPER.md's rule) and answer_in_docs (a gold answer occurs in a prompt document)."""
    require(batch, "check", "rationale", "answers", "ctxs")
    rows = batch.to_pylist()
    consistent, in_docs = [None] * len(rows), [None] * len(rows)
    for i in ok_rows(rows):
        row = rows[i]
        consistent[i] = has_answer(row["rationale"], row["answers"])
        in_docs[i] = any(has_answer(d["text"], row["answers"]) for d in prompts.order_docs(row["ctxs"], num_docs))
    return add_columns(batch, rows, {"consistent": consistent, "answer_in_docs": in_docs})


# --- the job -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the id pass found: which rows this run processes."""

    total: int
    todo: int
    skipped: int
    duplicates: dict  # (source, line) of every extra copy of an id -> already rejected by an earlier run
    keep: set | None
    need_retrieval: int


def plan_rows(parsed, existing: output.ExistingOutput, limit: int) -> Plan:
    """One pass over the parsed ids (on Ray) to find duplicates, the limit, and resumed rows; only the
    id columns reach the driver."""
    import ray

    refs = parsed.select_columns(list(PLAN_COLUMNS)).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    rows = pa.concat_tables(tables).sort_by([("source", "ascending"), ("line", "ascending")]).to_pylist() if tables else []
    return plan_from_rows(rows, existing, limit)


PLAN_COLUMNS = ("id", "source", "line", "ctxs_source", "reject_stage")


def plan_from_rows(rows: list[dict], existing: output.ExistingOutput, limit: int) -> Plan:
    """The plan from the parsed rows' PLAN_COLUMNS in input order (from Ray, or parsed on the driver)."""
    keep: set | None = set() if limit else None
    copies: Counter = Counter()
    duplicates = {}
    considered = rows[:limit] if limit else rows
    skipped = need = 0
    for row in considered:
        position = (row["source"], row["line"])
        if keep is not None:
            keep.add(position)
        copies[row["id"]] += 1
        if copies[row["id"]] > 1:
            duplicates[position] = copies[row["id"]] - 1 <= existing.duplicate_counts[row["id"]]
            skipped += duplicates[position]
        else:
            done = row["id"] in existing.ids
            skipped += done
            need += not done and row["reject_stage"] is None and row["ctxs_source"] is None
    kept = len(considered)
    return Plan(total=kept, todo=kept - skipped, skipped=skipped, duplicates=duplicates, keep=keep,
                need_retrieval=need)


def run_synthesis(cfg: SynthesizeConfig, dry_run: bool = False) -> dict:
    """Run the whole synthesis job; returns the manifest (also written to <output>/manifest.json). With
    `dry_run`, run every check and return what would run, without starting Ray.

    Every check runs before anything is written or deleted (overwrite=true included) and, but for those
    that need the rows, before Ray starts: input, output, model, index; then the id pass (on the cluster)
    and the checks that need it; then the output is prepared and the chain runs."""
    started = time.time()
    out, index_fp = check_synthesis(cfg)
    fingerprint = cfg.fingerprint(index_fp)
    scanned = output.scan_output(out, repair=not dry_run)
    output.refuse_other_settings(out, scanned, fingerprint, cfg.shaping(index_fp), cfg.overwrite)
    existing = output.ExistingOutput() if cfg.overwrite else scanned  # what a run resumes from
    dataset = read.default_dataset(cfg.input, cfg.dataset)
    # A dry run, or a run on a small input, plans from the input parsed here: no Ray pass just to plan,
    # and a rerun with nothing left to do ends in seconds, without Ray. A large input is only ever read on
    # the cluster (once to plan, from its id columns, and once to run).
    plan = None
    if dry_run or read.input_bytes(cfg.input) <= DRIVER_PLAN_BYTES:
        plan = plan_from_rows(dryrun.parsed_rows(cfg.input, dataset, list(PLAN_COLUMNS)), existing, cfg.limit)
        check_plan(cfg, plan)
        if dry_run:
            return synthesis_dry_run(cfg, plan, existing, dataset)
        if not plan.todo and not existing.retry_ids:
            return finish_synthesis(cfg, out, fingerprint, plan, existing, started, None)
    init_ray(cfg.ray_address, cpus_for(cfg, plan.todo if plan else None), verbose=cfg.verbose)

    log(f"reading {cfg.input} (dataset name for rows without one: {dataset})")
    parsed = read.read_parsed(cfg.input, dataset, TASK_CPUS)
    if plan is None:
        plan = plan_rows(parsed, existing, cfg.limit)
        check_plan(cfg, plan)
    # with overwrite=true this deletes the old output (every check above has passed)
    existing = output.prepare_output(out, scanned, fingerprint, cfg.shaping(index_fp), cfg.overwrite)
    return finish_synthesis(cfg, out, fingerprint, plan, existing, started, parsed)


def block_rows(todo: int, batch_size: int) -> int:
    """Rows per block from the select stage on: every block is a Ray task per stage and a trip through
    the object store, so large blocks cost less per row; yet there must be enough of them (BLOCKS_PER_RUN)
    to spread over the actor pools, and a block is also the unit that is written, committed and counted
    by the progress display, so it stays at most MAX_BLOCK_ROWS (a GPU engine writing 80 rows/s commits
    every 6 s). Never less than one generation batch."""
    return max(batch_size, min(MAX_BLOCK_ROWS, -(-todo // BLOCKS_PER_RUN)))


BLOCKS_PER_RUN = 16
MAX_BLOCK_ROWS = 512


# A run plans on the driver when the input is at most this big (parsing 16 MiB of JSON lines here takes a
# few seconds); larger inputs are read by Ray.
DRIVER_PLAN_BYTES = 16 << 20


def check_plan(cfg: SynthesizeConfig, plan: Plan) -> None:
    """The checks that need the rows: there are some, and those without ctxs have an index to search."""
    if not plan.total:
        raise InputError(f"input {cfg.input} holds no rows (every line is blank); pass a QA file with records")
    check_retrieval(cfg.retrieval, plan.need_retrieval)


def finish_synthesis(cfg: SynthesizeConfig, out, fingerprint: str, plan: Plan, existing: output.ExistingOutput,
                     started: float, parsed) -> dict:
    """Run the chain on `parsed` (None: nothing to do), compact and complete the output, write the
    manifest, print the summary."""
    log(f"{plan.total} input rows: {plan.skipped} already in {cfg.output} (resumed), {plan.todo} to process")
    if existing.retry_ids:
        n = len(existing.retry_ids)
        log(f"{n} row{'s' if n != 1 else ''} rejected by an earlier run for a passing failure (a model server or "
            "search cluster error) will be tried again")
    if existing.removed_duplicates:
        log(f"removed {existing.removed_duplicates} rows committed twice (the first copy of each id is kept)")
    merged = 0
    if parsed is None:
        run = {**dict.fromkeys(COUNTERS, 0), "reject_reasons": {}}
    else:
        run_ = output.new_run(out)
        output.discard_staging(out)
        commit = output.Committer(run_)
        run = _follow(synthesis_chain(parsed, cfg, plan, existing, fingerprint, run_), plan.todo,
                      cfg.progress_interval_s, commit)
        commit.finish()
        merged = output.compact(out, [output.RATIONALES, output.REJECTED], cfg.rows_per_file)
    output.ensure_tables(out, {output.RATIONALES: "rationales", output.REJECTED: "rejected"})
    output.write_card(out, [output.RATIONALES, output.REJECTED], output.RATIONALES, CARD)
    manifest = synthesis_manifest(cfg, fingerprint, plan, {**run, "files_merged": merged}, time.time() - started)
    output.write_manifest(out, manifest)
    _summary(manifest)
    return manifest


def cpus_for(cfg: SynthesizeConfig, todo: int | None) -> float:
    """Logical CPUs a local Ray needs so that every actor pool starts and the tasks between them still
    run (reblock's tasks take a whole CPU): they share the machine's cores. `todo`: the rows to process
    (None: not known yet)."""
    g, r = cfg.generation, cfg.retrieval
    prompt_actors = cfg.prompt.pool(os.cpu_count() or 1, MAX_ROWS if todo is None else todo)[0]
    return g.num_cpus * g.min_actors + r.num_cpus * r.min_actors + cfg.prompt.num_cpus * prompt_actors + 1 + 3 * TASK_CPUS


MAX_ROWS = 1 << 62


def check_synthesis(cfg: SynthesizeConfig):
    """The checks that need no Ray: the input exists and holds QA files, the output is writable, the model
    loads with a chat template, a configured index is there. Returns (output location, index fingerprint)."""
    inp, out = location(cfg.input, "input"), location(cfg.output, "output")
    check_location(inp, "input", hint="pass --input with a QA file or directory")
    read.raw_tasks(inp)  # a directory without QA files fails here
    check_location(out, "output", write=True)
    # the prompt stage needs the tokenizer and chat template, even for the template baseline; this also
    # builds the tiny model once on the driver's node
    g = cfg.generation
    load_chat_tokenizer("generation.tokenizer" if g.tokenizer else "generation.model", g.prompt_model(g.model))
    check_engine(g, "generation.model", g.model)
    return out, index_fingerprint(cfg.retrieval)


def synthesis_dry_run(cfg: SynthesizeConfig, plan: Plan, existing: output.ExistingOutput, dataset: str) -> dict:
    """What run_synthesis would run (printed); nothing is started or written."""
    g = cfg.generation
    stages = ["read", "validate", "select"] + (["retrieve"] if plan.need_retrieval else []) + [
        "prompt", "generate", "check", "write"]
    retry = f"; {len(existing.retry_ids)} earlier rejects tried again" if existing.retry_ids else ""
    p = dryrun.Plan("synthesize")
    p.add("input", f"{cfg.input}: {plan.total} rows{f' (limit={cfg.limit})' if cfg.limit else ''}, dataset name "
                   f"for rows without one: {dataset}")
    p.add("output", f"{cfg.output}: {plan.skipped} rows already written (resumed), {plan.todo} to process{retry}")
    if not plan.todo and not existing.retry_ids:
        return p.add("stages", "none: every row is in the output already (a run would only rewrite the "
                               "manifest, without starting Ray)").show()
    p.add("stages", " -> ".join(stages))
    if plan.need_retrieval:
        p.add("retrieve", dryrun.retrieval_stage(cfg.retrieval, plan.need_retrieval))
    p.add("prompt", f"{cfg.prompt.num_docs} documents, {dryrun.prompt_pool(cfg.prompt, cfg.ray_address, plan.todo)}")
    p.add("generate", dryrun.generation_stage(g, g.model) + f", at most {g.max_new_tokens} new tokens")
    p.add("ray", dryrun.ray_target(cfg.ray_address, cpus_for(cfg, plan.todo)))
    return p.show()


def synthesis_chain(parsed, cfg: SynthesizeConfig, plan: Plan, existing: output.ExistingOutput, fingerprint: str,
                    run: output.Run):
    """select -> retrieve -> prompt -> generate -> check -> write, with the resources of the config."""
    import ray

    g = cfg.generation
    ds = parsed.map_batches(
        select_rows, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
        fn_kwargs={"skip_ref": ray.put(existing.ids), "duplicate_ref": ray.put(plan.duplicates),
                   "keep_ref": ray.put(plan.keep) if plan.keep is not None else None})
    # the read's rows come as one block per read task: cut into blocks that spread over the actor pools
    ds = reblock(ds, block_rows(plan.todo, g.batch_size))
    if plan.need_retrieval:
        ds = retrieve(ds, cfg.retrieval)  # in retrieval.batch_size batches (one msearch each)
    low, high = cfg.prompt.pool(cluster_cpus(), plan.todo)
    ds = ds.map_batches(
        PromptStage, batch_format="pyarrow", batch_size=None, num_cpus=cfg.prompt.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        fn_constructor_kwargs={"model": g.prompt_model(g.model), "num_docs": cfg.prompt.num_docs, "max_model_len": g.max_model_len,
                               "max_new_tokens": g.max_new_tokens})
    ds = generate(ds, g, g.model, cfg.prompt.num_docs)  # in generation.batch_size batches, a block a task
    ds = ds.map_batches(check_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"num_docs": cfg.prompt.num_docs}, num_cpus=TASK_CPUS)
    return ds.map_batches(output.write_batch, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
                          fn_kwargs={"run": run, "fingerprint": fingerprint})


def synthesis_manifest(cfg: SynthesizeConfig, fingerprint: str, plan: Plan, run: dict, wall: float) -> dict:
    done = run["written"] + run["rejected"]
    return {
        **output.manifest_header("synthesize", cfg),
        "config_fingerprint": fingerprint,
        "input_rows": plan.total,
        "this_run": {**run, "resumed_rows_skipped": plan.skipped, "wall_time_s": round(wall, 2),
                     "rows_per_s": round(done / wall, 3) if wall else None,
                     "completion_tokens_per_s": round(run["completion_tokens"] / wall, 2) if wall else None},
        "totals": output.output_totals(location(cfg.output)),
        "outputs": {"rationales": str(location(cfg.output) / output.RATIONALES),
                    "rejected": str(location(cfg.output) / output.REJECTED)},
    }


COUNTERS = ("written", "rejected", "consistent", "prompt_tokens", "completion_tokens")


def _follow(stats, todo: int, interval: float, commit) -> dict:
    """Drive the pipeline with a progress display (rows, rate, ETA, rejects), committing each batch's files
    as they land; returns this run's counts."""
    display = Progress("synthesize", todo, "rows", interval=interval)

    def counts(run: dict) -> tuple[int, int, str]:
        elapsed = max(1e-9, time.time() - display.started)
        return run["written"] + run["rejected"], run["rejected"], f"{run['completion_tokens'] / elapsed:.1f} tokens/s"

    return follow(stats, COUNTERS, display, counts, commit)


CARD = ("Rationales written by instructrag-ray's synthesis job (InstructRAG, ICLR 2025): `rationales/` holds one "
        "row per question with its documents, prompt and rationale (schemas/rationales.json); `rejected/` the rows "
        "that could not be used, with the stage and reason (schemas/rejected.json). `manifest.json` records the run.")


def _summary(m: dict) -> None:
    run, totals = m["this_run"], m["totals"]
    log("done")
    print(f"  input rows          {m['input_rows']}  (resumed, skipped: {run['resumed_rows_skipped']})")
    print(f"  this run            {run['written']} rationales, {run['rejected']} rejected "
          f"in {run['wall_time_s']}s ({run['rows_per_s']} rows/s, {run['completion_tokens_per_s']} tokens/s)")
    for reason, n in run["reject_reasons"].items():
        print(f"    rejected {reason:<28} {n}")
    cons = totals["consistency"]
    print(f"  output totals       {totals['rationales']} rationales, {totals['rejected']} rejected; consistency "
          f"{'n/a' if cons is None else f'{cons:.1%}'}")
    print(f"  rationales          {m['outputs']['rationales']}")
    print(f"  rejected            {m['outputs']['rejected']}")
    print(f"  manifest            {location(m['config']['output']) / output.MANIFEST}", flush=True)


if __name__ == "__main__":  # python -m instructrag_ray.synthesize: the same as jobs/synthesize.py
    from .cli import job_main

    job_main("synthesize", prog="python -m instructrag_ray.synthesize")
