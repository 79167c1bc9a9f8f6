"""Evaluation (InstructRAG-ICL and InstructRAG-FT against baselines) as one Ray Data chain.

    read -> parse/validate -> select (limit, duplicates, resume) -> retrieve (once, shared by every method)
         -> for each model: prompt (one row per method) -> generate -> score
         -> union -> write predictions/ + rejected/ -> metrics.json, report.md, report.png, manifest.json

Methods and the model each uses (`generation.model` is the base model; `ft_model` the fine-tuned one;
`sft_model` the vanilla SFT baseline, jobs/train.py with data.target=answer):

| method            | model    | prompt                                                                     |
|-------------------|----------|----------------------------------------------------------------------------|
| `instructrag-ft`  | ft_model | PAPER.md's FT prompt: documents + question                                  |
| `vanilla-sft`     | sft_model | the FT prompt (the model was trained on it with the gold answer as target)  |
| `instructrag-icl` | base     | PAPER.md's ICL prompt: N (question, rationale) demonstrations, documents, question |
| `vanilla-rag`     | base     | the FT prompt's wording (documents + question), no demonstrations           |
| `icl-qa`          | base     | the ICL prompt with each demonstration's short answer in place of its rationale |
| `no-retrieval`    | base     | NO_RETRIEVAL_QUESTION: the question alone                                   |

Retrieval runs once; when two models are in play the retrieved rows are materialised (Ray's object
store, spilling to disk) and each model's branch reads them. Each model gets one prompt stage, which
emits one row per (QA row, method), and one generation stage wired as in synthesis (`generate`:
transformers or openai engines in GenerateStage, or vLLM's ray.data.llm chain). The template
baseline is refused: it reads the gold answers.

Demonstrations are drawn once per dataset, reproducibly (seeded), from consistent rationales only,
never from a test id or a test question (demos.py).

Outputs (`<output>/`): predictions/*.parquet (schemas/predictions.json), rejected/*.parquet
(schemas/rejected.json; a per-method reject's detail starts with "method <name>: "), metrics.json,
report.md, report.png, and manifest.json written last. A rerun resumes: (id, method) pairs already in
predictions/ are skipped; rejected/ and the reports are rebuilt.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from . import dryrun, output, prompts, read, schemas
from .answers import has_answer
from .cli import cluster_cpus, init_ray
from .config import ICL_METHODS, EvaluateConfig, fingerprint
from .console import Progress
from .demos import load_demo_pool, select_demos
from .errors import InputError, OutputConflict
from .generation.stage import check_engine, generate
from .metrics import compute_metrics, markdown_report, plot_report, score_prediction
from .models import check_weights, load_chat_tokenizer, resolve_max_model_len, resolve_model
from .progress import follow
from .retrieval.stage import check_retrieval, retrieve
from .rows import TASK_CPUS, cached_get, ok_rows, reblock, reject, require, select_rows
from .storage import Location, check_location, location

FT, SFT, ICL, VANILLA, ICL_QA, NO_RETRIEVAL = ("instructrag-ft", "vanilla-sft", "instructrag-icl", "vanilla-rag", "icl-qa",
                                             "no-retrieval")
# Report order: the two InstructRAG methods first, then the baselines.
METHOD_ORDER = (FT, SFT, ICL, VANILLA, ICL_QA, NO_RETRIEVAL)

# --- wording that is ours, not the paper's (the reference code has no baselines) -----------------------
# vanilla-rag reuses PAPER.md's FT prompt (prompts.ft_parts) unchanged, and icl-qa the ICL prompt
# (prompts.icl_parts) with short answers in place of rationales. no-retrieval drops the documents, so
# the FT instruction loses "and the provided information".
NO_RETRIEVAL_QUESTION = "Based on your knowledge, answer the question:\n{question}"

PREDICTIONS, REJECTED, METRICS, REPORT_MD, REPORT_PNG = "predictions", "rejected", "metrics.json", "report.md", "report.png"
MANIFEST = "manifest.json"


def log(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


# --- prompts per method ----------------------------------------------------------------------------


def method_parts(method: str, question: str, docs: list[dict], demos: list[dict]) -> prompts.PromptParts:
    """The user turn of `method` for one question; demos are {question, rationale, answer}."""
    if method in (FT, SFT, VANILLA):
        return prompts.ft_parts(question, docs)
    if method == ICL:
        return prompts.icl_parts(question, docs, [{"question": d["question"], "rationale": d["rationale"]} for d in demos])
    if method == ICL_QA:
        return prompts.icl_parts(question, docs, [{"question": d["question"], "rationale": d["answer"]} for d in demos])
    if method == NO_RETRIEVAL:
        return prompts.PromptParts("", "", NO_RETRIEVAL_QUESTION.format(question=prompts.normalize_question(question)))
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHOD_ORDER)}")


# --- stages ------------------------------------------------------------------------------------------

def _field(column: str) -> pa.Field:
    return schemas.field("predictions", column).with_nullable(True).remove_metadata()


PROMPT_COLUMNS = ("method", "doc_ids", "answer_in_docs", "demo_ids", "prompt", "prompt_tokens", "truncated_tokens")


class PromptStage:
    """Stage `prompt` (actor; the model's tokenizer is loaded once): reads id, question, dataset, answers,
    ctxs, ctxs_source. Emits one row per method of this model, adding method, doc_ids, answer_in_docs,
    demo_ids, prompt, prompt_tokens, truncated_tokens (chat-template rendered; documents cut from the
    left to fit max_model_len - max_new_tokens). Skips (id, method) pairs already written. A row
    rejected upstream passes once (only where carry_rejects), and a row whose retrieval failed still
    gets its no-retrieval prompt."""

    def __init__(self, model: str, methods: list[str], demos: dict[str, list[dict]], num_docs: int,
                 max_model_len: int, max_new_tokens: int, done_ref, carry_rejects: bool):
        from transformers import AutoTokenizer

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.methods, self.demos, self.num_docs = methods, demos, num_docs
        self.budget = resolve_max_model_len(path, max_model_len) - max_new_tokens
        self.done_ref, self.carry_rejects = done_ref, carry_rejects

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, "prompt", "id", "question", "dataset", "answers", "ctxs", "ctxs_source")
        done = cached_get(self.done_ref) or set()
        schema = batch.schema
        for name in PROMPT_COLUMNS:
            schema = schema.append(_field(name))
        empty = dict.fromkeys(PROMPT_COLUMNS)
        out = []
        for row in batch.to_pylist():
            methods = self.methods
            if row["reject_stage"] is not None:
                if self.carry_rejects:
                    out.append({**row, **empty})
                if row["reject_stage"] != "retrieve" or NO_RETRIEVAL not in self.methods:
                    continue
                row = {**row, "reject_stage": None, "reject_reason": None, "reject_detail": None, "ctxs": None,
                       "ctxs_source": None}
                methods = [NO_RETRIEVAL]
            for method in methods:
                if (row["id"], method) not in done:
                    out.append(self._one(row, method))
        return pa.Table.from_pylist(out, schema=schema)

    def _one(self, row: dict, method: str) -> dict:
        docs = [] if method == NO_RETRIEVAL else prompts.order_docs(row["ctxs"], self.num_docs)
        demos = self.demos.get(row["dataset"], []) if method in ICL_METHODS else []
        new = {
            "method": method,
            "ctxs_source": None if method == NO_RETRIEVAL else row["ctxs_source"],
            "doc_ids": None if method == NO_RETRIEVAL else [d["id"] for d in docs],
            "answer_in_docs": None if method == NO_RETRIEVAL else any(has_answer(d["text"], row["answers"]) for d in docs),
            "demo_ids": [d["id"] for d in demos] if method in ICL_METHODS else None,
        }
        out = {**row, **new, "prompt": None, "prompt_tokens": None, "truncated_tokens": None}
        try:
            rendered = prompts.render(self.tokenizer, method_parts(method, row["question"], docs, demos), self.budget)
        except prompts.PromptTooLong as e:
            reject(out, "prompt", "prompt_too_long", f"method {method}: {e}")
            return out
        out.update(prompt=rendered.text, prompt_tokens=rendered.tokens, truncated_tokens=rendered.truncated_tokens)
        return out


def score_batch(batch: pa.Table) -> pa.Table:
    """Stage `score`: reads rationale (the model's reply), answers, qa_pairs; adds prediction, correct
    (PAPER.md's accuracy rule) and str_em (ASQA, null without qa_pairs)."""
    require(batch, "score", "rationale", "answers", "qa_pairs")
    rows = batch.to_pylist()
    prediction, correct, em = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    for i in ok_rows(rows):
        r = rows[i]
        prediction[i] = r["rationale"]
        correct[i], em[i] = score_prediction(r["rationale"], r["answers"], r["qa_pairs"])
    schema = batch.schema
    for name in ("prediction", "correct", "str_em"):
        schema = schema.append(_field(name))
    return pa.Table.from_pylist([{**r, "prediction": prediction[i], "correct": correct[i], "str_em": em[i]}
                                 for i, r in enumerate(rows)], schema=schema)


def write_batch(batch: pa.Table, run: output.Run, fingerprints: dict[str, str], run_fingerprint: str) -> pa.Table:
    """Stage `write`: stages healthy rows for predictions/ (schemas/predictions.json) and rejected rows for
    rejected/ (schemas/rejected.json); returns one stats row (with the staged files, which the driver
    commits) for progress and the summary."""
    good, bad, staged = output.write_rows(batch.to_pylist(), run, PREDICTIONS, "predictions",
                                          lambda r: fingerprints.get(r.get("method"), run_fingerprint))
    reasons = Counter(f"{r.get('method') or '*'}|{r['reject_stage']}:{r['reject_reason']}" for r in bad)
    return output.batch_stats(good, reasons, "correct", staged)


# --- checks before any work --------------------------------------------------------------------------


def check_model(key: str, model: str, weights: bool = True) -> str:
    """Fail early, naming the config key, when a model's config, tokenizer, chat template or (unless
    a server holds them: the openai engine) weights cannot be found; returns its local path
    (building the tiny model if asked for)."""
    path, _ = load_chat_tokenizer(key, model, config=True)
    if weights:
        check_weights(key, model, path)
    return path


def check_report_dependencies() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("matplotlib is not installed; the report chart needs it (pip install matplotlib)")


@dataclass
class Plan:
    """What one pass over the parsed ids found: the rows this run evaluates."""

    total: int                  # rows considered (after limit)
    valid: int                  # rows with question and answers
    datasets: list[str]         # datasets of the valid rows
    ids: set                    # ids of the valid rows (never used as demonstrations)
    questions: set              # their normalised questions (never used as demonstrations)
    keep: set | None            # (source, line) of the rows within the limit; None = all
    duplicates: set             # (source, line) of every extra copy of an id
    need_retrieval: int         # valid rows without ctxs
    rejected: Counter           # validation reject reasons


PLAN_COLUMNS = ("id", "dataset", "question", "source", "line", "ctxs_source", "reject_stage", "reject_reason")


def plan_rows(parsed, limit: int) -> Plan:
    """The plan from one pass over the parsed rows on Ray."""
    import ray

    refs = parsed.select_columns(list(PLAN_COLUMNS)).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    rows = pa.concat_tables(tables).sort_by([("source", "ascending"), ("line", "ascending")]).to_pylist() if tables else []
    return plan_from_rows(rows, limit)


def plan_from_rows(rows: list[dict], limit: int) -> Plan:
    """The plan from the parsed rows' PLAN_COLUMNS in input order (from Ray, or parsed on the driver)."""
    considered = rows[:limit] if limit else rows
    seen, duplicates, datasets = set(), set(), Counter()
    questions, need, rejected = set(), 0, Counter()
    for row in considered:
        if row["reject_stage"] is not None:
            rejected[(row["dataset"], row["reject_reason"])] += 1
            continue
        if row["id"] in seen:
            duplicates.add((row["source"], row["line"]))
            continue
        seen.add(row["id"])
        datasets[row["dataset"]] += 1
        questions.add(prompts.normalize_question(row["question"]))
        need += row["ctxs_source"] is None
    keep = {(r["source"], r["line"]) for r in considered} if limit else None
    return Plan(total=len(considered), valid=len(seen), datasets=sorted(datasets), ids=seen, questions=questions,
                keep=keep, duplicates=duplicates, need_retrieval=need, rejected=rejected)


def check_answers(plan: Plan, input_path: str) -> None:
    """Every dataset in the input must have rows with gold answers: without them nothing can be scored."""
    no_answers = Counter()
    for (dataset, reason), n in plan.rejected.items():
        if reason == "missing_answers":
            no_answers[dataset] += n
    empty = sorted(d for d in no_answers if d not in plan.datasets)
    if empty:
        d = empty[0]
        raise InputError(f"dataset '{d}' in {input_path} has no row with gold answers ({no_answers[d]} rows "
                              "without 'answers', 'answer', 'golden_answers' or 'possible_answers'); evaluation "
                              "scores predictions against gold answers")
    if not plan.valid:
        reasons = ", ".join(f"{r}: {n}" for (_, r), n in sorted(plan.rejected.items())) or "no rows"
        raise InputError(f"{input_path} has no usable QA row ({reasons}); every row needs a question and gold "
                              "answers")


# --- the job -----------------------------------------------------------------------------------------


def method_fingerprint(cfg: EvaluateConfig, method: str, demos: dict[str, list[dict]]) -> str:
    """Hash of the settings that shape `method`'s predictions (config.method_shaping, plus the chosen
    demonstrations of an ICL method); batch sizes and actor counts are left out."""
    chosen = None if method not in ICL_METHODS else {
        ds: [[d["id"], d["question"], d["rationale"] if method == ICL else d["answer"]] for d in picked]
        for ds, picked in sorted(demos.items())}
    return fingerprint(cfg.method_shaping(method, chosen))


def scan_predictions(out: Location, repair: bool = True) -> dict[tuple[str, str], str]:
    """(id, method) -> config_fingerprint of every prediction already committed (after finishing an
    interrupted compaction, unless repair=False: a dry run changes nothing)."""
    if repair:
        output.recover_compactions(out)
    found = {}
    for f in (out / PREDICTIONS).files((".parquet",)):
        t = f.read_parquet(["id", "method", "config_fingerprint"]).to_pydict()
        found.update({(i, m): fp for i, m, fp in zip(t["id"], t["method"], t["config_fingerprint"])})
    return found


def prepare_output(out: Location, fingerprints: dict[str, str], overwrite: bool,
                   check_only: bool = False) -> set[tuple[str, str]]:
    """Check an output directory before a run; returns the (id, method) pairs to skip (resume).

    Predictions of a method written with other settings are refused unless overwrite (which clears the
    directory). rejected/ and the reports are always rebuilt: rejected rows are tried again. With
    `check_only` (a dry run) nothing is changed.
    """
    existing = scan_predictions(out, repair=not check_only)
    stale = sorted({m for (_, m), fp in existing.items() if m in fingerprints and fp != fingerprints[m]})
    if stale and not overwrite:
        raise OutputConflict(f"{out.uri} holds {stale[0]} predictions written with other settings (model, prompt, "
                             "demonstrations, retrieval or decoding); use a new --output, or pass overwrite=true "
                             "to delete them and start again")
    if check_only:
        return set() if overwrite else {key for key, fp in existing.items() if fingerprints.get(key[1]) == fp}
    if overwrite:
        (out / PREDICTIONS).delete()
        existing = {}
    (out / REJECTED).delete()
    for name in (METRICS, REPORT_MD, REPORT_PNG, MANIFEST):
        (out / name).delete()
    return {key for key, fp in existing.items() if fingerprints.get(key[1]) == fp}


def model_groups(cfg: EvaluateConfig, methods: list[str]) -> list[tuple[str, str, list[str]]]:
    """(config key, model, its methods) for every model in play: the base model, ft_model, sft_model."""
    groups = [("generation.model", cfg.generation.model, [m for m in methods if m not in (FT, SFT)]),
              ("ft_model", cfg.ft_model, [FT] if FT in methods else []),
              ("sft_model", cfg.sft_model, [SFT] if SFT in methods else [])]
    return [g for g in groups if g[2]]


def run_evaluation(cfg: EvaluateConfig, dry_run: bool = False) -> dict:
    """Run the evaluation job; returns the manifest (also written to <output>/manifest.json). With
    `dry_run`, run every check and return what would run, without starting Ray."""
    started = time.time()
    methods = sorted(cfg.method_list(), key=METHOD_ORDER.index)
    g, r = cfg.generation, cfg.retrieval
    groups = model_groups(cfg, methods)
    # Everything that can be wrong with the inputs is found before any generation.
    out = location(cfg.output, "output")
    check_location(location(cfg.input, "input"), "input", hint="pass --input with a QA file or directory")
    read.raw_tasks(cfg.input)  # an input without QA files fails here
    check_location(out, "output", write=True)
    check_report_dependencies()
    icl = [m for m in methods if m in ICL_METHODS]
    pool = load_demo_pool(cfg.demos.path) if icl else []
    for key, model, _ in groups:
        check_model("generation.tokenizer" if g.tokenizer else key, g.prompt_model(model),
                    weights=g.engine not in ("openai", "llamacpp"))
        check_engine(g, key, model)
    retrieves = any(m != NO_RETRIEVAL for m in methods)
    dataset = read.default_dataset(cfg.input, cfg.dataset)
    if dry_run:
        plan = plan_from_rows(dryrun.parsed_rows(cfg.input, dataset, list(PLAN_COLUMNS)), cfg.limit)
        demos, fingerprints = checks_after_plan(cfg, plan, methods, pool, retrieves)
        done = prepare_output(out, fingerprints, cfg.overwrite, check_only=True)
        return evaluation_dry_run(cfg, plan, groups, methods, demos, done, retrieves)
    init_ray(cfg.ray_address, sum(g.num_cpus * g.min_actors + cfg.prompt.num_cpus for _ in groups)
             + (r.num_cpus * r.min_actors if len(groups) == 1 and retrieves else 0) + 1 + 3 * TASK_CPUS,
             verbose=cfg.verbose)

    log(f"reading {cfg.input} (dataset name for rows without one: {dataset}); methods: {', '.join(methods)}")
    parsed = read.read_parsed(cfg.input, dataset, TASK_CPUS)
    plan = plan_rows(parsed, cfg.limit)
    demos, fingerprints = checks_after_plan(cfg, plan, methods, pool, retrieves)
    done = prepare_output(out, fingerprints, cfg.overwrite)
    todo = plan.valid * len(methods) - len(done)
    log(f"{plan.total} input rows, {plan.valid} usable; {len(done)} (row, method) pairs already in {cfg.output} "
        f"(resumed), {todo} to generate")
    for dataset_name, chosen in demos.items():
        log(f"demonstrations for {dataset_name}: {', '.join(d['id'] for d in chosen)}")

    # Even with every (row, method) predicted the chain runs: rejected/ is rebuilt by every run.
    run_ = output.new_run(out)
    output.discard_staging(out)
    commit = output.Committer(run_)
    stats = evaluation_chain(parsed, cfg, plan, groups, demos, done, fingerprints, retrieves, run_)
    run = _follow(stats, todo, cfg.progress_interval_s, commit)
    commit.finish()
    output.compact(out, [PREDICTIONS, REJECTED], cfg.rows_per_file)
    output.ensure_tables(out, {PREDICTIONS: "predictions", REJECTED: "rejected"})
    output.write_card(out, [PREDICTIONS, REJECTED], PREDICTIONS, CARD)
    metrics = write_reports(out, methods, cfg.metrics.resamples, cfg.metrics.confidence, cfg.metrics.seed,
                            title=f"Evaluation of {location(cfg.input).name}")
    manifest = evaluation_manifest(cfg, plan, fingerprints, demos, run, done, metrics, time.time() - started)
    output.write_manifest(out, manifest)
    _summary(manifest, metrics)
    return manifest


def checks_after_plan(cfg: EvaluateConfig, plan: Plan, methods: list[str], pool: list, retrieves: bool):
    """The checks that need the rows (gold answers, demonstrations, an index for rows without ctxs);
    returns (demonstrations per dataset, fingerprint per method)."""
    check_answers(plan, cfg.input)
    icl = any(m in ICL_METHODS for m in methods)
    demos = select_demos(pool, plan.datasets, cfg.demos.num, cfg.demos.seed, cfg.demos.pool, plan.ids, plan.questions,
                         cfg.demos.path, need_answer=ICL_QA in methods) if icl else {}
    if retrieves:
        check_retrieval(cfg.retrieval, plan.need_retrieval, alternative=", or use methods=no-retrieval")
    return demos, {m: method_fingerprint(cfg, m, demos) for m in methods}


def evaluation_manifest(cfg: EvaluateConfig, plan: Plan, fingerprints: dict, demos: dict, run: dict, done: set,
                        metrics: dict, wall: float) -> dict:
    return {
        **output.manifest_header("evaluate", cfg),
        "config_fingerprints": fingerprints,
        "input_rows": plan.total,
        "usable_rows": plan.valid,
        "demonstrations": demos,
        "this_run": {**run, "resumed_pairs_skipped": len(done), "wall_time_s": round(wall, 2),
                     "completion_tokens_per_s": round(run["completion_tokens"] / wall, 2) if wall else None},
        "rejected": _rejected_by_method(run["reject_reasons"]),
        "predictions": {m: metrics["scores"].get(m, {}).get("overall", {}).get("n", 0) for m in metrics["methods"]},
        "outputs": {name: str(location(cfg.output) / name) for name in (PREDICTIONS, REJECTED, METRICS, REPORT_MD, REPORT_PNG)},
    }


def evaluation_dry_run(cfg: EvaluateConfig, plan: Plan, groups, methods: list[str], demos: dict, done: set,
                       retrieves: bool) -> dict:
    """What run_evaluation would run (printed); nothing is started or written."""
    todo = plan.valid * len(methods) - len(done)
    p = dryrun.Plan("evaluate")
    p.add("input", f"{cfg.input}: {plan.total} rows{f' (limit={cfg.limit})' if cfg.limit else ''}, {plan.valid} "
                   f"usable, datasets {', '.join(plan.datasets)}")
    p.add("methods", ", ".join(methods))
    p.add("output", f"{cfg.output}: {len(done)} (row, method) pairs already predicted (resumed), {todo} to generate")
    if retrieves and plan.need_retrieval:
        p.add("retrieve", dryrun.retrieval_stage(cfg.retrieval, plan.need_retrieval))
    for key, model, group_methods in groups:
        p.add(f"generate ({key})", dryrun.generation_stage(cfg.generation, model) + f" for {', '.join(group_methods)}")
    for dataset_name, chosen in demos.items():
        p.add(f"demos ({dataset_name})", ", ".join(d["id"] for d in chosen))
    g = cfg.generation
    p.add("ray", dryrun.ray_target(cfg.ray_address, sum(g.num_cpus * g.min_actors + cfg.prompt.num_cpus for _ in groups)))
    return p.show()


def evaluation_chain(parsed, cfg: EvaluateConfig, plan: Plan, groups, demos: dict, done: set,
                     fingerprints: dict[str, str], retrieves: bool, run: output.Run):
    """select -> retrieve (once) -> per model: prompt -> generate -> score -> union -> write."""
    import ray

    g = cfg.generation
    finished = {i for i, n in Counter(i for i, _ in done).items() if n == len(fingerprints)}
    ds = parsed.map_batches(
        select_rows, batch_format="pyarrow", num_cpus=TASK_CPUS,
        # rejected/ is rebuilt by every run, so every extra copy of an id is rejected again (False).
        fn_kwargs={"keep_ref": ray.put(plan.keep) if plan.keep is not None else None,
                   "duplicate_ref": ray.put(dict.fromkeys(plan.duplicates, False)), "skip_ref": ray.put(finished)})
    if retrieves and plan.need_retrieval:
        ds = retrieve(ds, cfg.retrieval)
    if len(groups) > 1:
        ds = ds.materialize()  # one retrieval pass, read by every model's branch
    done_ref = ray.put(done)
    branches = []
    for k, (_, model, group_methods) in enumerate(groups):
        low, high = cfg.prompt.pool(cluster_cpus(), plan.valid * len(group_methods))
        b = ds.map_batches(
            PromptStage, batch_format="pyarrow", batch_size=g.batch_size, num_cpus=cfg.prompt.num_cpus,
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            fn_constructor_kwargs={"model": g.prompt_model(model), "methods": group_methods, "demos": demos,
                                   "num_docs": cfg.prompt.num_docs, "max_model_len": g.max_model_len,
                                   "max_new_tokens": g.max_new_tokens, "done_ref": done_ref, "carry_rejects": k == 0})
        b = generate(reblock(b, g.batch_size), g, model, cfg.prompt.num_docs)
        # batch_size=None: each generated block is scored and written as it lands (resume loses little)
        branches.append(b.map_batches(score_batch, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS))
    out = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    return out.map_batches(write_batch, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
                           fn_kwargs={"run": run, "fingerprints": fingerprints,
                                      "run_fingerprint": fingerprint(fingerprints)})


def read_predictions(out: Location) -> list[dict]:
    """The columns metrics need, from every prediction file in the output directory."""
    files = (out / PREDICTIONS).files((".parquet",))
    columns = ["id", "dataset", "method", "correct", "str_em", "completion_tokens", "finish_reason"]
    return [row for f in files for row in f.read_parquet(columns).to_pylist()]


def write_reports(out: Location | str, methods: list[str] | None, resamples: int, confidence: float, seed: int,
                  title: str = "Evaluation") -> dict:
    """metrics.json, report.md and report.png from everything in <output>/predictions (this run and
    resumed runs; methods found there but not in `methods` are reported after them)."""
    out = location(out)
    rows = read_predictions(out)
    found = {r["method"] for r in rows}
    order = [m for m in (methods or []) if m in found] + sorted(found - set(methods or []), key=_order_key)
    metrics = compute_metrics(rows, order, resamples=resamples, confidence=confidence, seed=seed)
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / REPORT_MD).write_text(markdown_report(metrics, title))
    png = io.BytesIO()  # matplotlib writes PNG to a file object; the bytes go wherever the output is
    plot_report(metrics, png, title)
    (out / REPORT_PNG).write_bytes(png.getvalue())
    return metrics


def _order_key(method: str):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _rejected_by_method(reasons: dict[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, n in reasons.items():
        method, _, reason = key.partition("|")
        out.setdefault("all methods" if method == "*" else method, {})[reason] = n
    return out


COUNTERS = ("written", "rejected", "correct", "prompt_tokens", "completion_tokens")


def _follow(stats, todo: int, interval: float, commit) -> dict:
    """Drive the pipeline with a progress display (predictions, rate, ETA, rejects), committing each
    batch's files as they land; returns this run's counts."""
    display = Progress("evaluate", todo, "predictions", interval=interval)

    def counts(run: dict) -> tuple[int, int, str]:
        elapsed = max(1e-9, time.time() - display.started)
        return run["written"], run["rejected"], f"{run['completion_tokens'] / elapsed:.1f} tokens/s"

    return follow(stats, COUNTERS, display, counts, commit)


CARD = ("Predictions of instructrag-ray's evaluation job: `predictions/` holds one row per (question, method) with "
        "the prompt, the model's answer and its score (schemas/predictions.json); `rejected/` the rows that could "
        "not be scored, with the stage and reason (schemas/rejected.json). `metrics.json` and `report.md` hold "
        "the scores; `manifest.json` records the run.")


def _summary(m: dict, metrics: dict) -> None:
    run = m["this_run"]
    log("done")
    print(f"  input rows          {m['input_rows']} ({m['usable_rows']} usable)")
    print(f"  this run            {run['written']} predictions, {run['rejected']} rejected in {run['wall_time_s']}s "
          f"(resumed, skipped: {run['resumed_pairs_skipped']})")
    for method, reasons in m["rejected"].items():
        for reason, n in reasons.items():
            print(f"    rejected {method:<16} {reason:<28} {n}")
    conf = round(100 * metrics["confidence"])
    for method in metrics["methods"]:
        overall = metrics["scores"][method].get("overall")
        if overall:
            acc = overall["accuracy"]
            print(f"  {method:<18}  accuracy {100 * acc['value']:5.1f}% [{100 * acc['ci_low']:.1f}, "
                  f"{100 * acc['ci_high']:.1f}] ({conf}% CI), n={overall['n']}")
    out = m["outputs"]
    for name in (PREDICTIONS, METRICS, REPORT_MD, REPORT_PNG):
        print(f"  {name:<18}  {out[name]}")
    print(f"  {'manifest':<18}  {location(m['config']['output']) / MANIFEST}", flush=True)


if __name__ == "__main__":  # python -m instructrag_ray.evaluate: the same as jobs/evaluate.py
    from .cli import job_main

    job_main("evaluate", prog="python -m instructrag_ray.evaluate")
