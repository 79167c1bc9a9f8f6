"""Searching the passage index: retrieval/base.py's query in Elasticsearch's DSL, one msearch per batch."""

from __future__ import annotations

import time

from ..base import Hit, QueryFailure, analyze, check_fields, check_k, parse_fields
from .client import RETRY_STATUSES, Cluster, ClusterError, backoff_s, call, error_reason, log
from .index import inspect_index

SORT = ["_score", {"id": "asc"}]  # ties by passage id, as TantivyRetriever orders them
SOURCE = ["id", "title", "text"]


def es_query(question: str, fields: dict[str, float], mode: str = "terms") -> dict | None:
    """retrieval/base.py's query for `question` in Elasticsearch's DSL; None when it analyses to no term.

    mode "terms": per field, a bool.should of one `term` clause per analysed term (duplicates kept),
    boosted; the fields' bool queries are SHOULD clauses of one bool (scores add). mode "match": the
    same with one `match` query per field (for indexes analysed otherwise).
    """
    if mode == "match":
        if not question.strip():
            return None
        return {"bool": {"should": [{"match": {f: {"query": question, "boost": boost}}} for f, boost in fields.items()]}}
    terms = analyze(question)
    if not terms:
        return None
    return {"bool": {"should": [{"bool": {"should": [{"term": {f: t}} for t in terms], "boost": boost}}
                                for f, boost in fields.items()]}}


def search_request(query: dict, k: int) -> dict:
    """One search body: the top k by score, ties by id, with scores, without counting every hit."""
    return {"query": query, "size": k, "sort": SORT, "track_scores": True, "track_total_hits": False,
            "_source": SOURCE}


def _hits(response: dict) -> list[Hit]:
    hits = []
    for h in response["hits"]["hits"]:
        src = h.get("_source") or {}
        score = h.get("_score")
        hits.append(Hit(id=str(src.get("id", h["_id"])), title=src.get("title") or "", text=src.get("text") or "",
                        score=float(score if score is not None else h["sort"][0])))
    return hits


def _failure(cl: Cluster, index: str, response: dict) -> tuple[str, bool] | None:
    """(reason, transient) when one search of an msearch failed or is incomplete; None when it is fine.
    Raises ClusterError for failures that are the cluster's, not the query's (index gone, access)."""
    if "error" in response:
        error = response["error"] if isinstance(response["error"], dict) else {"type": str(response["error"])}
        status = int(response.get("status", 500))
        if status in (401, 403) or error.get("type") == "security_exception":
            raise ClusterError(f"Elasticsearch at {cl.url} refused a search on {index!r} ({status} "
                               f"{error_reason(error)}); check the credentials and their privileges")
        if status == 404 or error.get("type") == "index_not_found_exception":
            raise ClusterError(f"index {index!r} disappeared from {cl.url} during the job ({error_reason(error)}); "
                               f"rebuild it or fix {cl.keys}index, then rerun to resume")
        return f"Elasticsearch: {status} {error_reason(error)}", status in RETRY_STATUSES
    if response.get("timed_out"):
        return "Elasticsearch: the search timed out on the cluster (partial results discarded)", True
    shards = response.get("_shards") or {}
    if shards.get("failed"):
        first = (shards.get("failures") or [{}])[0].get("reason") or {}
        return f"Elasticsearch: {shards['failed']} shard(s) failed ({error_reason(first)})", True
    return None


class QueryError(RuntimeError):
    """One search failed on the cluster (the reason is the server's)."""


class ElasticsearchRetriever:
    """BM25 search over an Elasticsearch index, behind the `Retriever` interface of retrieval/base.py.

    One client per instance (one per Ray actor). `batch_search` sends one `msearch` per batch (the
    cluster runs at most `max_concurrent_searches` of its searches at once); a search that fails marks
    only its query (QueryFailure with the server's reason), after retries when the failure is
    transient; a cluster that stops answering raises ClusterUnavailable once the retries are spent.
    Pickles as its settings and reconnects on the other side.
    """

    def __init__(self, cluster: Cluster, index: str, fields: dict[str, float] | str | list[str] = "title,text", *,
                 max_concurrent_searches: int = 8, search_type: str = "query_then_fetch"):
        if search_type not in ("query_then_fetch", "dfs_query_then_fetch"):
            raise ValueError(f"search_type must be query_then_fetch or dfs_query_then_fetch, got {search_type!r}")
        if not index:
            raise ValueError("index must be an Elasticsearch index or alias name")
        self.cluster, self.index = cluster, index
        self.fields = check_fields(dict(fields), fields) if isinstance(fields, dict) else parse_fields(fields)
        self.max_concurrent_searches, self.search_type = max_concurrent_searches, search_type
        self._client = cluster.client()
        self.query_mode, _ = inspect_index(self._client, cluster, index, self.fields)

    def __reduce__(self):
        return (_reopen, (self.cluster, self.index, dict(self.fields), self.max_concurrent_searches, self.search_type))

    def close(self) -> None:
        self._client.close()

    def query(self, question: str) -> dict | None:
        """The query this retriever sends for `question` (None: no term, no search)."""
        return es_query(question, self.fields, self.query_mode)

    def search(self, query: str, k: int) -> list[Hit]:
        """The top `k` passages for `query`, by BM25 score descending, ties by id ascending (one request).
        Raises QueryError when the cluster fails the search."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        check_k(k)
        es_q = self.query(query)
        if es_q is None:
            return []
        response = call(self.cluster, "a search", lambda: self._client.search(
            index=self.index, search_type=self.search_type, query=es_q, size=k, sort=SORT, track_scores=True,
            track_total_hits=False, source=SOURCE)).body
        failure = _failure(self.cluster, self.index, response)
        if failure:
            raise QueryError(failure[0])
        return _hits(response)

    def batch_search(self, queries: list[str], k: int) -> list[list[Hit] | QueryFailure]:
        """`search` for each query in one msearch; a failed search becomes a QueryFailure and the rest go on."""
        check_k(k)
        results: list[list[Hit] | QueryFailure | None] = [None] * len(queries)
        bodies: dict[int, dict] = {}
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                results[i] = QueryFailure(f"TypeError: query must be a string, got {type(q).__name__}")
                continue
            es_q = self.query(q)
            if es_q is None:
                results[i] = []
            else:
                bodies[i] = search_request(es_q, k)
        pending, attempt = list(bodies), 0
        while pending:
            searches: list[dict] = []
            for i in pending:
                searches += [{}, bodies[i]]
            responses = call(self.cluster, f"an msearch of {len(pending)} searches", lambda: self._client.msearch(
                index=self.index, searches=searches, max_concurrent_searches=self.max_concurrent_searches,
                search_type=self.search_type))["responses"]
            retry = []
            for i, response in zip(pending, responses):
                failure = _failure(self.cluster, self.index, response)
                if failure is None:
                    results[i] = _hits(response)
                elif failure[1] and attempt < self.cluster.max_retries:
                    retry.append(i)
                else:
                    results[i] = QueryFailure(failure[0] + (f" (after {attempt + 1} tries)" if failure[1] else ""))
            if retry:
                attempt += 1
                wait = backoff_s(self.cluster, attempt)
                log(f"msearch: {len(retry)} searches failed for now; retry {attempt}/{self.cluster.max_retries} "
                    f"in {wait:.1f}s")
                time.sleep(wait)
            pending = retry
        return results  # type: ignore[return-value]


def _reopen(cluster, index, fields, max_concurrent_searches, search_type):
    return ElasticsearchRetriever(cluster, index, fields, max_concurrent_searches=max_concurrent_searches,
                                  search_type=search_type)
