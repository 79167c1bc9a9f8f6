"""Read QA rows from files into Ray Data and validate them into the QA schema (`schemas/qa.json`).

Reading is two steps:
1. `read_raw` turns the input (JSONL, JSON array, DPR-topics TSV, Parquet, a directory of those, or a
   Hugging Face dataset saved with `save_to_disk`; a local path or any filesystem URI) into raw rows
   `{source, line, raw, read_error}` on Ray workers, where `raw` is the record's JSON text (or the raw
   line when it is not JSON). Nothing is interpreted yet, so a malformed record (bad bytes included)
   can never fail the whole read.
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
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import schemas
from .errors import InputError
from .storage import Location, location

RAW_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("raw", pa.string()),
                        ("read_error", pa.string())])
RAW_BLOCK_ROWS = 2000
# A line-per-record file larger than this is read by several tasks, each a byte range of it.
SPLIT_BYTES = 64 << 20
READ_CPUS = 0.25  # read tasks are light next to the actor pools that follow

# file-name hints -> dataset name (checked in order)
NAME_HINTS = [("popqa", "popqa"), ("asqa", "asqa"), ("trivia", "triviaqa"), ("2wiki", "2wikimultihopqa"),
              ("hotpot", "hotpotqa"), ("nq", "nq")]

QA_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".tsv", ".txt", ".tsv.gz", ".txt.gz")
LINE_FORMATS = (".jsonl", ".tsv", ".txt")  # one record a line: readable by byte range (uncompressed)
BOM = b"\xef\xbb\xbf"


class RowError(ValueError):
    """A row that cannot be used: `reason` is a stable code, `detail` a sentence saying what to fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- step 1: raw rows, read on the cluster ----------------------------------------------------------
#
# A raw row is (source, line, raw, read_error): the file (a path or URI) and the record's position in it
# (the byte offset of its line for one-record-a-line files, its index in a JSON array, a Parquet file or
# a Hugging Face dataset), its text, and why it could not be read as text (else null). Positions order
# the rows of a file as the file does, so "the first copy of an id" and `limit` mean the file's order.


def input_files(path: str | Location) -> list[Location]:
    """The QA files at `path` (a file, or a directory searched recursively; local or a URI), sorted."""
    loc = location(path, "input")
    if loc.is_file():
        return [loc]
    if loc.is_dir():
        files = loc.files(QA_EXTENSIONS, recursive=True)
        if files:
            return files
        raise InputError(f"input directory {loc.uri} holds no {', '.join(QA_EXTENSIONS)} files")
    raise InputError(f"input {loc.uri} does not exist; pass --input with a QA file or directory")


def hf_dataset_files(path: str | Location) -> list[tuple[Location, str]] | None:
    """(arrow file, source name) of a Hugging Face dataset saved with save_to_disk, None when `path` is not
    one: a Dataset dir (dataset_info.json + data-*.arrow) or a DatasetDict dir (dataset_dict.json + a
    Dataset dir per split, whose rows are sourced as '<path>:<split>')."""
    loc = location(path, "input")
    if (loc / "dataset_dict.json").is_file():
        splits = json.loads((loc / "dataset_dict.json").read_text()).get("splits", [])
        return [(f, f"{loc.uri}:{split}") for split in splits for f in (loc / split).files((".arrow",))]
    if (loc / "dataset_info.json").is_file():
        return [(f, loc.uri) for f in loc.files((".arrow",))]
    return None


def input_bytes(path: str | Location) -> int:
    """The input's size in bytes (every QA file, or the dataset's Arrow files)."""
    hf = hf_dataset_files(path)
    files = [f for f, _ in hf] if hf is not None else input_files(path)
    return sum(f.info().size or 0 for f in files)


