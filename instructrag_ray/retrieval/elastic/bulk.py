"""Bulk loading passages into the index (the writers of jobs/build_index.py backend=elasticsearch)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .client import RETRY_STATUSES, Cluster, ClusterError, ClusterUnavailable, backoff_s, call, error_reason, log


@dataclass
class BulkStats:
    indexed: int = 0
    rejected: list[dict] = field(default_factory=list)  # {"id", "code", "reason", "original"}
    requests: int = 0
    retries: int = 0
    bytes: int = 0


def _chunks(passages: Iterable[dict], max_docs: int, max_bytes: int) -> Iterator[list[tuple[dict, bytes]]]:
    """(passage, its two NDJSON lines) in bulk requests of at most max_docs documents and max_bytes
    bytes (a single larger document goes alone)."""
    chunk: list[tuple[dict, bytes]] = []
    size = 0
    for p in passages:
        lines = (json.dumps({"index": {"_id": p["id"]}}, ensure_ascii=False) + "\n"
                 + json.dumps({"id": p["id"], "title": p["title"], "text": p["text"]}, ensure_ascii=False) + "\n"
                 ).encode()
        if chunk and (len(chunk) >= max_docs or size + len(lines) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append((p, lines))
        size += len(lines)
    if chunk:
        yield chunk


def bulk_index(client, cl: Cluster, index: str, passages: Iterable[dict], *, max_docs: int = 1000,
               max_bytes: int = 5_000_000) -> BulkStats:
    """Index passages under their passage id (`_id` = id: a rerun overwrites, never duplicates).

    Request-level failures are retried by `call`; documents the cluster answered with 429/502/503/504
    are re-sent with backoff, and if it keeps refusing them ClusterUnavailable stops the load. Any
    other refused document is rejected with the server's reason (code "elasticsearch:<type>").
    """
    stats = BulkStats()
    for chunk in _chunks(passages, max_docs, max_bytes):
        pending, attempt = chunk, 0
        while pending:
            body = b"".join(lines for _, lines in pending)
            # The serializer passes bytes through, so the body is sent as measured.
            response = call(cl, f"a bulk request of {len(pending)} documents", lambda: client.bulk(
                index=index, operations=[body], filter_path="errors,items.*.status,items.*.error"))
            stats.requests += 1
            stats.bytes += len(body)
            items = response.get("items") or []
            if len(items) != len(pending):
                raise ClusterError(f"a bulk response to {index!r} has {len(items)} items for {len(pending)} documents")
            retry = []
            for (passage, lines), item in zip(pending, items):
                result = next(iter(item.values()))
                status = int(result.get("status", 500))
                if 200 <= status < 300:
                    stats.indexed += 1
                elif status in RETRY_STATUSES:
                    retry.append((passage, lines))
                else:
                    error = result.get("error") or {}
                    stats.rejected.append({"id": passage["id"], "code": f"elasticsearch:{error.get('type', status)}",
                                           "reason": f"Elasticsearch refused the document ({status} {error_reason(error)})",
                                           "original": json.dumps(passage, ensure_ascii=False)})
            if retry:
                attempt += 1
                if attempt > cl.max_retries:
                    raise ClusterUnavailable(
                        f"Elasticsearch at {cl.url} kept refusing {len(retry)} documents with status "
                        f"{sorted({int(next(iter(i.values())).get('status', 0)) for i in items} & RETRY_STATUSES)} "
                        f"after {attempt} tries; the load stopped: lower es_writers or es_bulk_docs (or give the "
                        "cluster more capacity) and rerun the same command")
                stats.retries += 1
                wait = backoff_s(cl, attempt)
                log(f"bulk: {len(retry)} documents refused for now (busy); retry {attempt}/{cl.max_retries} in {wait:.1f}s")
                time.sleep(wait)
            pending = retry
    return stats


class BulkWriter:
    """Stage `bulk` (actor; one client): reads id, title, text, code, reason, original. Indexes the
    passages whose `reason` is null, passes the others on as rejected; returns one row: received,
    indexed, requests, retries, bytes, and `rejected` (a JSON list of {id, code, reason, original},
    written by the driver)."""

    def __init__(self, cluster: Cluster, index: str, max_docs: int, max_bytes: int):
        self.cluster, self.index = cluster, index
        self.max_docs, self.max_bytes = max_docs, max_bytes
        self.client = cluster.client()

    def __call__(self, batch):
        import pyarrow as pa

        from ...rows import require

        require(batch, "bulk", "id", "title", "text", "code", "reason", "original")
        rows = batch.to_pylist()
        rejected = [{"id": r["id"], "code": r["code"], "reason": r["reason"], "original": r["original"]}
                    for r in rows if r["reason"] is not None]
        passages = ({"id": r["id"], "title": r["title"], "text": r["text"]} for r in rows if r["reason"] is None)
        stats = bulk_index(self.client, self.cluster, self.index, passages,
                           max_docs=self.max_docs, max_bytes=self.max_bytes)
        return pa.table({"received": [len(rows)], "indexed": [stats.indexed], "requests": [stats.requests],
                         "retries": [stats.retries], "bytes": [stats.bytes],
                         "rejected": [json.dumps(rejected + stats.rejected)]})
