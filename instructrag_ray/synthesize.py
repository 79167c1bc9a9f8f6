"""Rationale synthesis (InstructRAG step 1) as one Ray Data chain.

    read -> parse/validate -> select (resume, duplicates, limit) -> retrieve -> prompt -> generate
         -> check -> write

Every stage is a function or a callable class taking and returning a pyarrow batch (see batches.py);
`run_synthesis` wires them with the resources from the config and reports progress as batches land.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa

from . import prompts, read, write
from .answers import has_answer
from .batches import add_columns, follow, ok_rows, reject, require, select_rows
from .cli import init_ray
from .config import SynthesizeConfig, parse_resources, to_dict
from .generate import GenerateStage
from .generate_vllm import vllm_generate
from .tiny_model import ModelError, load_chat_tokenizer, resolve_model

# Stateless stages are light; asking for little CPU leaves room for the actor pools on small nodes
# (an actor pool that takes every CPU starves the read/map tasks and the job hangs silently).
TASK_CPUS = 0.1


def log(message: str) -> None:
    print(f"[synthesize] {message}", flush=True)


# --- stages ------------------------------------------------------------------------------------


class RetrieveStage:
    """Stage `retrieve` (actor; the index is opened, or the Elasticsearch client made, once): reads
    question, ctxs; fills ctxs and ctxs_source='retrieved' for rows without ctxs. Rows that arrived
    with ctxs pass untouched; a failed or empty search rejects only its row (stage retrieve); a
    cluster that stops answering stops the job (elastic.ClusterUnavailable) so that a rerun resumes
    those rows instead of rejecting them."""

    def __init__(self, backend: str, index_path: str, fields: str, top_k: int, **es_options):
        from .retrieve import make_retriever

        self.retriever = make_retriever(backend, index_path=index_path, fields=fields, **es_options)
        self.top_k = top_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .retrieve import QueryFailure

        require(batch, "retrieve", "question", "ctxs")
        rows = batch.to_pylist()
        todo = [i for i in ok_rows(rows) if rows[i]["ctxs"] is None]
        results = self.retriever.batch_search([rows[i]["question"] for i in todo], self.top_k) if todo else []
        for i, hits in zip(todo, results):
            if isinstance(hits, QueryFailure):
                reject(rows[i], "retrieve", "search_failed", hits.reason)
            elif not hits:
                reject(rows[i], "retrieve", "no_documents",
                       "the search returned no document (no question term occurs in the index)")
            else:
                rows[i]["ctxs"] = [{"id": h.id, "title": h.title, "text": h.text, "score": h.score} for h in hits]
                rows[i]["ctxs_source"] = "retrieved"
        return pa.Table.from_pylist(rows, schema=batch.schema)


class PromptStage:
    """Stage `prompt` (actor; the tokenizer is loaded once): reads question, answers, dataset, ctxs;
    adds prompt, prompt_tokens, truncated_tokens (PAPER.md's synthesis prompt, chat-template rendered,
    documents cut from the left to fit max_model_len - max_new_tokens)."""

    def __init__(self, model: str, num_docs: int, max_model_len: int, max_new_tokens: int):
        from transformers import AutoTokenizer

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.num_docs = num_docs
        self.budget = resolve_max_model_len(path, max_model_len) - max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, "prompt", "question", "answers", "dataset", "ctxs")
        rows = batch.to_pylist()
        texts, tokens, cut = [None] * len(rows), [None] * len(rows), [None] * len(rows)
        for i in ok_rows(rows):
            row = rows[i]
            docs = prompts.order_docs(row["ctxs"], self.num_docs)
            parts = prompts.synthesis_parts(row["question"], row["answers"], row["dataset"], docs)
            try:
                rendered = prompts.render(self.tokenizer, parts, self.budget)
            except prompts.PromptTooLong as e:
                reject(row, "prompt", "prompt_too_long", str(e))
                continue
            texts[i], tokens[i], cut[i] = rendered.text, rendered.tokens, rendered.truncated_tokens
        return add_columns(batch, rows, {"prompt": texts, "prompt_tokens": tokens, "truncated_tokens": cut})


def resolve_max_model_len(model_path: str, max_model_len: int) -> int:
    """The configured context budget, else the model's own (max_position_embeddings)."""
    if max_model_len:
        return max_model_len
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 4096))


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