def raw_tasks(path: str | Location, split_bytes: int = SPLIT_BYTES) -> list[tuple]:
    """The read work for an input: (kind, file, source, start, end) per task; a large uncompressed
    one-record-a-line file is cut into byte ranges, every other file is one task."""
    hf = hf_dataset_files(path)
    if hf is not None:
        return [("arrow", f, source, 0, -1) for f, source in hf]
    tasks = []
    for f in input_files(path):
        name = f.name.lower()
        if name.endswith(".jsonl") and _starts_an_array(f):
            tasks.append(("json", f, f.uri, 0, -1))  # a pretty-printed JSON array under a .jsonl name
        elif name.endswith(LINE_FORMATS):
            size = f.info().size
            tasks += [("lines", f, f.uri, start, min(start + split_bytes, size))
                      for start in range(0, max(size, 1), split_bytes)]
        elif name.endswith((".parquet",)):
            tasks.append(("parquet", f, f.uri, 0, -1))
        elif name.endswith((".json", ".json.gz")):
            tasks.append(("json", f, f.uri, 0, -1))
        else:  # .jsonl.gz, .tsv.gz, .txt.gz: a compressed stream is read from its start
            tasks.append(("lines", f, f.uri, 0, -1))
    return tasks


def _starts_an_array(file: Location) -> bool:
    """True when the file's first non-blank character (after a BOM) is '[': one JSON array, not JSON lines."""
    with file.fs.open_input_file(file.path) as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    return head[:1] == b"["


def read_task(kind: str, file: Location, source: str, start: int, end: int,
              block_rows: int = RAW_BLOCK_ROWS) -> Iterator[pa.Table]:
    """Tables of raw rows (RAW_SCHEMA) of one read task, `block_rows` at a time."""
    records = _line_records(file, start, end) if kind == "lines" else (
        _json_records(file) if kind == "json" else _table_records(file, kind))
    rows: list[tuple] = []
    for record in records:
        rows.append((source, *record))
        if len(rows) == block_rows:
            yield raw_block(rows)
            rows = []
    if rows:
        yield raw_block(rows)


def iter_raw(path: str | Location) -> Iterator[tuple[str, int, str, str | None]]:
    """(source, line, raw, read_error) for every record of the input, in file order, in this process
    (tests, small inputs); the jobs read on the cluster with `read_raw`."""
    for task in raw_tasks(path):
        for table in read_task(*task):
            yield from zip(*(table.column(c).to_pylist() for c in RAW_SCHEMA.names))


def _line_records(file: Location, start: int, end: int) -> Iterator[tuple[int, str, str | None]]:
    """(byte offset, text, read error) of every non-blank line whose first byte lies in [start, end)
    (end -1: to the end of a compressed stream)."""

    if end < 0:  # a compressed stream, read from its start (pyarrow decompresses it: detected from the name)
        with file.fs.open_input_stream(file.path) as raw:
            base, chunk = 0, raw.read()
    else:
        base, chunk = _byte_range(file, start, end)
    if base == 0 and chunk.startswith(BOM):
        chunk, base = chunk[len(BOM):], len(BOM)
    pos = 0
    while pos < len(chunk):
        nl = chunk.find(b"\n", pos)
        stop = len(chunk) if nl < 0 else nl
        line = chunk[pos:stop].rstrip(b"\r")
        if line.strip():
            yield (base + pos, *_decode(line))
        pos = stop + 1


def _byte_range(file: Location, start: int, end: int) -> tuple[int, bytes]:
    """The bytes of the lines whose first byte lies in [start, end): (offset of the first, bytes)."""
    with file.fs.open_input_file(file.path) as f:
        size = f.size()
        lo = max(start - 1, 0)
        data = f.read_at(min(end, size) - lo, lo)
        first = 0
        if start > 0:  # a line starts at `start` only when the byte before it is a newline
            nl = data.find(b"\n")
            first = nl + 1 if nl >= 0 else len(data)
        tail = b""
        if end < size and not data.endswith(b"\n"):  # finish the last line, which runs past `end`
            pos = end
            while pos < size:
                more = f.read_at(min(1 << 16, size - pos), pos)
                nl = more.find(b"\n")
                tail += more if nl < 0 else more[:nl + 1]
                pos += len(more)
                if nl >= 0:
                    break
    return lo + first, data[first:] + tail


