"""Evaluation (InstructRAG-ICL and InstructRAG-FT against baselines) as one Ray Data chain.

    read -> parse/validate -> select (limit, duplicates, resume) -> retrieve (once, shared by every method)
         -> for each model: prompt (one row per method) -> generate -> score
         -> union -> write predictions/ + rejected/ -> metrics.json, report.md, report.png, manifest.json

Methods and the model each uses (`generation.model` is the base model; `ft_model` the fine-tuned one):

| method            | model    | prompt                                                                     |
|-------------------|----------|----------------------------------------------------------------------------|
| `instructrag-ft`  | ft_model | PAPER.md's FT prompt: documents + question                                  |
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
never from a test id or a test question (see `load_demo_pool`, `select_demos`).

Outputs (`<output>/`): predictions/*.parquet (schemas/predictions.json), rejected/*.parquet
(schemas/rejected.json; a per-method reject's detail starts with "method <name>: "), metrics.json,
report.md, report.png, and manifest.json written last. A rerun resumes: (id, method) pairs already in
predictions/ are skipped; rejected/ and the reports are rebuilt.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import prompts, read, schemas, write
from .answers import has_answer
from .batches import cached_get, follow, ok_rows, reject, require, select_rows
from .cli import init_ray
from .config import ICL_METHODS, EvaluateConfig, to_dict
from .generate import GenerateStage
from .metrics import compute_metrics, markdown_report, plot_report, score_prediction
from .tiny_model import ModelError, load_chat_tokenizer, resolve_model

FT, ICL, VANILLA, ICL_QA, NO_RETRIEVAL = "instructrag-ft", "instructrag-icl", "vanilla-rag", "icl-qa", "no-retrieval"
# Report order: the two InstructRAG methods first, then the baselines.
METHOD_ORDER = (FT, ICL, VANILLA, ICL_QA, NO_RETRIEVAL)

# --- wording that is ours, not the paper's (the reference code has no baselines) -----------------------
# vanilla-rag reuses PAPER.md's FT prompt (prompts.ft_parts) unchanged, and icl-qa the ICL prompt
# (prompts.icl_parts) with short answers in place of rationales. no-retrieval drops the documents, so
# the FT instruction loses "and the provided information".
NO_RETRIEVAL_QUESTION = "Based on your knowledge, answer the question:\n{question}"
# icl-qa's demonstration answer for an ASQA-style demo: the first short answer of each qa_pair, joined.
SHORT_ANSWER_JOIN = ", "
SHORT_ANSWER_LAST = " and "

PREDICTIONS, REJECTED, METRICS, REPORT_MD, REPORT_PNG = "predictions", "rejected", "metrics.json", "report.md", "report.png"
MANIFEST = "manifest.json"
TASK_CPUS = 0.1


class EvaluationError(ValueError):
    """A missing or malformed input found before any generation; the message says what to fix."""


def log(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


# --- prompts per method ----------------------------------------------------------------------------


def method_parts(method: str, question: str, docs: list[dict], demos: list[dict]) -> prompts.PromptParts:
    """The user turn of `method` for one question; demos are {question, rationale, answer}."""
    if method in (FT, VANILLA):
        return prompts.ft_parts(question, docs)
    if method == ICL:
        return prompts.icl_parts(question, docs, [{"question": d["question"], "rationale": d["rationale"]} for d in demos])
    if method == ICL_QA:
        return prompts.icl_parts(question, docs, [{"question": d["question"], "rationale": d["answer"]} for d in demos])
    if method == NO_RETRIEVAL:
        return prompts.PromptParts("", "", NO_RETRIEVAL_QUESTION.format(question=prompts.normalize_question(question)))
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHOD_ORDER)}")


def short_answer(answers: list[str] | None, qa_pairs: list[dict] | None) -> str | None:
    """A demonstration's short answer for icl-qa: answers[0], or one answer per ASQA qa_pair."""
    firsts = [p["answers"][0] for p in qa_pairs or [] if p.get("answers")]
    if len(firsts) > 1:
        return SHORT_ANSWER_JOIN.join(firsts[:-1]) + SHORT_ANSWER_LAST + firsts[-1]
    if firsts:
        return firsts[0]
    return answers[0] if answers else None


# --- demonstrations ----------------------------------------------------------------------------------


