"""Read QA rows from files into Ray Data and validate them into the QA schema (`schemas/qa.json`).

Reading is two steps:
1. `read_raw` turns the input (JSONL, JSON array, DPR-topics TSV, Parquet, a directory of those, or a
   Hugging Face dataset saved with `save_to_disk`) into raw rows `{source, line, raw}`, where `raw`
   is the record's JSON text (or the raw line when it is not JSON). Nothing is interpreted yet, so
   a malformed record can never fail the whole read.
2. `parse_record` (run by `parse_batch` on Ray workers) turns one raw row into a QA row, or raises
   `RowError(reason, detail)`, which the pipeline writes to `rejected/` with the original text.

`parse_record` accepts the field spellings of the common QA releases, so the real files in
`../shared/data/raw` need no conversion step: PopQA (`possible_answers` as a JSON string,
`answer` + `aliases`, ctxs with string scores), NQ-open (`answer` list), FlashRAG
(`golden_answers`), DPR topics (`question<TAB>['a', 'b']`), and ASQA (`qa_pairs[*].short_answers`,
which become `qa_pairs[*].answers`; `answers` is their union).
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import schemas
from .errors import InputError

RAW_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("raw", pa.string())])
RAW_BLOCK_ROWS = 2000

# file-name hints -> dataset name (checked in order)
NAME_HINTS = [("popqa", "popqa"), ("asqa", "asqa"), ("trivia", "triviaqa"), ("2wiki", "2wikimultihopqa"),
              ("hotpot", "hotpotqa"), ("nq", "nq")]

QA_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".tsv", ".txt", ".tsv.gz", ".txt.gz")


class RowError(ValueError):
    """A row that cannot be used: `reason` is a stable code, `detail` a sentence saying what to fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- step 1: raw rows -------------------------------------------------------------------------------


def input_files(path: str | Path) -> list[Path]:
    """The QA files under `path` (a file, or a directory searched recursively), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(QA_EXTENSIONS))
        if files:
            return files
        raise InputError(f"input directory {path} holds no {', '.join(QA_EXTENSIONS)} files")
    raise InputError(f"input {path} does not exist; pass --input with a QA file or directory")


def is_hf_dataset_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def iter_raw(path: str | Path) -> Iterator[tuple[str, int, str]]:
    """(source, line, raw) for every record of the input, in file order."""
    if is_hf_dataset_dir(path):
        yield from _iter_hf(Path(path))
        return
    for file in input_files(path):
        name = file.name.lower()
        if name.endswith(".parquet"):
            yield from _iter_parquet(file)
        elif name.endswith((".json", ".json.gz")):
            yield from _iter_json_array(file)
        else:  # JSONL, and DPR-topics TSV: one record a line
            with _open_text(file) as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        yield str(file), i, line.rstrip("\n")


def _open_text(file: Path):
    if file.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(file), encoding="utf-8")
    return open(file, encoding="utf-8")


def _iter_json_array(file: Path) -> Iterator[tuple[str, int, str]]:
    with _open_text(file) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Some ".json" files are really JSON lines.
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield str(file), i, line
        return
    if isinstance(data, dict):
        # ASQA releases are {"dev": {id: row}} or {id: row}; keep the key as the id.
        if len(data) == 1 and isinstance(next(iter(data.values())), dict) and all(
            isinstance(v, dict) for v in next(iter(data.values())).values()
        ):
            data = next(iter(data.values()))
        items = []
        for key, value in data.items():
            if isinstance(value, dict) and "id" not in value:
                value = {"id": key, **value}
            items.append(value)
        data = items
    if not isinstance(data, list):
        data = [data]
    for i, record in enumerate(data, 1):
        yield str(file), i, json.dumps(record, ensure_ascii=False, default=str)


def _iter_parquet(file: Path) -> Iterator[tuple[str, int, str]]:
    import pyarrow.parquet as pq

    line = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=RAW_BLOCK_ROWS):
        for record in batch.to_pylist():
            line += 1
            yield str(file), line, json.dumps(record, ensure_ascii=False, default=str)


def _iter_hf(path: Path) -> Iterator[tuple[str, int, str]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in splits:
        source = f"{path}:{split}" if split else str(path)
        for i, record in enumerate(ds, 1):
            yield source, i, json.dumps(record, ensure_ascii=False, default=str)


def read_raw(path: str | Path, block_rows: int = RAW_BLOCK_ROWS):
    """A Ray Dataset of raw rows `{source, line, raw}` in blocks of `block_rows`.

    Files are read on the driver (QA inputs are small next to the work done per row; the
    passage corpus is indexed separately), then shared out as blocks for parsing on the cluster.
    A block is the unit an actor pool receives and the unit written to Parquet, so jobs pass their
    generation batch size: smaller blocks spread over every generation actor and land sooner.
    """
    import ray

    blocks, rows = [], []
    for record in iter_raw(path):
        rows.append(record)
        if len(rows) == block_rows:
            blocks.append(_raw_block(rows))
            rows = []
    if rows or not blocks:
        blocks.append(_raw_block(rows))
    return ray.data.from_arrow(blocks)


def _raw_block(rows: list[tuple[str, int, str]]) -> pa.Table:
    source, line, raw = zip(*rows) if rows else ((), (), ())
    return pa.table([pa.array(source, pa.string()), pa.array(line, pa.int64()), pa.array(raw, pa.string())],
                    schema=RAW_SCHEMA)


# --- step 2: one raw row -> one QA row --------------------------------------------------------------


def default_dataset(input_path: str, dataset: str = "") -> str:
    """The dataset name for rows without one: the config's, else a hint in the file name, else the name."""
    if dataset:
        return dataset
    name = Path(input_path).name.lower()
    for hint, value in NAME_HINTS:
        if hint in name:
            return value
    return Path(input_path).name.split(".")[0] or "qa"