def plan_rows(parsed, existing: write.ExistingOutput, limit: int) -> Plan:
    """One pass over the parsed ids (input order) to find duplicates, the limit, and resumed rows."""
    import ray

    refs = parsed.select_columns(["id", "source", "line", "ctxs_source", "reject_stage"]).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    rows = pa.concat_tables(tables).sort_by([("source", "ascending"), ("line", "ascending")]).to_pylist() if tables else []
    keep: set | None = set() if limit else None
    seen, duplicates = set(), {}
    considered = rows[:limit] if limit else rows
    skipped = need = 0
    for row in considered:
        position = (row["source"], row["line"])
        if keep is not None:
            keep.add(position)
        if row["id"] in seen:
            duplicates[position] = row["id"] in existing.duplicate_ids
            skipped += duplicates[position]
        else:
            seen.add(row["id"])
            done = row["id"] in existing.ids
            skipped += done
            need += not done and row["reject_stage"] is None and row["ctxs_source"] is None
    kept = len(considered)
    return Plan(total=kept, todo=kept - skipped, skipped=skipped, duplicates=duplicates, keep=keep,
                need_retrieval=need)


def custom_resources(spec: str) -> dict:
    """Ray remote args for a 'name:amount,...' spec: {} when empty (Ray rejects resources=None on some paths)."""
    resources = parse_resources(spec)
    return {"resources": resources} if resources else {}