def load_demo_pool(path: str) -> list[dict]:
    """Every candidate demonstration in `path`, in a reproducible order, as {id, dataset, question,
    rationale, answer, consistent}.

    `path` is a synthesis output directory (its rationales/ is read), a directory or file of rationale
    Parquet (columns id, question, answers, rationale[, dataset, qa_pairs, consistent]), or a JSON /
    JSONL file of {question, rationale[, answers, qa_pairs, id, dataset]} (the authors' demos.json,
    whose answers and qa_pairs are Python-literal strings, reads as it is). Parquet rows are ordered
    by id (file names are random); JSON rows keep the file's order.
    """
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"demos.path {path} does not exist; pass a synthesis output directory (with "
                              "rationales/), a rationale Parquet file, or a demos JSON file")
    if p.is_dir():
        folder = p / write.RATIONALES if (p / write.RATIONALES).is_dir() else p
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise EvaluationError(f"demos.path {path} holds no rationale Parquet files (expected a synthesis output "
                                  "directory, its rationales/, or a demos JSON file)")
        return _parquet_demos(files, path)
    if p.name.endswith(".parquet"):
        return _parquet_demos([p], path)
    if p.name.endswith((".json", ".jsonl")):
        return _json_demos(p)
    raise EvaluationError(f"demos.path {path}: unknown file type; use a directory of rationale Parquet, a .parquet, "
                          "or a .json/.jsonl file of {question, rationale}")


def _parquet_demos(files: list[Path], path: str) -> list[dict]:
    rows = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in ("id", "question", "answers", "rationale") if c not in names]
        if missing:
            raise EvaluationError(f"demos.path {path}: {f.name} lacks column(s) {missing}; expected the synthesis "
                                  "job's rationales (schemas/rationales.json)")
        wanted = [c for c in ("id", "dataset", "question", "answers", "qa_pairs", "rationale", "consistent") if c in names]
        rows.extend(pq.read_table(f, columns=wanted).to_pylist())
    out = [_demo(str(r["id"]), r.get("dataset"), r["question"], r["rationale"], r["answers"], r.get("qa_pairs"),
                 r.get("consistent")) for r in rows]
    return sorted(out, key=lambda d: d["id"])