def derive_id(dataset: str, question: str, answers: list[str]) -> str:
    digest = hashlib.sha1(json.dumps([dataset, question, answers], ensure_ascii=False).encode()).hexdigest()
    return "qa-" + digest[:16]


def raw_id(raw: str) -> str:
    """Id of a row that could not be parsed far enough to have one: a hash of its text."""
    return "raw-" + hashlib.sha1(raw.encode()).hexdigest()[:16]


def load_record(raw: str) -> dict:
    """The record of a raw row: a JSON object, or a DPR-topics line `question<TAB>answers`."""
    text = raw.strip()
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise RowError("invalid_json", f"the line is not valid JSON ({e.msg} at column {e.colno})") from None
        return record
    if "\t" in text:
        return _dpr_topics_line(text)
    if text.startswith(("[", '"')) or text[:1].isdigit():
        raise RowError("not_an_object", "each record must be a JSON object with question and answers")
    raise RowError("invalid_json", "the line is neither a JSON object nor a 'question<TAB>answers' DPR-topics line")


def _dpr_topics_line(text: str) -> dict:
    question, _, answers_text = text.partition("\t")
    try:
        answers = ast.literal_eval(answers_text)
    except (ValueError, SyntaxError):
        # A few TriviaQA lines use CSV-style doubled quotes ("[""a"", 'b']"): undo the CSV quoting.
        # The elements are CSV-quoted once more inside: '"Michael Jackson's ""Thriller"""'.
        try:
            answers = ast.literal_eval(_csv_unquote(answers_text))
            answers = [_csv_unquote(a) if isinstance(a, str) else a for a in answers]
        except (ValueError, SyntaxError, TypeError):
            raise RowError("bad_answers", "the answers after the tab are not a Python list literal") from None
    return {"question": question, "answers": answers}


def _csv_unquote(text: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return next(csv.reader([text]))[0]
    return text


def parse_record(record: Any, dataset: str) -> dict:
    """Validate and normalise one record into a QA row (schemas/qa.json); raise RowError if unusable."""
    if not isinstance(record, dict):
        raise RowError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    question = record.get("question", record.get("ambiguous_question"))
    if question is None or (isinstance(question, str) and not question.strip()):
        raise RowError("missing_question", "the row has no 'question' text")
    if not isinstance(question, str):
        raise RowError("bad_question", f"'question' must be a string, got {type(question).__name__}")
    question = question.strip()

    row_dataset = record.get("dataset")
    if row_dataset is not None and not isinstance(row_dataset, str):
        raise RowError("bad_dataset", "'dataset' must be a string")
    dataset = row_dataset or dataset

    qa_pairs = _qa_pairs(record.get("qa_pairs"))
    answers = _answers(record, qa_pairs)
    ctxs = _ctxs(record.get("ctxs"))

    rid = record.get("id", record.get("sample_id", record.get("idx", record.get("question_id"))))
    if rid is None or rid == "":
        rid = derive_id(dataset, question, answers)
    elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
        rid = str(rid)
    else:
        raise RowError("bad_id", f"'id' must be a string or an integer, got {type(rid).__name__}")
    return {"id": rid, "dataset": dataset, "question": question, "answers": answers,
            "qa_pairs": qa_pairs, "ctxs": ctxs}


_ANSWER_KEYS = ("answers", "answer", "golden_answers", "possible_answers")


def _answers(record: dict, qa_pairs: list[dict] | None) -> list[str]:
    value, key = None, None
    for key in _ANSWER_KEYS:
        if record.get(key) is not None:
            value = record[key]
            break
    if key == "possible_answers" and isinstance(value, str):
        # PopQA stores its answers as a JSON string.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("bad_answers", "'possible_answers' is a string but not a JSON list") from None
    if isinstance(value, str):
        value = [value]
    aliases = record.get("aliases")
    if isinstance(value, list) and isinstance(aliases, list):
        value = value + aliases
    if value is None and qa_pairs:
        value = [a for pair in qa_pairs for a in pair["answers"]]
    if value is None:
        raise RowError("missing_answers", "the row has no answers (expected 'answers', 'answer' or 'golden_answers')")
    if not isinstance(value, list):
        raise RowError("bad_answers", f"'{key}' must be a list of strings, got {type(value).__name__}")
    if any(not isinstance(a, str) for a in value):
        raise RowError("bad_answers", f"'{key}' must hold only strings")
    answers = list(dict.fromkeys(a.strip() for a in value if a.strip()))
    if not answers:
        raise RowError("missing_answers", f"'{key}' holds no non-empty answer")
    return answers


def _qa_pairs(value: Any) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowError("bad_qa_pairs", "'qa_pairs' must be a list of {question, short_answers|answers}")
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, dict):
            raise RowError("bad_qa_pairs", f"qa_pairs[{i}] is not an object")
        q = pair.get("question")
        answers = pair.get("short_answers", pair.get("answers"))
        if not isinstance(q, str) or not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise RowError("bad_qa_pairs", f"qa_pairs[{i}] needs a 'question' string and a list of 'short_answers' strings")
        pairs.append({"question": q, "answers": [a for a in answers if a.strip()]})
    return pairs or None


