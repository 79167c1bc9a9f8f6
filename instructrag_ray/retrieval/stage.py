"""Stage `retrieve` of the synthesis and evaluation chains, and the driver's checks before it runs.

`retrieve(ds, r)` adds the stage to a Ray Data chain with the resources of `retrieval.*`; it is the one
place that builds a retriever for a job. `check_retrieval` runs on the driver first, so that a missing
index or an unreachable cluster is one line before any work.
"""

from __future__ import annotations

import pyarrow as pa

from ..config import RetrievalConfig, parse_resources
from ..errors import ConfigError, InputError
from ..rows import ok_rows, reject, require
from .base import QueryFailure, Retriever, parse_fields


def make_retriever(backend: str, *, index_path: str = "", fields: dict[str, float] | str = "title,text",
                   es_cluster=None, es_index: str = "", es_max_concurrent_searches: int = 8,
                   es_search_type: str = "query_then_fetch") -> Retriever:
    """The configured backend: "tantivy" (the index at `index_path`) or "elasticsearch" (`es_index` on
    the cluster `es_cluster`, an `elastic.client.Cluster`; the client is imported only here)."""
    if backend == "tantivy":
        from .tantivy_index import TantivyRetriever

        return TantivyRetriever(index_path, fields=fields)
    if backend == "elasticsearch":
        from .elastic.search import ElasticsearchRetriever

        return ElasticsearchRetriever(es_cluster, es_index, fields, max_concurrent_searches=es_max_concurrent_searches,
                                      search_type=es_search_type)
    raise ValueError(f"unknown retrieval backend {backend!r}; allowed: tantivy, elasticsearch")


class RetrieveStage:
    """Stage `retrieve` (actor; the index is opened, or the Elasticsearch client made, once): reads
    question, ctxs; fills ctxs and ctxs_source='retrieved' for rows without ctxs, searching `batch_size`
    questions at a time (one msearch each). Rows that arrived
    with ctxs pass untouched; a failed or empty search rejects only its row (stage retrieve); a
    cluster that stops answering stops the job (ClusterUnavailable) so that a rerun resumes those rows
    instead of rejecting them."""

    def __init__(self, top_k: int, batch_size: int, **retriever_options):
        self.retriever = make_retriever(**retriever_options)
        self.top_k = top_k
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, "retrieve", "question", "ctxs")
        rows = batch.to_pylist()
        todo = [i for i in ok_rows(rows) if rows[i]["ctxs"] is None]
        questions = [rows[i]["question"] for i in todo]
        results = [hits for start in range(0, len(questions), self.batch_size)
                   for hits in self.retriever.batch_search(questions[start:start + self.batch_size], self.top_k)]
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


def retriever_options(r: RetrievalConfig) -> dict:
    """make_retriever's keyword arguments for the configured backend (plain values that pickle to actors)."""
    options = {"backend": r.backend, "index_path": r.index_path, "fields": r.fields}
    if r.backend == "elasticsearch":
        from .elastic.client import es_connection

        options.update(es_cluster=es_connection(r, "retrieval.es_"), es_index=r.es_index,
                       es_max_concurrent_searches=r.es_max_concurrent_searches, es_search_type=r.es_search_type)
    return options


def check_retrieval(r: RetrievalConfig, rows_without_ctxs: int, alternative: str = "") -> None:
    """Before any work: rows without ctxs need an index to search, and that index must serve them
    (tantivy: it exists; Elasticsearch: reachable, TLS, credentials, versions, index and mapping)."""
    if not rows_without_ctxs:
        return
    try:
        parse_fields(r.fields)
    except ValueError as e:
        raise ConfigError(f"config key 'retrieval.fields': {e}") from None
    if r.backend == "tantivy":
        if not r.index_path:
            raise InputError(f"{rows_without_ctxs} rows have no ctxs and retrieval.index_path is not set; build an "
                             "index with jobs/build_index.py and pass retrieval.index_path=DIR, or give the rows "
                             f"pre-retrieved ctxs{alternative}")
        from .tantivy_index import check_index

        check_index(r.index_path)
        return
    from .elastic.client import es_connection, require_client
    from .elastic.index import check_search_index

    require_client()
    check_search_index(es_connection(r, "retrieval.es_"), r.es_index, r.fields)


def index_fingerprint(r: RetrievalConfig) -> str:
    """The content fingerprint of the configured tantivy index ('' when none is set, or for Elasticsearch):
    it goes into the job fingerprints, so a rerun against a rebuilt index is not mixed with the old one."""
    if r.backend != "tantivy" or not r.index_path:
        return ""
    from .tantivy_index import check_index
    from .tantivy_index import index_fingerprint as fingerprint_of

    check_index(r.index_path)
    return fingerprint_of(r.index_path)


def retrieve(ds, r: RetrievalConfig):
    """Add stage `retrieve` to the chain `ds`: an autoscaling actor pool of retrieval.min/max_actors. A
    block stays a block (batch_size=None; Ray Data would merge smaller blocks up to a batch): the stage
    searches it retrieval.batch_size questions at a time (one msearch each)."""
    import ray

    resources = parse_resources(r.resources, "retrieval.resources")
    return ds.map_batches(
        RetrieveStage, batch_format="pyarrow", batch_size=None, num_cpus=r.num_cpus,
        **({"resources": resources} if resources else {}),
        compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
        fn_constructor_kwargs={"top_k": r.top_k, "batch_size": r.batch_size, **retriever_options(r)})