def _decode(line: bytes) -> tuple[str, str | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return (line.decode("utf-8", "backslashreplace"),
                f"the line is not valid UTF-8 (byte {e.start}: {line[e.start:e.start + 1]!r}); save the file as UTF-8")


def _json_records(file: Location) -> Iterator[tuple[int, str, str | None]]:
    """A .json file: an array of records (or an {id: record} mapping, as ASQA ships), or JSON lines."""

    data = file.read_bytes()  # decompressed by pyarrow for .json.gz
    text, error = _decode(data.removeprefix(BOM))
    if error:
        yield 0, text[:10000], error.replace("the line is", "the file is")
        return
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        # Some ".json" files are really JSON lines.
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield i, line, None
        return
    for i, record in enumerate(_array_records(records), 1):
        yield i, _to_json(record), None


def _array_records(data) -> list:
    if isinstance(data, dict):
        # ASQA releases are {"dev": {id: row}} or {id: row}; keep the key as the id.
        values = list(data.values())
        if len(data) == 1 and isinstance(values[0], dict) and all(isinstance(v, dict) for v in values[0].values()):
            data = values[0]
        return [{"id": key, **value} if isinstance(value, dict) and "id" not in value else value
                for key, value in data.items()]
    return data if isinstance(data, list) else [data]


def _table_records(file: Location, kind: str) -> Iterator[tuple[int, str, str | None]]:
    """The rows of a Parquet file or of a Hugging Face dataset's Arrow stream file, as JSON text."""
    import pyarrow.parquet as pq

    if kind == "parquet":
        batches = pq.ParquetFile(file.fs.open_input_file(file.path)).iter_batches(batch_size=RAW_BLOCK_ROWS)
    else:
        batches = pa.ipc.open_stream(file.fs.open_input_stream(file.path))
    position = 0
    for batch in batches:
        for record in batch.to_pylist():
            position += 1
            yield position, _to_json(record), None


def _to_json(record) -> str:
    """JSON text of a record; bytes that are UTF-8 text become strings (some writers store text as binary),
    other bytes a {"$binary": hex} object, which validation rejects as not a string."""
    def default(value):
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return {"$binary": value.hex()}
        return str(value)

    text = json.dumps(record, ensure_ascii=False, default=default)
    return text if _is_text(text) else json.dumps(record, default=default)  # escapes what is not text


def read_raw(path: str | Location, block_rows: int = RAW_BLOCK_ROWS):
    """A Ray Dataset of raw rows (RAW_SCHEMA), read by Ray tasks on the cluster (one per file, or per byte
    range of a large one-record-a-line file), so the input never passes through the driver; blocks of at
    most `block_rows` rows. A block is the unit an actor pool receives and the unit written to Parquet,
    so jobs pass their generation batch size: smaller blocks spread over every generation actor and land
    sooner. Raises InputError at once for a missing input."""
    import ray

    tasks = raw_tasks(path)
    # from_items: the pieces' indices are made on the driver, so no read task competes for CPUs with the
    # actor pools (ray.data.range would take a whole CPU and, on a small node, wait for one forever)
    return ray.data.from_items([{"id": i} for i in range(len(tasks))], override_num_blocks=len(tasks)).map_batches(
        _read_tasks, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"tasks": tasks, "block_rows": block_rows})


def read_parsed(path: str | Location, dataset: str, num_cpus: float):
    """Stages read and parse of a job's chain: `read_raw`, then `parse_batch` on each block (batch_size=None:
    a block stays a block; a read task's rows come as one block). `num_cpus` per parse task."""
    return read_raw(path).map_batches(parse_batch, batch_format="pyarrow", batch_size=None,
                                      fn_kwargs={"dataset": dataset}, num_cpus=num_cpus)