def _ctxs(value: Any) -> list[dict] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RowError("bad_ctxs", f"'ctxs' must be a list of documents, got {type(value).__name__}")
    ctxs = []
    for i, doc in enumerate(value):
        if not isinstance(doc, dict):
            raise RowError("bad_ctxs", f"ctxs[{i}] is not an object with title and text")
        text, title = doc.get("text"), doc.get("title", "")
        if not isinstance(text, str):
            raise RowError("bad_ctxs", f"ctxs[{i}].text is missing or not a string")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise RowError("bad_ctxs", f"ctxs[{i}].title is not a string")
        score = doc.get("score")
        if score is not None:
            try:
                score = float(score)  # PopQA's retrieved ctxs store scores as strings
            except (TypeError, ValueError):
                raise RowError("bad_ctxs", f"ctxs[{i}].score {score!r} is not a number") from None
            if math.isnan(score):
                score = None
        did = doc.get("id")
        did = "" if did is None else str(did)
        ctxs.append({"id": did, "title": title, "text": text, "score": score})
    return ctxs


# --- the Ray Data stage ------------------------------------------------------------------------------


def parse_batch(batch: pa.Table, dataset: str) -> pa.Table:
    """Stage `parse`: reads source, line, raw; adds the QA columns plus ctxs_source and the reject columns.

    A row that fails keeps its raw text in `original` and gets reject_stage='validate' and a reason.
    """
    out = []
    for row in batch.to_pylist():
        raw = row["raw"]
        try:
            qa = parse_record(load_record(raw), dataset)
            qa.update(ctxs_source="given" if qa["ctxs"] else None, reject_stage=None, reject_reason=None,
                      reject_detail=None)
        except RowError as e:
            qa = {"id": _best_effort_id(raw), "dataset": _best_effort_dataset(raw, dataset), "question": None,
                  "answers": None, "qa_pairs": None, "ctxs": None, "ctxs_source": None,
                  "reject_stage": "validate", "reject_reason": e.reason, "reject_detail": e.detail}
        qa.update(source=row["source"], line=row["line"], original=raw)
        out.append(qa)
    return pa.Table.from_pylist(out, schema=FLIGHT_SCHEMA)


def _best_effort_id(raw: str) -> str:
    try:
        record = json.loads(raw)
        rid = record.get("id") if isinstance(record, dict) else None
        if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "":
            return str(rid)
    except (json.JSONDecodeError, AttributeError):
        pass
    return raw_id(raw)


def _best_effort_dataset(raw: str, dataset: str) -> str:
    try:
        record = json.loads(raw)
        if isinstance(record, dict) and isinstance(record.get("dataset"), str):
            return record["dataset"]
    except json.JSONDecodeError:
        pass
    return dataset


def _nullable(name: str, column: str) -> pa.Field:
    return schemas.field(name, column).with_nullable(True).remove_metadata()


# The columns every in-flight row carries from parsing on; later stages add theirs.
FLIGHT_SCHEMA = pa.schema(
    [_nullable("qa", c) for c in schemas.columns("qa")]
    + [pa.field("ctxs_source", pa.string()), pa.field("source", pa.string()), pa.field("line", pa.int64()),
       pa.field("original", pa.string()), pa.field("reject_stage", pa.string()),
       pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string())]
)
