"""Retrieve passages for questions: BM25 over title and text, behind a two-method interface.

`Retriever` is the interface the pipeline uses (`search`, `batch_search`, returning our own `Hit`s);
`make_retriever` builds the configured backend. `TantivyRetriever` is the embedded backend: a
memory-mapped tantivy index built by `build_tantivy_index` (run by `jobs/build_index.py`) from the
passages `read_corpus` reads and `checked_passages` vets. `elastic.ElasticsearchRetriever` is the
Elasticsearch backend (imported only when chosen); it sends the query described below, so that both
backends rank alike.

The query (one definition for every backend)
--------------------------------------------
Question text is never given to a query parser (tantivy's parser raises on "what's", parentheses,
quotes, a bare AND/OR/NOT and `word:word`). It is analysed into terms with `analyze` and the query is
built from the terms, the way an Elasticsearch `match` query does it:

    bool.should(                                       # field scores add (multi_match most_fields)
        boost(bool.should(term(f, t1), term(f, t2), ..., term(f, tn)), boost_f)
        for each field f in fields                     # e.g. {"title": 1.0, "text": 1.0}
    )

- `t1..tn` are `analyze(question)` in order, duplicates kept: a term that occurs twice in the
  question is two clauses and counts twice (Lucene merges equal SHOULD clauses by adding their
  boosts, which scores the same).
- No clause is required (OR semantics, minimum_should_match unset); a document's score is the sum,
  over fields, of boost_f times the sum of BM25(t, f) over the clauses it matches.
- A question that analyses to no term returns [] and is not an error.
- BM25 is Lucene's, k1=1.2, b=0.75: idf = ln(1 + (N - n + 0.5) / (n + 0.5)),
  tf = f / (f + k1 * (1 - b + b * dl / avgdl)), with dl decoded from a one-byte length norm.

In Elasticsearch terms, for fields "title^0.5,text" and a question analysing to [t1, t2]:

    {"bool": {"should": [
        {"bool": {"should": [{"term": {"title": "t1"}}, {"term": {"title": "t2"}}], "boost": 0.5}},
        {"bool": {"should": [{"term": {"text": "t1"}},  {"term": {"text": "t2"}}],  "boost": 1.0}}]}}

(the same as one `match` per field when the field's analyzer equals `analyze`; sending `term`
clauses built from `analyze` makes the query side identical by construction).

The analyzer is tantivy's "default": split on every character that is not alphanumeric (Unicode,
Rust's `char::is_alphanumeric`), drop tokens of 40 bytes or more (UTF-8), lower-case. It has no
stop words, so "the of" is a real query. Elasticsearch's `standard` analyzer differs ("don't" and
"3.14" stay one token there), so the Elasticsearch index must define a matching analyzer.

Known score differences between the backends (ranking is the same where statistics agree):
- tantivy multiplies every term score by (k1 + 1) = 2.2; Lucene >= 8 (Elasticsearch >= 7) does
  not. Scores are comparable only up to that constant.
- tantivy's N and avgdl count every document in the index; Lucene's count only the documents that
  have the field. They differ for `title` when some passages have an empty title.

Ties are ordered by score, descending, then by passage id (Python string order), so results do not
depend on how tantivy split the index into segments; an Elasticsearch backend sorts by
`["_score", {"id": "asc"}]` for the same order.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

SEARCHABLE_FIELDS = ("title", "text")
CORPUS_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet", ".tsv", ".tsv.gz")
# tantivy refuses an indexing thread with less memory than this (tantivy 0.22+).
_MIN_HEAP_PER_THREAD = 15_000_000
# tantivy's "default" analyzer drops tokens whose UTF-8 length is >= this.
_MAX_TOKEN_BYTES = 40
DUPLICATE_ID = "duplicate id (the first one is indexed)"


# --- our types and the interface ------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float


@dataclass(frozen=True)
class QueryFailure:
    """One query of a batch failed; only its row is rejected."""

    reason: str


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[Hit]: ...

    def batch_search(self, queries: list[str], k: int) -> list[list[Hit] | QueryFailure]: ...


# --- fields ---------------------------------------------------------------------------------------


def parse_fields(spec: str | list[str]) -> dict[str, float]:
    """Fields and boosts to search: "title^0.5,text" or ["title^0.5", "text"] -> {"title": 0.5, "text": 1.0}.

    Raises ValueError naming the bad part: an unknown field (allowed: title, text), a repeated
    field, a boost that is not a positive finite number, or an empty spec.
    """
    if isinstance(spec, str):
        parts = spec.split(",")
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        raise ValueError(f"fields must be a string like 'title^0.5,text' or a list of such parts, got {type(spec).__name__}")
    fields: dict[str, float] = {}
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"fields spec {spec!r}: each part must be a string like 'title^0.5', got {part!r}")
        part = part.strip()
        if not part:
            raise ValueError(f"fields spec {spec!r} has an empty part; write e.g. 'title^0.5,text'")
        name, caret, boost_text = part.partition("^")
        name = name.strip()
        boost = 1.0
        if caret:
            try:
                boost = float(boost_text)
            except ValueError:
                raise ValueError(f"fields spec {spec!r}: boost {boost_text.strip()!r} of {name!r} is not a number") from None
        if name in fields:
            raise ValueError(f"fields spec {spec!r} names {name!r} twice")
        fields[name] = boost
    if not fields:
        raise ValueError(f"fields spec {spec!r} names no field; allowed: {', '.join(SEARCHABLE_FIELDS)}")
    return _check_fields(fields, spec)


def _check_fields(fields: dict[str, float], spec: Any) -> dict[str, float]:
    for name, boost in fields.items():
        if name not in SEARCHABLE_FIELDS:
            raise ValueError(f"fields spec {spec!r}: unknown field {name!r}; allowed: {', '.join(SEARCHABLE_FIELDS)}")
        if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not math.isfinite(boost) or boost <= 0:
            raise ValueError(f"fields spec {spec!r}: boost of {name!r} must be a positive finite number, got {boost!r}")
    return {name: float(boost) for name, boost in fields.items()}


# --- analysis -------------------------------------------------------------------------------------

_ANALYZER = None


def analyze(text: str) -> list[str]:
    """The terms of `text` under tantivy's "default" analyzer, in order, duplicates kept.

    Built from tantivy's own pieces (SimpleTokenizer, RemoveLongFilter(40), LowerCaser: the
    definition of "default" in tantivy's tokenizer manager), so query terms equal indexed terms.
    """
    global _ANALYZER
    if _ANALYZER is None:
        import tantivy

        _ANALYZER = (
            tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(_MAX_TOKEN_BYTES))
            .filter(tantivy.Filter.lowercase())
            .build()
        )
    return _ANALYZER.analyze(text)


# --- corpus ---------------------------------------------------------------------------------------


def read_corpus(path: str | Path) -> Iterator[dict]:
    """Passages `{"id", "title", "text"}` from a corpus file, in file order.

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
    raises ValueError; a missing path or a directory without corpus files raises FileNotFoundError.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(CORPUS_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"corpus directory {path} holds no {', '.join(CORPUS_EXTENSIONS)} files")
        readers = [_file_reader(f, f"{f.relative_to(path)} ") for f in files]  # checks every extension first
        return (passage for reader in readers for passage in reader)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return _file_reader(path, "")