def _json_demos(p: Path) -> list[dict]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise EvaluationError(f"demos.path {p} is neither JSON nor JSON lines ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("rationale"), str):
            raise EvaluationError(f"demos.path {p}: record {i} needs 'question' and 'rationale' strings")
        answers, qa_pairs = _literal(r.get("answers")), _literal(r.get("qa_pairs"))
        if isinstance(answers, str):
            answers = [answers]
        qa_pairs = [{"question": q.get("question", ""), "answers": list(q.get("short_answers", q.get("answers", [])))}
                    for q in qa_pairs if isinstance(q, dict)] if isinstance(qa_pairs, list) else None
        out.append(_demo(str(r.get("id", f"{p.name}#{i}")), r.get("dataset"), r["question"], r["rationale"],
                         answers if isinstance(answers, list) else None, qa_pairs, None))
    return out


def _literal(value):
    """The authors' demos.json stores lists as Python-literal strings ("['a', 'b']", "None")."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{") or value == "None":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _demo(did: str, dataset, question: str, rationale: str, answers, qa_pairs, consistent) -> dict:
    if consistent is None:
        # No recorded check (a hand-written demos file): check it here; without answers, trust the file.
        consistent = has_answer(rationale, answers) if answers else True
    return {"id": did, "dataset": dataset or None, "question": question, "rationale": rationale,
            "answer": short_answer(answers, qa_pairs), "consistent": bool(consistent)}


def select_demos(pool: list[dict], datasets: list[str], num: int, seed: int, mode: str, exclude_ids: set[str],
                 exclude_questions: set[str], path: str = "", need_answer: bool = False) -> dict[str, list[dict]]:
    """N demonstrations per dataset: consistent, not a test id or question, drawn with a seeded RNG.

    mode 'same' draws from the dataset's own rows (rows without a dataset serve every dataset);
    'any' draws one set from the whole pool for every dataset. The chosen rows keep pool order.
    """
    usable = [d for d in pool if d["consistent"] and d["id"] not in exclude_ids
              and prompts.normalize_question(d["question"]) not in exclude_questions
              and (d["answer"] is not None or not need_answer)]
    chosen = {}
    for dataset in datasets:
        candidates = usable if mode == "any" else [d for d in usable if d["dataset"] in (None, dataset)]
        if len(candidates) < num:
            where = "" if mode == "any" else f" for dataset '{dataset}'"
            raise EvaluationError(
                f"demos.path {path} has {len(candidates)} usable demonstration(s){where} but demos.num={num}: "
                f"{len(pool)} rows, {sum(d['consistent'] for d in pool)} consistent, test ids and questions "
                f"excluded{', rows without answers excluded (icl-qa needs them)' if need_answer else ''}; "
                "synthesize more rows, lower demos.num" + ("" if mode == "any" else ", or set demos.pool=any"))
        rng = random.Random(f"{seed}|{'*' if mode == 'any' else dataset}")
        picked = sorted(rng.sample(range(len(candidates)), num))
        chosen[dataset] = [{k: candidates[i][k] for k in ("id", "dataset", "question", "rationale", "answer")}
                           for i in picked]
    return chosen


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

        from .synthesize import resolve_max_model_len

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


def write_batch(batch: pa.Table, output: str, fingerprints: dict[str, str], run_fingerprint: str) -> pa.Table:
    """Stage `write`: healthy rows to predictions/ (schemas/predictions.json), rejected rows to rejected/
    (schemas/rejected.json); returns one stats row for progress and the summary."""
    rows = batch.to_pylist()
    good = [r for r in rows if r["reject_stage"] is None]
    bad = [r for r in rows if r["reject_stage"] is not None]
    out = Path(output)
    schema = schemas.load("predictions")
    for r in good:
        r["config_fingerprint"] = fingerprints[r["method"]]
    write.write_table(pa.Table.from_pylist([{c: r[c] for c in schema.names} for r in good], schema=schema),
                      out / PREDICTIONS)
    rejected = [{"id": r["id"], "dataset": r["dataset"], "stage": r["reject_stage"], "reason": r["reject_reason"],
                 "detail": r["reject_detail"], "original": r["original"],
                 "config_fingerprint": fingerprints.get(r.get("method"), run_fingerprint)} for r in bad]
    write.write_table(pa.Table.from_pylist(rejected, schema=schemas.load("rejected")), out / REJECTED)
    reasons = Counter(f"{r.get('method') or '*'}|{r['reject_stage']}:{r['reject_reason']}" for r in bad)
    return pa.table({
        "written": [len(good)],
        "rejected": [len(bad)],
        "reasons": [json.dumps(reasons)],
        "correct": [sum(bool(r["correct"]) for r in good)],
        "prompt_tokens": [sum(r["prompt_tokens"] for r in good)],
        "completion_tokens": [sum(r["completion_tokens"] for r in good)],
    })


# --- checks before any work --------------------------------------------------------------------------


def check_model(key: str, model: str, weights: bool = True) -> str:
    """Fail early, naming the config key, when a model's config, tokenizer, chat template or (unless
    a server holds them: the openai engine) weights cannot be found; returns its local path
    (building the tiny model if asked for)."""
    try:
        path, _ = load_chat_tokenizer(key, model, config=True)
    except ModelError as e:
        raise EvaluationError(str(e)) from None
    if weights and Path(path).is_dir() and not any(any(Path(path).glob(p)) for p in ("*.safetensors", "*.bin", "*.pt")):
        raise EvaluationError(f"{key}={model!r} has a config and a tokenizer but no weights (*.safetensors or *.bin); "
                              "point it at the saved model directory (jobs/train.py writes <output>/model)")
    return path


def check_report_dependencies() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise EvaluationError("matplotlib is not installed; the report chart needs it (pip install matplotlib)")


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


def plan_rows(parsed, limit: int) -> Plan:
    import ray

    refs = parsed.select_columns(["id", "dataset", "question", "source", "line", "ctxs_source", "reject_stage",
                                  "reject_reason"]).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    rows = pa.concat_tables(tables).sort_by([("source", "ascending"), ("line", "ascending")]).to_pylist() if tables else []
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
        raise EvaluationError(f"dataset '{d}' in {input_path} has no row with gold answers ({no_answers[d]} rows "
                              "without 'answers', 'answer', 'golden_answers' or 'possible_answers'); evaluation "
                              "scores predictions against gold answers")
    if not plan.valid:
        reasons = ", ".join(f"{r}: {n}" for (_, r), n in sorted(plan.rejected.items())) or "no rows"
        raise EvaluationError(f"{input_path} has no usable QA row ({reasons}); every row needs a question and gold "
                              "answers")


# --- the job -----------------------------------------------------------------------------------------


def method_fingerprint(cfg: EvaluateConfig, method: str, demos: dict[str, list[dict]]) -> str:
    """Hash of the settings that shape `method`'s predictions; batch sizes and actor counts are left out."""
    g, r = cfg.generation, cfg.retrieval
    shaping = {
        "method": method,
        "model": cfg.ft_model if method == FT else g.model,
        "engine": g.engine,
        "served_model": g.served_model if g.engine == "openai" else None,
        "documents": None if method == NO_RETRIEVAL else {
            "num_docs": cfg.prompt.num_docs, "backend": r.backend, "index_path": r.index_path, "top_k": r.top_k,
            "fields": r.fields},
        "decoding": {"max_new_tokens": g.max_new_tokens, "max_model_len": g.max_model_len, "dtype": g.dtype,
                     "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed if g.temperature > 0 else None},
        "demos": None if method not in ICL_METHODS else {
            ds: [[d["id"], d["question"], d["rationale"] if method == ICL else d["answer"]] for d in chosen]
            for ds, chosen in sorted(demos.items())},
        "dataset": cfg.dataset,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def scan_predictions(output: str) -> dict[tuple[str, str], str]:
    """(id, method) -> config_fingerprint of every prediction already written."""
    found = {}
    for f in sorted((Path(output) / PREDICTIONS).glob("*.parquet")):
        t = pq.read_table(f, columns=["id", "method", "config_fingerprint"]).to_pydict()
        found.update({(i, m): fp for i, m, fp in zip(t["id"], t["method"], t["config_fingerprint"])})
    return found


def prepare_output(output: str, fingerprints: dict[str, str], overwrite: bool) -> set[tuple[str, str]]:
    """Check an output directory before a run; returns the (id, method) pairs to skip (resume).

    Predictions of a method written with other settings are refused unless overwrite (which clears the
    directory). rejected/ and the reports are always rebuilt: rejected rows are tried again.
    """
    existing = scan_predictions(output)
    stale = sorted({m for (_, m), fp in existing.items() if m in fingerprints and fp != fingerprints[m]})
    out = Path(output)
    if stale and not overwrite:
        raise EvaluationError(f"{output} holds {stale[0]} predictions written with other settings (model, prompt, "
                              "demonstrations, retrieval or decoding); use a new --output, or pass overwrite=true "
                              "to delete them and start again")
    if overwrite:
        shutil.rmtree(out / PREDICTIONS, ignore_errors=True)
        existing = {}
    shutil.rmtree(out / REJECTED, ignore_errors=True)
    for name in (METRICS, REPORT_MD, REPORT_PNG, MANIFEST):
        (out / name).unlink(missing_ok=True)
    return {key for key, fp in existing.items() if fingerprints.get(key[1]) == fp}


def generate(ds, g, model: str, num_docs: int):
    """Stage `generate` for one model, exactly as synthesis wires it (transformers or openai engines in
    GenerateStage; vLLM's ray.data.llm chain in its place); adds rationale, completion_tokens,
    finish_reason, generator."""
    import ray

    from .synthesize import custom_resources

    if g.engine == "vllm":
        from .generate_vllm import vllm_generate

        return vllm_generate(ds, **g.vllm_options(model))
    return ds.map_batches(
        GenerateStage, batch_format="pyarrow", batch_size=g.batch_size, num_cpus=g.num_cpus,
        num_gpus=g.num_gpus if g.engine == "transformers" else 0, **custom_resources(g.resources),
        compute=ray.data.ActorPoolStrategy(min_size=g.min_actors, max_size=g.max_actors),
        fn_constructor_kwargs={"num_docs": num_docs, **g.engine_options(model)})


def reblock(ds, rows: int):
    """Blocks of at most `rows` rows. A generation task takes whole blocks and emits one block per input
    block, so without this one 2000-row input block (x methods) would be generated by a single actor
    and written only when all of it is done. Ray 2.60's streaming repartition (marked experimental;
    Ray is pinned) is used only here."""
    return ds.repartition(target_num_rows_per_block=rows)


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Run the evaluation job; returns the manifest (also written to <output>/manifest.json)."""
    import ray

    from .synthesize import RetrieveStage, custom_resources, package_versions

    started = time.time()
    methods = sorted(cfg.method_list(), key=METHOD_ORDER.index)
    g, r = cfg.generation, cfg.retrieval
    groups = [(key, model, ms) for key, model, ms in (
        ("generation.model", g.model, [m for m in methods if m != FT]), ("ft_model", cfg.ft_model, [FT] if FT in methods else []))
        if ms]

    # Everything that can be wrong with the inputs is found before any generation.
    if not read.is_hf_dataset_dir(cfg.input):
        read.input_files(cfg.input)  # raises FileNotFoundError naming the path
    check_report_dependencies()
    icl = [m for m in methods if m in ICL_METHODS]
    pool = load_demo_pool(cfg.demos.path) if icl else []
    for key, model, _ in groups:
        check_model(key, model, weights=g.engine != "openai")
    retrieves = any(m != NO_RETRIEVAL for m in methods)
    init_ray(cfg.ray_address, sum(g.num_cpus * g.min_actors + cfg.prompt.num_cpus for _ in groups)
             + (r.num_cpus * r.min_actors if len(groups) == 1 and retrieves else 0) + 3 * TASK_CPUS)

    dataset = read.default_dataset(cfg.input, cfg.dataset)
    log(f"reading {cfg.input} (dataset name for rows without one: {dataset}); methods: {', '.join(methods)}")
    parsed = read.read_raw(cfg.input).map_batches(
        read.parse_batch, batch_format="pyarrow", fn_kwargs={"dataset": dataset}, num_cpus=TASK_CPUS)
    plan = plan_rows(parsed, cfg.limit)
    check_answers(plan, cfg.input)
    demos = select_demos(pool, plan.datasets, cfg.demos.num, cfg.demos.seed, cfg.demos.pool, plan.ids, plan.questions,
                         cfg.demos.path, need_answer=ICL_QA in methods) if icl else {}
    if retrieves and plan.need_retrieval and r.backend == "tantivy" and not r.index_path:
        raise EvaluationError(
            f"{plan.need_retrieval} rows have no ctxs and retrieval.index_path is not set; build an index with "
            "jobs/build_index.py and pass retrieval.index_path=DIR, give the rows ctxs, or use methods=no-retrieval")
    if retrieves and plan.need_retrieval and r.backend == "elasticsearch":
        from .elastic import ClusterError, check_search_index

        try:  # reachable, TLS, credentials, client/server versions, index and mapping
            check_search_index(r.es_cluster(), r.es_index, r.fields)
        except ClusterError as e:
            raise EvaluationError(str(e)) from None
    fingerprints = {m: method_fingerprint(cfg, m, demos) for m in methods}
    run_fingerprint = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
    done = prepare_output(cfg.output, fingerprints, cfg.overwrite)
    done_per_id = Counter(i for i, _ in done)
    finished = {i for i, n in done_per_id.items() if n == len(methods)}
    todo = plan.valid * len(methods) - len(done)
    log(f"{plan.total} input rows, {plan.valid} usable; {len(done)} (row, method) pairs already in {cfg.output} "
        f"(resumed), {todo} to generate")
    for dataset_name, chosen in demos.items():
        log(f"demonstrations for {dataset_name}: {', '.join(d['id'] for d in chosen)}")

    ds = parsed.map_batches(
        select_rows, batch_format="pyarrow", num_cpus=TASK_CPUS,
        # rejected/ is rebuilt by every run, so every extra copy of an id is rejected again (False).
        fn_kwargs={"keep_ref": ray.put(plan.keep) if plan.keep is not None else None,
                   "duplicate_ref": ray.put(dict.fromkeys(plan.duplicates, False)), "skip_ref": ray.put(finished)})
    if retrieves and plan.need_retrieval:
        ds = ds.map_batches(
            RetrieveStage, batch_format="pyarrow", batch_size=r.batch_size, num_cpus=r.num_cpus,
            compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
            **custom_resources(r.resources),
            fn_constructor_kwargs={"top_k": r.top_k, **r.retriever_options()})
    if len(groups) > 1:
        ds = ds.materialize()  # one retrieval pass, read by every model's branch
    done_ref = ray.put(done)
    branches = []
    for k, (_, model, group_methods) in enumerate(groups):
        b = ds.map_batches(
            PromptStage, batch_format="pyarrow", batch_size=g.batch_size, num_cpus=cfg.prompt.num_cpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.prompt.max_actors),
            fn_constructor_kwargs={"model": model, "methods": group_methods, "demos": demos,
                                   "num_docs": cfg.prompt.num_docs, "max_model_len": g.max_model_len,
                                   "max_new_tokens": g.max_new_tokens, "done_ref": done_ref, "carry_rejects": k == 0})
        b = generate(reblock(b, g.batch_size), g, model, cfg.prompt.num_docs)
        # batch_size=None: each generated block is scored and written as it lands (resume loses little)
        branches.append(b.map_batches(score_batch, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS))
    out = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    stats = out.map_batches(write_batch, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
                            fn_kwargs={"output": cfg.output, "fingerprints": fingerprints,
                                       "run_fingerprint": run_fingerprint})
    run = _follow(stats, todo, cfg.progress_interval_s)

    metrics = write_reports(cfg.output, methods, cfg.metrics.resamples, cfg.metrics.confidence, cfg.metrics.seed,
                            title=f"Evaluation of {Path(cfg.input).name}")
    rejected = _rejected_by_method(run["reject_reasons"])
    wall = time.time() - started
    manifest = {
        "job": "evaluate",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
        "config_fingerprints": fingerprints,
        "versions": package_versions(),
        "input_rows": plan.total,
        "usable_rows": plan.valid,
        "demonstrations": demos,
        "this_run": {**run, "resumed_pairs_skipped": len(done), "wall_time_s": round(wall, 2),
                     "completion_tokens_per_s": round(run["completion_tokens"] / wall, 2) if wall else None},
        "rejected": rejected,
        "predictions": {m: metrics["scores"].get(m, {}).get("overall", {}).get("n", 0) for m in metrics["methods"]},
        "outputs": {name: os.path.join(cfg.output, name) for name in (PREDICTIONS, REJECTED, METRICS, REPORT_MD, REPORT_PNG)},
    }
    write.write_manifest(cfg.output, manifest)
    _summary(manifest, metrics)
    return manifest


def read_predictions(output: str) -> list[dict]:
    """The columns metrics need, from every prediction file in the output directory."""
    files = sorted((Path(output) / PREDICTIONS).glob("*.parquet"))
    columns = ["id", "dataset", "method", "correct", "str_em", "completion_tokens", "finish_reason"]
    return [row for f in files for row in pq.read_table(f, columns=columns).to_pylist()]


def write_reports(output: str, methods: list[str] | None, resamples: int, confidence: float, seed: int,
                  title: str = "Evaluation") -> dict:
    """metrics.json, report.md and report.png from everything in <output>/predictions (this run and
    resumed runs; methods found there but not in `methods` are reported after them)."""
    rows = read_predictions(output)
    found = {r["method"] for r in rows}
    order = [m for m in (methods or []) if m in found] + sorted(found - set(methods or []), key=_order_key)
    metrics = compute_metrics(rows, order, resamples=resamples, confidence=confidence, seed=seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / REPORT_MD).write_text(markdown_report(metrics, title))
    plot_report(metrics, out / REPORT_PNG, title)
    return metrics


def _order_key(method: str):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _rejected_by_method(reasons: dict[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, n in reasons.items():
        method, _, reason = key.partition("|")
        out.setdefault("all methods" if method == "*" else method, {})[reason] = n
    return out


def _follow(stats, todo: int, interval: float) -> dict:
    """Drive the pipeline, printing progress every `interval` seconds; returns this run's counts."""
    def progress(run: dict, elapsed: float) -> None:
        rate = run["written"] / elapsed
        eta = f", ETA {(todo - run['written']) / rate:.0f}s" if rate and todo > run["written"] else ""
        log(f"{run['written']}/{todo} predictions, {run['rejected']} rejected, {rate:.2f} predictions/s, "
            f"{run['completion_tokens'] / elapsed:.1f} tokens/s{eta}")

    return follow(stats, ("written", "rejected", "correct", "prompt_tokens", "completion_tokens"), interval,
                  progress)


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
    print(f"  {'manifest':<18}  {os.path.join(m['config']['output'], MANIFEST)}", flush=True)
