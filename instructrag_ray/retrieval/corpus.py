"""Passage corpora: read every common layout into `{id, title, text}` passages, and vet them.

`read_corpus` reads JSONL (ours, or FlashRAG's `{id, contents}`), Parquet and DPR's psgs_w100.tsv;
`checked_passages` is every backend's one definition of a passage that cannot be indexed.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InputError
from ..storage import Location, location

CORPUS_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet", ".tsv", ".tsv.gz")
DUPLICATE_ID = "duplicate id (the first one is indexed)"


def read_corpus(path: str | Path | Location) -> Iterator[dict]:
    """Passages `{"id", "title", "text"}` from a corpus file (a local path or a URI), in file order.

    Layouts, chosen by the extension and, for JSONL, the first record:
    - `.jsonl[.gz]` with `id`, `title`, `text` (title may be absent);
    - `.jsonl[.gz]` in the FlashRAG / pyserini layout `{"id", "contents"}` where contents is
      '"Title"\\ntext' (the first line, without one pair of surrounding quotes, is the title; a
      contents without a newline is all text);
    - `.parquet` with columns `id`, `title`, `text` (or `id`, `contents`);
    - `.tsv[.gz]`, DPR's `psgs_w100.tsv`: a header naming `id`, `text`, `title`, CSV-quoted
      fields (read with the csv module, tab-delimited, as DPR does).

    A directory is read as all its files with these extensions (recursively, in sorted path order);
    each file's layout is detected on its own.

    A bad passage never raises: it is yielded as `{"id": <id or None>, "_reject": "<reason>"}`
    (the reason names the line or row, and the file when reading a directory) so the caller can
    count and write it. Integer ids become strings; a missing or null title becomes "". A file that
    is not a corpus at all (unknown extension, a TSV or Parquet file without the needed columns)
    raises InputError, and so does a missing path or a directory without corpus files.
    """
    loc = location(path, "corpus")
    if loc.is_dir():
        files = loc.files(CORPUS_EXTENSIONS, recursive=True)
        if not files:
            raise InputError(f"corpus directory {loc.uri} holds no {', '.join(CORPUS_EXTENSIONS)} files")
        # checks every extension first
        readers = [_file_reader(f, f"{f.path[len(loc.path):].lstrip('/')} ") for f in files]
        return (passage for reader in readers for passage in reader)
    if not loc.is_file():
        raise InputError(f"corpus file {loc.uri} does not exist")
    return _file_reader(loc, "")


def _file_reader(path: Location, prefix: str) -> Iterator[dict]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, prefix)
    if name.endswith((".tsv", ".tsv.gz")):
        return _read_dpr_tsv(path, prefix)
    if name.endswith(".parquet"):
        return _read_parquet(path, prefix)
    raise InputError(f"corpus file {path}: unknown extension; supported: {', '.join(CORPUS_EXTENSIONS)}")


def _open_text(path: Location) -> io.TextIOBase:
    # pyarrow decompresses a .gz stream itself (compression is detected from the file name)
    return io.TextIOWrapper(path.fs.open_input_stream(path.path), encoding="utf-8", newline="")


def _read_jsonl(path: Location, prefix: str) -> Iterator[dict]:
    contents_layout: bool | None = None  # decided by the first JSON object
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{prefix}line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield _reject(None, f"{where}: not valid JSON ({e.msg})", line.rstrip("\n"))
                continue
            if not isinstance(record, dict):
                yield _reject(None, f"{where}: not a JSON object", line.rstrip("\n"))
                continue
            if contents_layout is None:
                contents_layout = "contents" in record and "text" not in record
            yield _from_contents(record, where) if contents_layout else clean_passage(record, where)


def _read_parquet(path: Location, prefix: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path.fs.open_input_file(path.path))
    names = set(pf.schema_arrow.names)
    if "id" not in names or not ({"text", "contents"} & names):
        raise InputError(f"corpus file {path}: Parquet columns {sorted(names)} lack id and text (or id and contents)")
    contents_layout = "text" not in names
    columns = ["id", "contents"] if contents_layout else ["id", "text"] + (["title"] if "title" in names else [])
    row_no = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        for record in batch.to_pylist():
            row_no += 1
            where = f"{prefix}row {row_no}"
            yield _from_contents(record, where) if contents_layout else clean_passage(record, where)


def _read_dpr_tsv(path: Location, prefix: str) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)  # a passage can exceed csv's 128 KiB field default
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or not {"id", "text", "title"} <= set(header):
            raise InputError(f"corpus file {path}: the first line must be a header naming id, text and title "
                             f"(DPR psgs_w100.tsv: 'id<TAB>text<TAB>title'), got {header!r}")
        columns = {name: header.index(name) for name in ("id", "text", "title")}
        for row in reader:
            where = f"{prefix}line {reader.line_num}"
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                yield _reject(row[0] if row else None, f"{where}: {len(row)} columns, the header has {len(header)}",
                              "\t".join(row))
                continue
            yield clean_passage({name: row[i] for name, i in columns.items()}, where)


def _from_contents(record: dict, where: str) -> dict:
    contents = record.get("contents")
    if not isinstance(contents, str):
        reason = "no contents" if contents is None else f"contents is {type(contents).__name__}, not a string"
        return _reject(_id_or_none(record), f"{where}: {reason}", _text(record))
    title, newline, text = contents.partition("\n")
    if not newline:
        title, text = "", contents
    elif len(title) >= 2 and title.startswith('"') and title.endswith('"'):
        title = title[1:-1]
    return clean_passage({"id": record.get("id"), "title": title, "text": text}, where)


def clean_passage(record: dict, where: str) -> dict:
    """A passage {"id", "title", "text"} with string values, or a reject dict."""
    pid = record.get("id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid.strip():
        reason = "no id" if pid is None or pid == "" else f"id {pid!r} is not a non-empty string or integer"
        return _reject(None, f"{where}: {reason}", _text(record))
    title = record.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        return _reject(pid, f"{where}: title is {type(title).__name__}, not a string", _text(record))
    text = record.get("text")
    if text is None:
        return _reject(pid, f"{where}: no text", _text(record))
    if not isinstance(text, str):
        return _reject(pid, f"{where}: text is {type(text).__name__}, not a string", _text(record))
    if not text.strip():
        return _reject(pid, f"{where}: text is empty", _text(record))
    return {"id": pid, "title": title, "text": text}


def _id_or_none(record: dict) -> str | None:
    pid = record.get("id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        return str(pid)
    return pid if isinstance(pid, str) else None


def _reject(pid: str | None, reason: str, original: str) -> dict:
    return {"id": pid, "_reject": reason, "_original": original}


def _text(record) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def checked_passages(passages: Iterable[dict]) -> Iterator[dict]:
    """The passages an index may hold, in order, each backend's one definition of a bad passage.

    Yields `{"id", "title", "text"}` (string values) for a good passage and
    `{"id", "_reject": reason, "_code": code, "_original": text}` for one that cannot be indexed
    (`_original` is the record as read, kept for the rejected/ table): a reject from
    `read_corpus` or a record failing the same checks (code "invalid_passage"), or a repeated id
    (code "duplicate_id"; the first passage with the id is kept; Elasticsearch would silently
    overwrite it). Keeps a set of the ids seen: about 100 bytes per passage.
    """
    seen: set[str] = set()
    for n, record in enumerate(passages, start=1):
        if not isinstance(record, dict):
            yield {"id": None, "_reject": f"passage {n}: not a dict", "_code": "invalid_passage",
                   "_original": _text(record)}
            continue
        if "_reject" in record:
            yield {"id": record.get("id"), "_reject": record["_reject"], "_code": "invalid_passage",
                   "_original": record.get("_original", "")}
            continue
        passage = clean_passage(record, f"passage {n}")
        if "_reject" in passage:
            yield {**passage, "_code": "invalid_passage"}
        elif passage["id"] in seen:
            yield {"id": passage["id"], "_reject": f"passage {n}: {DUPLICATE_ID}", "_code": "duplicate_id",
                   "_original": _text(record)}
        else:
            seen.add(passage["id"])
            yield passage