def _file_reader(path: Path, prefix: str) -> Iterator[dict]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path, prefix)
    if name.endswith((".tsv", ".tsv.gz")):
        return _read_dpr_tsv(path, prefix)
    if name.endswith(".parquet"):
        return _read_parquet(path, prefix)
    raise ValueError(f"corpus file {path}: unknown extension; supported: {', '.join(CORPUS_EXTENSIONS)}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_jsonl(path: Path, prefix: str) -> Iterator[dict]:
    contents_layout: bool | None = None  # decided by the first JSON object
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{prefix}line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield _reject(None, f"{where}: not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                yield _reject(None, f"{where}: not a JSON object")
                continue
            if contents_layout is None:
                contents_layout = "contents" in record and "text" not in record
            yield _from_contents(record, where) if contents_layout else _clean_passage(record, where)


def _read_parquet(path: Path, prefix: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if "id" not in names or not ({"text", "contents"} & names):
        raise ValueError(f"corpus file {path}: Parquet columns {sorted(names)} lack id and text (or id and contents)")
    contents_layout = "text" not in names
    columns = ["id", "contents"] if contents_layout else ["id", "text"] + (["title"] if "title" in names else [])
    row_no = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        for record in batch.to_pylist():
            row_no += 1
            where = f"{prefix}row {row_no}"
            yield _from_contents(record, where) if contents_layout else _clean_passage(record, where)


def _read_dpr_tsv(path: Path, prefix: str) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)  # a passage can exceed csv's 128 KiB field default
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or not {"id", "text", "title"} <= set(header):
            raise ValueError(f"corpus file {path}: the first line must be a header naming id, text and title "
                             f"(DPR psgs_w100.tsv: 'id<TAB>text<TAB>title'), got {header!r}")
        columns = {name: header.index(name) for name in ("id", "text", "title")}
        for row in reader:
            where = f"{prefix}line {reader.line_num}"
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                yield _reject(row[0] if row else None, f"{where}: {len(row)} columns, the header has {len(header)}")
                continue
            yield _clean_passage({name: row[i] for name, i in columns.items()}, where)


def _from_contents(record: dict, where: str) -> dict:
    contents = record.get("contents")
    if not isinstance(contents, str):
        reason = "no contents" if contents is None else f"contents is {type(contents).__name__}, not a string"
        return _reject(_id_or_none(record), f"{where}: {reason}")
    title, newline, text = contents.partition("\n")
    if not newline:
        title, text = "", contents
    elif len(title) >= 2 and title.startswith('"') and title.endswith('"'):
        title = title[1:-1]
    return _clean_passage({"id": record.get("id"), "title": title, "text": text}, where)


def _clean_passage(record: dict, where: str) -> dict:
    """A passage {"id", "title", "text"} with string values, or a reject dict."""
    pid = record.get("id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid.strip():
        reason = "no id" if pid is None or pid == "" else f"id {pid!r} is not a non-empty string or integer"
        return _reject(None, f"{where}: {reason}")
    title = record.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        return _reject(pid, f"{where}: title is {type(title).__name__}, not a string")
    text = record.get("text")
    if text is None:
        return _reject(pid, f"{where}: no text")
    if not isinstance(text, str):
        return _reject(pid, f"{where}: text is {type(text).__name__}, not a string")
    if not text.strip():
        return _reject(pid, f"{where}: text is empty")
    return {"id": pid, "title": title, "text": text}


def _id_or_none(record: dict) -> str | None:
    pid = record.get("id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        return str(pid)
    return pid if isinstance(pid, str) else None


def _reject(pid: str | None, reason: str) -> dict:
    return {"id": pid, "_reject": reason}


# --- index ----------------------------------------------------------------------------------------


def _schema():
    import tantivy

    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    # BM25 needs term frequencies and field lengths only; positions (for phrase queries, which we
    # never run) made the inverted index 55% larger (the whole index 20%) on 7k Wikipedia passages.
    sb.add_text_field("title", stored=True, tokenizer_name="default", index_option="freq")
    sb.add_text_field("text", stored=True, tokenizer_name="default", index_option="freq")
    return sb.build()


def checked_passages(passages: Iterable[dict]) -> Iterator[dict]:
    """The passages an index may hold, in order, each backend's one definition of a bad passage.

    Yields `{"id", "title", "text"}` (string values) for a good passage and
    `{"id", "_reject": reason, "_code": code}` for one that cannot be indexed: a reject from
    `read_corpus` or a record failing the same checks (code "invalid_passage"), or a repeated id
    (code "duplicate_id"; the first passage with the id is kept; Elasticsearch would silently
    overwrite it). Keeps a set of the ids seen: about 100 bytes per passage.
    """
    seen: set[str] = set()
    for n, record in enumerate(passages, start=1):
        if not isinstance(record, dict):
            yield {"id": None, "_reject": f"passage {n}: not a dict", "_code": "invalid_passage"}
            continue
        if "_reject" in record:
            yield {"id": record.get("id"), "_reject": record["_reject"], "_code": "invalid_passage"}
            continue
        passage = _clean_passage(record, f"passage {n}")
        if "_reject" in passage:
            yield {**passage, "_code": "invalid_passage"}
        elif passage["id"] in seen:
            yield {"id": passage["id"], "_reject": f"passage {n}: {DUPLICATE_ID}", "_code": "duplicate_id"}
        else:
            seen.add(passage["id"])
            yield passage


def build_tantivy_index(passages: Iterable[dict], index_dir: str | Path, *, heap_mb: int = 256,
                        overwrite: bool = False) -> dict:
    """Index passages into a tantivy index at `index_dir`; returns {"indexed": n, "rejected": [...]}.

    `passages` are dicts {"id", "title", "text"}, e.g. from `read_corpus`; what `checked_passages`
    rejects (reject dicts, no text, non-string fields, a repeated id: the first passage with the id
    is kept) is not indexed but listed as {"id", "reason"}. The index is built in a sibling temporary
    directory and moved into place when committed, so a failed build leaves no half index.

    Refuses (FileExistsError) an existing non-empty `index_dir` unless `overwrite`; even then it
    only replaces a directory that holds a tantivy index. `heap_mb` is the indexing memory, split
    over up to 8 threads of at least 15 MB each.
    """
    import tantivy

    index_dir = Path(index_dir)
    if heap_mb * 1_000_000 < _MIN_HEAP_PER_THREAD:
        raise ValueError(f"heap_mb={heap_mb}: tantivy needs at least {_MIN_HEAP_PER_THREAD // 1_000_000} MB")
    if index_dir.exists():
        if not index_dir.is_dir():
            raise FileExistsError(f"index_dir {index_dir} exists and is not a directory")
        if any(index_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"index_dir {index_dir} is not empty; pass overwrite=True "
                                      "(jobs/build_index.py overwrite=true) to replace the index there")
            if not (index_dir / "meta.json").is_file():
                raise FileExistsError(f"index_dir {index_dir} is not empty and holds no tantivy index (no meta.json); "
                                      "refusing to delete it, choose another directory")
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.building-", dir=index_dir.parent))
    writer = index = None
    try:
        heap = heap_mb * 1_000_000
        threads = max(1, min(os.cpu_count() or 1, 8, heap // _MIN_HEAP_PER_THREAD))
        index = tantivy.Index(_schema(), path=str(tmp_dir), reuse=False)
        writer = index.writer(heap_size=heap, num_threads=threads)
        indexed = 0
        rejected: list[dict] = []
        for passage in checked_passages(passages):
            if "_reject" in passage:
                rejected.append({"id": passage["id"], "reason": passage["_reject"]})
                continue
            writer.add_document(tantivy.Document(id=passage["id"], title=passage["title"], text=passage["text"]))
            indexed += 1
        writer.commit()
        writer.wait_merging_threads()
        if index_dir.exists():
            shutil.rmtree(index_dir)
        os.replace(tmp_dir, index_dir)
    except BaseException:
        # Drop the writer first: while alive, its threads hold (and may still create) files there.
        writer = index = None  # noqa: F841
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return {"indexed": indexed, "rejected": rejected}


# --- search ---------------------------------------------------------------------------------------


def make_retriever(backend: str, *, index_path: str = "", fields: dict[str, float] | str = "title,text",
                   es_cluster=None, es_index: str = "", es_max_concurrent_searches: int = 8,
                   es_search_type: str = "query_then_fetch") -> Retriever:
    """The configured backend: "tantivy" (the index at `index_path`) or "elasticsearch" (`es_index` on
    the cluster `es_cluster`, an `elastic.Cluster`; the client is imported only here)."""
    if backend == "tantivy":
        return TantivyRetriever(index_path, fields=fields)
    if backend == "elasticsearch":
        from .elastic import ElasticsearchRetriever

        return ElasticsearchRetriever(es_cluster, es_index, fields, max_concurrent_searches=es_max_concurrent_searches,
                                      search_type=es_search_type)
    raise ValueError(f"unknown retrieval backend {backend!r}; allowed: tantivy, elasticsearch")


class TantivyRetriever:
    """BM25 search over a tantivy index built by `build_tantivy_index` (see the module docstring
    for the exact query and tie order).

    The index is opened once, memory-mapped: several retrievers, in one process or many (Ray
    actors on a node), share one copy of the index in the page cache. It pickles as (index_dir,
    fields) and reopens on the other side.
    """

    def __init__(self, index_dir: str | Path, fields: dict[str, float] | str | list[str] = "title,text"):
        import tantivy

        self.index_dir = Path(index_dir)
        self.fields = _check_fields(dict(fields), fields) if isinstance(fields, dict) else parse_fields(fields)
        if not (self.index_dir / "meta.json").is_file():
            raise FileNotFoundError(f"no tantivy index at {self.index_dir} (no meta.json there); build one with "
                                    f"`python jobs/build_index.py` and point retrieval.index_path at it")
        self._tantivy = tantivy
        index = tantivy.Index.open(str(self.index_dir))
        self._schema = index.schema
        self._searcher = index.searcher()  # the index is never written after the build
        for name in self.fields:
            try:
                tantivy.Query.term_query(self._schema, name, "x")
            except ValueError:
                raise ValueError(f"the index at {self.index_dir} has no field {name!r}; "
                                 "was it built by build_tantivy_index?") from None

    def __reduce__(self):
        return (TantivyRetriever, (str(self.index_dir), dict(self.fields)))

    @property
    def num_docs(self) -> int:
        return self._searcher.num_docs

    def _query(self, question: str):
        """The tantivy query for `question` (None when it analyses to no term)."""
        t = self._tantivy
        terms = analyze(question)
        if not terms:
            return None
        per_field = []
        for name, boost in self.fields.items():
            clauses = [(t.Occur.Should, t.Query.term_query(self._schema, name, term, index_option="freq"))
                       for term in terms]
            per_field.append((t.Occur.Should, t.Query.boost_query(t.Query.boolean_query(clauses), boost)))
        return t.Query.boolean_query(per_field)

    def search(self, query: str, k: int) -> list[Hit]:
        """The top `k` passages for `query`, by BM25 score descending, ties by id ascending."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        _check_k(k)
        tantivy_query = self._query(query)
        if tantivy_query is None:
            return []
        # tantivy breaks ties by segment and doc address, which depend on indexing threads; ask for
        # more hits until the k-th score's tie group is complete, then order ties by id.
        limit = k + 1
        while True:
            hits = self._searcher.search(tantivy_query, limit, count=False).hits
            if len(hits) < limit or hits[-1][0] != hits[k - 1][0]:
                break
            limit *= 2
        if not hits:
            return []
        cutoff = hits[min(k, len(hits)) - 1][0]
        found = []
        for score, address in hits:
            if score < cutoff:
                break
            doc = self._searcher.doc(address)
            found.append(Hit(id=doc.get_first("id"), title=doc.get_first("title") or "",
                             text=doc.get_first("text") or "", score=float(score)))
        found.sort(key=lambda h: (-h.score, h.id))
        return found[:k]

    def batch_search(self, queries: list[str], k: int) -> list[list[Hit] | QueryFailure]:
        """`search` for each query; a query that fails becomes a QueryFailure and the rest go on.

        A plain loop: a search takes about 0.1 ms on a corpus of a few thousand passages, and a
        thread pool over batches gave no consistent gain (benchmarks/retrieval.py prints both).
        """
        _check_k(k)
        results: list[list[Hit] | QueryFailure] = []
        for query in queries:
            try:
                results.append(self.search(query, k))
            except Exception as e:  # noqa: BLE001 - one bad query rejects its row, not the batch
                results.append(QueryFailure(f"{type(e).__name__}: {e}"))
        return results


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