def run_synthesis(cfg: SynthesizeConfig) -> dict:
    """Run the whole synthesis job; returns the manifest (also written to <output>/manifest.json)."""
    import ray

    started = time.time()
    fingerprint = cfg.fingerprint()
    existing = write.prepare_output(cfg.output, fingerprint, cfg.overwrite)
    # Fail early on a model that does not load (the prompt stage needs its tokenizer and chat template,
    # even for the template baseline); this also builds the tiny model once on the driver's node.
    _check_model(cfg.generation.model)
    init_ray(cfg.ray_address)

    dataset = read.default_dataset(cfg.input, cfg.dataset)
    log(f"reading {cfg.input} (dataset name for rows without one: {dataset})")
    parsed = read.read_raw(cfg.input, block_rows=cfg.generation.batch_size).map_batches(
        read.parse_batch, batch_format="pyarrow", fn_kwargs={"dataset": dataset}, num_cpus=TASK_CPUS)

    plan = plan_rows(parsed, existing, cfg.limit)
    log(f"{plan.total} input rows: {plan.skipped} already in {cfg.output} (resumed), {plan.todo} to process")
    if existing.retry_ids:
        n = len(existing.retry_ids)
        log(f"{n} row{'s' if n != 1 else ''} rejected by an earlier run for a passing failure (a model server or "
            "search cluster error) will be tried again")
    if plan.need_retrieval and cfg.retrieval.backend == "tantivy" and not cfg.retrieval.index_path:
        raise SystemExit(
            f"error: {plan.need_retrieval} rows have no ctxs and retrieval.index_path is not set; build an index "
            "with jobs/build_index.py and pass retrieval.index_path=DIR, or give rows pre-retrieved ctxs")
    if plan.need_retrieval and cfg.retrieval.backend == "elasticsearch":
        from .elastic import ClusterError, check_search_index

        try:  # reachable, TLS, credentials, client/server versions, index and mapping: one line each
            check_search_index(cfg.retrieval.es_cluster(), cfg.retrieval.es_index, cfg.retrieval.fields)
        except ClusterError as e:
            raise SystemExit(f"error: {e}") from None

    g, r = cfg.generation, cfg.retrieval
    ds = parsed.map_batches(
        select_rows, batch_format="pyarrow", num_cpus=TASK_CPUS,
        fn_kwargs={"skip_ref": ray.put(existing.ids), "duplicate_ref": ray.put(plan.duplicates),
                   "keep_ref": ray.put(plan.keep) if plan.keep is not None else None})
    if plan.need_retrieval:
        ds = ds.map_batches(
            RetrieveStage, batch_format="pyarrow", batch_size=r.batch_size, num_cpus=r.num_cpus,
            **custom_resources(r.resources),
            compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
            fn_constructor_kwargs={"top_k": r.top_k, **r.retriever_options()})
    ds = ds.map_batches(
        PromptStage, batch_format="pyarrow", batch_size=g.batch_size, num_cpus=cfg.prompt.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.prompt.max_actors),
        fn_constructor_kwargs={"model": g.model, "num_docs": cfg.prompt.num_docs, "max_model_len": g.max_model_len,
                               "max_new_tokens": g.max_new_tokens})
    if g.engine == "vllm":  # ray.data.llm's processor is itself a chain of stages: it takes GenerateStage's place
        ds = vllm_generate(ds, **g.vllm_options())
    else:
        ds = ds.map_batches(
            GenerateStage, batch_format="pyarrow", batch_size=g.batch_size, num_cpus=g.num_cpus,
            num_gpus=g.num_gpus if g.engine == "transformers" else 0, **custom_resources(g.resources),
            compute=ray.data.ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors),
            fn_constructor_kwargs={"num_docs": cfg.prompt.num_docs, **g.engine_options()})
    ds = ds.map_batches(check_batch, batch_format="pyarrow", fn_kwargs={"num_docs": cfg.prompt.num_docs},
                        num_cpus=TASK_CPUS)
    stats = ds.map_batches(write.write_batch, batch_format="pyarrow", num_cpus=TASK_CPUS,
                           fn_kwargs={"output": cfg.output, "fingerprint": fingerprint})

    run = _follow(stats, plan.todo, cfg.progress_interval_s)
    wall = time.time() - started
    totals = write.output_totals(cfg.output)
    manifest = {
        "job": "synthesize",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
        "config_fingerprint": fingerprint,
        "versions": package_versions(),
        "input_rows": plan.total,
        "this_run": {**run, "resumed_rows_skipped": plan.skipped, "wall_time_s": round(wall, 2),
                     "rows_per_s": round((run["written"] + run["rejected"]) / wall, 3) if wall else None,
                     "completion_tokens_per_s": round(run["completion_tokens"] / wall, 2) if wall else None},
        "totals": totals,
        "outputs": {"rationales": os.path.join(cfg.output, write.RATIONALES),
                    "rejected": os.path.join(cfg.output, write.REJECTED)},
    }
    write.write_manifest(cfg.output, manifest)
    _summary(manifest)
    return manifest


def _check_model(model: str) -> None:
    try:
        load_chat_tokenizer("generation.model", model)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None


def _follow(stats, todo: int, interval: float) -> dict:
    """Drive the pipeline, printing progress every `interval` seconds; returns this run's counts."""
    def progress(run: dict, elapsed: float) -> None:
        done = run["written"] + run["rejected"]
        rate = done / elapsed
        eta = f", ETA {(todo - done) / rate:.0f}s" if rate and todo > done else ""
        log(f"{done}/{todo} rows ({run['written']} written, {run['rejected']} rejected), "
            f"{rate:.2f} rows/s, {run['completion_tokens'] / elapsed:.1f} tokens/s{eta}")

    return follow(stats, ("written", "rejected", "consistent", "prompt_tokens", "completion_tokens"), interval,
                  progress)


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
    print(f"  manifest            {os.path.join(m['config']['output'], write.MANIFEST)}", flush=True)


@lru_cache(maxsize=1)
def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": sys.platform}
    for name in ("instructrag-ray", "ray", "torch", "transformers", "pyarrow", "tantivy", "elasticsearch",
                 "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