def _read_tasks(batch: pa.Table, tasks: list[tuple], block_rows: int) -> Iterator[pa.Table]:
    """Stage `read` (a task per input piece): reads id (the piece's index in `tasks`: kind, file, source,
    start, end); yields raw rows."""
    for i in batch.column("id").to_pylist():
        yield from read_task(*tasks[i], block_rows=block_rows)


def raw_block(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return pa.table([pa.array(col, field.type) for col, field in zip(columns, RAW_SCHEMA)], schema=RAW_SCHEMA)


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
        except RecursionError:
            raise RowError("invalid_json", "the record is nested too deeply to read (thousands of levels)") from None
        return record
    if "\t" in text:
        return _dpr_topics_line(text)
    if text in ("[", "[{"):
        raise RowError("not_an_object", "this line opens a JSON array: the file is one pretty-printed JSON array, "
                                         "not JSON lines; name it .json (arrays are read whole) or write one object per line")
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
            elif math.isinf(score):
                raise RowError("bad_ctxs", f"ctxs[{i}].score is {score}; scores must be finite numbers")
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
            if row.get("read_error"):
                raise RowError("invalid_utf8", f"{row['read_error']} (at byte offset {row['line']})")
            try:
                qa = parse_record(load_record(raw), dataset)
            except UnicodeEncodeError:  # a lone surrogate reached the derived id's hash
                raise RowError("invalid_text", "a field holds a lone UTF-16 surrogate (such as \\ud800), which is "
                                               "not text; fix the escape") from None
            _check_text(qa)
            qa.update(ctxs_source="given" if qa["ctxs"] else None, reject_stage=None, reject_reason=None,
                      reject_detail=None)
        except RowError as e:
            qa = {"id": _best_effort_id(raw), "dataset": _best_effort_dataset(raw, dataset), "question": None,
                  "answers": None, "qa_pairs": None, "ctxs": None, "ctxs_source": None,
                  "reject_stage": "validate", "reject_reason": e.reason, "reject_detail": e.detail}
        qa.update(source=row["source"], line=row["line"], original=safe_text(raw))
        out.append(qa)
    return pa.Table.from_pylist(out, schema=FLIGHT_SCHEMA)


def _check_text(qa: dict) -> None:
    """Every string of a QA row is writable text: no lone surrogate (a "\\ud800" escape in the JSON) and
    no NUL character."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for text in strings(qa):
        if "\x00" in text:
            raise RowError("invalid_text", "a field holds a NUL character (\\u0000); remove it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RowError("invalid_text", "a field holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                           "text; fix the escape") from None


def _best_effort_id(raw: str) -> str:
    try:
        record = json.loads(raw)
        rid = record.get("id") if isinstance(record, dict) else None
        if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "" and _is_text(str(rid)):
            return str(rid)
    except (ValueError, RecursionError, AttributeError):
        pass
    return raw_id(safe_text(raw))


def _best_effort_dataset(raw: str, dataset: str) -> str:
    try:
        record = json.loads(raw)
        if isinstance(record, dict) and isinstance(record.get("dataset"), str) and _is_text(record["dataset"]):
            return record["dataset"]
    except (ValueError, RecursionError):
        pass
    return dataset


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
        return "\x00" not in value
    except UnicodeEncodeError:
        return False


def safe_text(value: str) -> str:
    """`value` as writable UTF-8 text (a lone surrogate becomes a backslash escape)."""
    return value if _is_text(value) else value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _nullable(name: str, column: str) -> pa.Field:
    return schemas.field(name, column).with_nullable(True).remove_metadata()


# The columns every in-flight row carries from parsing on; later stages add theirs.
FLIGHT_SCHEMA = pa.schema(
    [_nullable("qa", c) for c in schemas.columns("qa")]
    + [pa.field("ctxs_source", pa.string()), pa.field("source", pa.string()), pa.field("line", pa.int64()),
       pa.field("original", pa.string()), pa.field("reject_stage", pa.string()),
       pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string())]
)
