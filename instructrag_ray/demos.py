"""ICL demonstrations: the pool (a synthesis output, rationale Parquet, or the authors' demos.json)
and the reproducible draw of N per dataset, never from a test id or question.

`short_answer` is icl-qa's demonstration answer; the wording constants are ours, not the paper's.
"""

from __future__ import annotations

import ast
import json
import random
import pyarrow.parquet as pq

from . import prompts
from .answers import has_answer
from .errors import InputError
from .output import RATIONALES
from .storage import Location, location

# icl-qa's demonstration answer for an ASQA-style demo: the first short answer of each qa_pair, joined.
SHORT_ANSWER_JOIN = ", "
SHORT_ANSWER_LAST = " and "


def short_answer(answers: list[str] | None, qa_pairs: list[dict] | None) -> str | None:
    """A demonstration's short answer for icl-qa: answers[0], or one answer per ASQA qa_pair."""
    firsts = [p["answers"][0] for p in qa_pairs or [] if p.get("answers")]
    if len(firsts) > 1:
        return SHORT_ANSWER_JOIN.join(firsts[:-1]) + SHORT_ANSWER_LAST + firsts[-1]
    if firsts:
        return firsts[0]
    return answers[0] if answers else None


def load_demo_pool(path: str) -> list[dict]:
    """Every candidate demonstration in `path`, in a reproducible order, as {id, dataset, question,
    rationale, answer, consistent}.

    `path` is a synthesis output directory (its rationales/ is read), a directory or file of rationale
    Parquet (columns id, question, answers, rationale[, dataset, qa_pairs, consistent]), or a JSON /
    JSONL file of {question, rationale[, answers, qa_pairs, id, dataset]} (the authors' demos.json,
    whose answers and qa_pairs are Python-literal strings, reads as it is). Parquet rows are ordered
    by id (file names are random); JSON rows keep the file's order.
    """
    p = location(path, "demos.path")
    if not p.exists():
        raise InputError(f"demos.path {path} does not exist; pass a synthesis output directory (with "
                         "rationales/), a rationale Parquet file, or a demos JSON file")
    if p.is_dir():
        folder = p / RATIONALES if (p / RATIONALES).is_dir() else p
        files = folder.files((".parquet",))
        if not files:
            raise InputError(f"demos.path {path} holds no rationale Parquet files (expected a synthesis output "
                                  "directory, its rationales/, or a demos JSON file)")
        return _parquet_demos(files, path)
    if p.name.endswith(".parquet"):
        return _parquet_demos([p], path)
    if p.name.endswith((".json", ".jsonl")):
        return _json_demos(p)
    raise InputError(f"demos.path {path}: unknown file type; use a directory of rationale Parquet, a .parquet, "
                          "or a .json/.jsonl file of {question, rationale}")


def _parquet_demos(files: list[Location], path: str) -> list[dict]:
    rows = []
    for f in files:
        names = pq.read_schema(f.path, filesystem=f.fs).names
        missing = [c for c in ("id", "question", "answers", "rationale") if c not in names]
        if missing:
            raise InputError(f"demos.path {path}: {f.name} lacks column(s) {missing}; expected the synthesis "
                                  "job's rationales (schemas/rationales.json)")
        wanted = [c for c in ("id", "dataset", "question", "answers", "qa_pairs", "rationale", "consistent") if c in names]
        rows.extend(f.read_parquet(wanted).to_pylist())
    out = [_demo(str(r["id"]), r.get("dataset"), r["question"], r["rationale"], r["answers"], r.get("qa_pairs"),
                 r.get("consistent")) for r in rows]
    return sorted(out, key=lambda d: d["id"])


def _json_demos(p: Location) -> list[dict]:
    text = p.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"demos.path {p} is neither JSON nor JSON lines ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("rationale"), str):
            raise InputError(f"demos.path {p}: record {i} needs 'question' and 'rationale' strings")
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
            raise InputError(
                f"demos.path {path} has {len(candidates)} usable demonstration(s){where} but demos.num={num}: "
                f"{len(pool)} rows, {sum(d['consistent'] for d in pool)} consistent, test ids and questions "
                f"excluded{', rows without answers excluded (icl-qa needs them)' if need_answer else ''}; "
                "synthesize more rows, lower demos.num" + ("" if mode == "any" else ", or set demos.pool=any"))
        rng = random.Random(f"{seed}|{'*' if mode == 'any' else dataset}")
        picked = sorted(rng.sample(range(len(candidates)), num))
        chosen[dataset] = [{k: candidates[i][k] for k in ("id", "dataset", "question", "rationale", "answer")}
                           for i in picked]
    return chosen
