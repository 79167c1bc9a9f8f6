"""The embedded BM25 backend: a tantivy index (Lucene's BM25) built from a corpus, searched in process.

The index is memory-mapped, so every retrieval actor on a node shares one copy in the page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError, OutputConflict
from ..storage import Location, directory_fingerprint, location, node_local_copy
from .base import Hit, QueryFailure, analyze, check_fields, check_k, parse_fields
from .corpus import checked_passages

# tantivy refuses an indexing thread with less memory than this (tantivy 0.22+).
_MIN_HEAP_PER_THREAD = 15_000_000


INDEX_META = "instructrag_index.json"  # written last by a build: the content fingerprint and counts


def check_index(index_dir: str | Location) -> None:
    """Raise InputError unless `index_dir` (a local directory or a URI) holds a tantivy index."""
    loc = location(index_dir, "retrieval.index_path")
    if not (loc / "meta.json").is_file():
        raise InputError(f"no tantivy index at {loc.uri} (no meta.json there); build one with "
                         "`python jobs/build_index.py --corpus PASSAGES --index DIR` and pass retrieval.index_path=DIR")


def index_fingerprint(index_dir: str | Location) -> str:
    """The content fingerprint recorded by the build (an index built before builds recorded one, when
    local, is hashed now; '' for such an index at a URI)."""
    loc = location(index_dir, "retrieval.index_path")
    meta = loc / INDEX_META
    if meta.is_file():
        return json.loads(meta.read_text())["fingerprint"]
    return content_fingerprint(Path(loc.path)) if loc.local else ""


def local_index(index_dir: str | Location) -> Path:
    """A local directory with the index: itself when local; else a copy on this node's disk, made once
    (storage.node_local_copy) and checked against the fingerprint its build recorded."""
    loc = location(index_dir, "retrieval.index_path")
    if loc.local:
        return Path(loc.path)
    check_index(loc)
    expected = index_fingerprint(loc)
    path = node_local_copy(loc.uri, "indexes", expected)
    if expected and content_fingerprint(path) != expected:
        raise InputError(f"the copy of {loc.uri} on this node does not match the fingerprint its build recorded; "
                         f"delete {path} and rerun, or rebuild the index")
    return path


def content_fingerprint(index_dir: Path) -> str:
    """The fingerprint of an index directory's own files (the build's record and copy markers left out)."""
    return directory_fingerprint(index_dir, skip=(INDEX_META, ".complete"))


def _schema():
    import tantivy

    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    # BM25 needs term frequencies and field lengths only; positions (for phrase queries, which we
    # never run) made the inverted index 55% larger (the whole index 20%) on 7k Wikipedia passages.
    sb.add_text_field("title", stored=True, tokenizer_name="default", index_option="freq")
    sb.add_text_field("text", stored=True, tokenizer_name="default", index_option="freq")
    return sb.build()


def build_tantivy_index(passages: Iterable[dict], index_dir: str | Location, *, heap_mb: int = 256,
                        overwrite: bool = False) -> dict:
    """Index passages into a tantivy index at `index_dir` (a local directory or a URI); returns
    {"indexed": n, "rejected": [...], "fingerprint": ...}.

    `passages` are dicts {"id", "title", "text"}, e.g. from `read_corpus`; what `checked_passages`
    rejects (reject dicts, no text, non-string fields, a repeated id: the first passage with the id is
    kept) is not indexed but listed as checked_passages yields it ({"id", "_reject", "_code",
    "_original"}). The index is built in a temporary local directory, its content fingerprint recorded
    in INDEX_META, then moved (or uploaded) into place, so a failed build leaves no half index.

    Refuses (OutputConflict) an existing non-empty `index_dir` unless `overwrite`; even then it only
    replaces a directory that holds a tantivy index. `heap_mb` is the indexing memory, split over up to
    8 threads of at least 15 MB each.
    """
    loc = location(index_dir, "index")
    check_target(loc, heap_mb, overwrite)
    if loc.local:
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(loc.path).parent if loc.local else None  # a sibling, so the final move is a rename
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{loc.name}.building-", dir=scratch))
    try:
        stats = _index_passages(passages, tmp_dir, heap_mb)
        stats["fingerprint"] = content_fingerprint(tmp_dir)
        (tmp_dir / INDEX_META).write_text(json.dumps({"fingerprint": stats["fingerprint"],
                                                      "passages": stats["indexed"]}) + "\n")
        if loc.local:
            if Path(loc.path).exists():
                shutil.rmtree(loc.path)
            os.replace(tmp_dir, loc.path)
        else:
            loc.upload_from(tmp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return stats


def check_target(index_dir: str | Location, heap_mb: int, overwrite: bool) -> str:
    """Whether `build_tantivy_index` may build at `index_dir`: "created" or "replaced", else OutputConflict
    (an existing non-empty directory without overwrite, or one that holds no index). Reads only."""
    loc = location(index_dir, "index")
    if heap_mb * 1_000_000 < _MIN_HEAP_PER_THREAD:
        raise InputError(f"heap_mb={heap_mb}: tantivy needs at least {_MIN_HEAP_PER_THREAD // 1_000_000} MB")
    if loc.is_file():
        raise OutputConflict(f"index {loc.uri} exists and is not a directory; choose another --index")
    if not loc.is_dir() or not (loc.files(recursive=True) or loc.subdirs()):
        return "created"
    if not overwrite:
        raise OutputConflict(f"index {loc.uri} is not empty; pass overwrite=true to replace the index "
                             "there, or choose another --index")
    if not (loc / "meta.json").is_file():
        raise OutputConflict(f"index {loc.uri} is not empty and holds no tantivy index (no meta.json); "
                             "refusing to delete it, choose another --index")
    return "replaced"


def _index_passages(passages: Iterable[dict], tmp_dir: Path, heap_mb: int) -> dict:
    import tantivy

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
                rejected.append(passage)
                continue
            writer.add_document(tantivy.Document(id=passage["id"], title=passage["title"], text=passage["text"]))
            indexed += 1
        writer.commit()
        writer.wait_merging_threads()
    finally:
        # Drop the writer first: while alive, its threads hold (and may still create) files there.
        writer = index = None  # noqa: F841
    return {"indexed": indexed, "rejected": rejected}


class TantivyRetriever:
    """BM25 search over a tantivy index built by `build_tantivy_index` (see the module docstring
    for the exact query and tie order).

    The index is opened once, memory-mapped: several retrievers, in one process or many (Ray
    actors on a node), share one copy of the index in the page cache. An index at a URI is first
    copied to the node's local disk, once per node (`local_index`). It pickles as (index_dir, fields)
    and reopens on the other side.
    """

    def __init__(self, index_dir: str | Path, fields: dict[str, float] | str | list[str] = "title,text"):
        import tantivy

        self.source = str(index_dir)  # as configured: a local directory or a URI
        self.fields = check_fields(dict(fields), fields) if isinstance(fields, dict) else parse_fields(fields)
        check_index(self.source)
        self.index_dir = local_index(self.source)
        self._tantivy = tantivy
        index = tantivy.Index.open(str(self.index_dir))
        self._schema = index.schema
        self._searcher = index.searcher()  # the index is never written after the build
        for name in self.fields:
            try:
                tantivy.Query.term_query(self._schema, name, "x")
            except ValueError:
                raise InputError(f"the index at {self.index_dir} has no field {name!r}; "
                                 "was it built by build_tantivy_index?") from None

    def __reduce__(self):
        return (TantivyRetriever, (self.source, dict(self.fields)))

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
        check_k(k)
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
        check_k(k)
        results: list[list[Hit] | QueryFailure] = []
        for query in queries:
            try:
                results.append(self.search(query, k))
            except Exception as e:  # noqa: BLE001 - one bad query rejects its row, not the batch
                results.append(QueryFailure(f"{type(e).__name__}: {e}"))
        return results
