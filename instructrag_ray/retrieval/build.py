"""Index building: a passage corpus into the retrieval backend (`jobs/build_index.py`).

    tantivy        read_corpus -> checked_passages -> build_tantivy_index       (one process)
    elasticsearch  read (one Ray task: read_corpus -> checked_passages, in blocks)
                   -> bulk (elastic.bulk.BulkWriter actors: es_writers of them, one client each)
                   -> the driver sums the counts, writes the rejects, checks the count

Both backends write the same report to `output`: rejected/part-*.parquet (schemas/rejected.json, as
every job: one row per passage that was not indexed, stage `index`, reason `invalid_passage`,
`duplicate_id` or `elasticsearch:<error type>`, the passage as read in `original`) and manifest.json
(counts, timings, the config with secrets masked), written last.

Elasticsearch loads are idempotent: every passage is indexed under its passage id, so a rerun (after
a failure, or with a changed corpus) overwrites documents and never duplicates them. The corpus is
read by one task so that "the first passage with an id is kept" means the same as for tantivy; the
writers run in parallel.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa

from ..cli import init_ray
from ..config import BuildIndexConfig, fingerprint
from ..errors import ClusterError
from ..output import REJECTED, manifest_header, write_manifest, write_table
from ..storage import Location, check_location, location
from ..rows import rejected_record, rejected_table, require

MANIFEST = "manifest.json"
READ_CPUS = 0.25  # the reader is one light task; the writers hold the CPUs
READ_ROWS = 2000  # passages per table the reader yields (Ray re-blocks them by es_block_mb)
PASSAGE_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string()),
                            ("code", pa.string()), ("reason", pa.string()), ("original", pa.string())])


def log(message: str) -> None:
    print(f"[build_index] {message}", flush=True)


def build_index(cfg: BuildIndexConfig, dry_run: bool = False) -> dict:
    """Build the configured index and its report; returns the manifest (also <output>/manifest.json).
    With `dry_run`, check the corpus and the target (the index directory, or the cluster and its index)
    and return what would be built, changing nothing."""
    if dry_run:
        return build_dry_run(cfg)
    if cfg.backend == "elasticsearch":
        return build_elasticsearch(cfg)
    return build_tantivy(cfg)


def build_dry_run(cfg: BuildIndexConfig) -> dict:
    from .. import dryrun
    from .corpus import read_corpus

    first = next(iter(read_corpus(cfg.corpus)), None)  # a missing file or a wrong layout fails here
    p = dryrun.Plan("build_index")
    p.add("corpus", f"{cfg.corpus} ({'empty' if first is None else 'readable'}; passages are counted by the build)")
    if cfg.backend == "tantivy":
        from .tantivy_index import check_target

        state = check_target(cfg.index, cfg.heap_mb, cfg.overwrite)
        p.add("index", f"tantivy at {cfg.index}: would be {state}, in this process ({cfg.heap_mb} MB writer memory)")
        p.add("report", cfg.output or f"{location(cfg.index).uri}.build")
        return p.show()
    from .elastic.client import connect, es_connection, require_client
    from .elastic.index import get_index, index_definition, index_state

    require_client()
    cl = es_connection(cfg, "es_")
    client, info = connect(cl)
    definition = index_definition(cfg.es_analyzer, cfg.es_shards, cfg.es_bm25_k1, cfg.es_bm25_b)
    state = index_state(cl, cfg.es_index, get_index(client, cl, cfg.es_index), definition, cfg.overwrite)
    client.close()
    version = (info.get("version") or {}).get("number", "?")
    p.add("index", f"{cfg.es_index} at {cl.url} (Elasticsearch {version}): would be {state}")
    p.add("load", f"1 reader task + {dryrun.pool(cfg.es_writers, cfg.es_writers, dryrun.cpus(cfg.es_writer_cpus))} "
                  f"bulk writers, at most {cfg.es_bulk_docs} documents / {cfg.es_bulk_mb:g} MB a request")
    p.add("report", cfg.output)
    p.add("ray", dryrun.ray_target(cfg.ray_address))
    return p.show()


# --- the report -------------------------------------------------------------------------------------


def build_fingerprint(cfg: BuildIndexConfig) -> str:
    """The settings that decide what the index holds (stamped on its rejected rows)."""
    where = {"index": cfg.index} if cfg.backend == "tantivy" else {
        "es_index": cfg.es_index, "analyzer": cfg.es_analyzer, "k1": cfg.es_bm25_k1, "b": cfg.es_bm25_b}
    return fingerprint({"corpus": cfg.corpus, "backend": cfg.backend, **where})


def start_report(output: Location) -> None:
    """A report describes one run: clear the rejects and manifest of an earlier one."""
    (output / REJECTED).delete()
    (output / MANIFEST).delete()


def passage_rejects(rejects: list[dict], fp: str) -> list[dict]:
    """Rejected-table records (schemas/rejected.json, stage `index`) of passages that were not indexed:
    reason = the code (invalid_passage, duplicate_id, elasticsearch:<type>), detail = the sentence."""
    return [rejected_record(r["id"] or "raw-" + hashlib.sha1(r["original"].encode()).hexdigest()[:16], None,
                            "index", r["code"], r["reason"], r["original"], fp) for r in rejects]


def write_rejected(records: list[dict], output: Location) -> None:
    """rejected/part-*.parquet: one file per call (temporary name, then a rename)."""
    write_table(rejected_table(records), output / REJECTED)


def _timing(manifest: dict, started: float) -> dict:
    wall = time.time() - started
    manifest["wall_time_s"] = round(wall, 2)
    manifest["docs_per_s"] = round(manifest["indexed"] / wall, 1) if wall else None
    return manifest


# --- tantivy ----------------------------------------------------------------------------------------


def build_tantivy(cfg: BuildIndexConfig) -> dict:
    """The embedded index at cfg.index, in one process."""
    from .corpus import read_corpus
    from .tantivy_index import build_tantivy_index

    started = time.time()
    index = location(cfg.index, "index")
    output = location(cfg.output or f"{index.uri}.build", "output")
    passages = read_corpus(cfg.corpus)  # a missing corpus or an unknown layout fails here, before any write
    check_location(output, "output", write=True)
    log(f"indexing {cfg.corpus} into {index} (tantivy BM25)")
    stats = build_tantivy_index(passages, index, heap_mb=cfg.heap_mb, overwrite=cfg.overwrite)
    start_report(output)
    rejected = passage_rejects([{"id": r["id"], "code": r["_code"], "reason": r["_reject"],
                                 "original": r["_original"]} for r in stats["rejected"]], build_fingerprint(cfg))
    write_rejected(rejected, output)
    manifest = _timing({
        **manifest_header("build_index", cfg), "backend": "tantivy", "index": str(index),
        "index_fingerprint": stats["fingerprint"],
        "input": stats["indexed"] + len(rejected), "indexed": stats["indexed"], "rejected": len(rejected),
        "reject_codes": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "outputs": {"rejected": str(output / REJECTED), "manifest": str(output / MANIFEST)},
    }, started)
    write_manifest(output, manifest)
    log(f"indexed {stats['indexed']} passages, rejected {len(rejected)} ({output / REJECTED}) in "
        f"{manifest['wall_time_s']}s; manifest {output / MANIFEST}")
    return manifest


# --- elasticsearch ----------------------------------------------------------------------------------


def read_passages(batch: pa.Table, rows_per_table: int = READ_ROWS) -> Iterator[pa.Table]:
    """Stage `read` (one task, a generator): reads corpus (a path per row); yields tables of passages
    with id, title, text, and code, reason and original (null for a passage to index; set for one that
    cannot be, as `corpus.checked_passages` decides, so duplicate ids keep their first passage)."""
    from .corpus import checked_passages, read_corpus

    require(batch, "read", "corpus")
    for path in batch.column("corpus").to_pylist():
        rows: list[dict] = []
        for p in checked_passages(read_corpus(path)):
            if "_reject" in p:
                rows.append({"id": p["id"], "title": None, "text": None, "code": p["_code"], "reason": p["_reject"],
                             "original": p["_original"]})
            else:
                rows.append({**p, "code": None, "reason": None, "original": None})
            if len(rows) >= rows_per_table:
                yield pa.Table.from_pylist(rows, schema=PASSAGE_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=PASSAGE_SCHEMA)


def build_elasticsearch(cfg: BuildIndexConfig) -> dict:
    """Load the corpus into cfg.es_index with parallel bulk writers (a Ray Data job).

    Before any Ray work: the corpus opens, the cluster answers (TLS, credentials, versions) and the
    index is created, replaced (overwrite) or reused. During the load the index has no replicas and
    no refresh; after it, they are restored and the count is checked. Raises ClusterError (one line)
    when the cluster cannot be used or the count check fails.
    """
    from .corpus import read_corpus
    from .elastic.client import client_version, connect, es_connection, require_client
    from .elastic.index import finish_index, index_definition, prepare_index

    started = time.time()
    corpus = location(cfg.corpus, "corpus").uri
    output = location(cfg.output, "output")
    next(iter(read_corpus(corpus)), None)  # a missing file or a wrong layout fails here, not in a task
    check_location(output, "output", write=True)
    require_client()
    cl = es_connection(cfg, "es_")
    client, info = connect(cl)
    definition = index_definition(cfg.es_analyzer, cfg.es_shards, cfg.es_bm25_k1, cfg.es_bm25_b)
    state = prepare_index(client, cl, cfg.es_index, definition, cfg.overwrite)
    version = (info.get("version") or {}).get("number", "?")
    log(f"{state} index {cfg.es_index} at {cl.url} (Elasticsearch {version}); loading {corpus} with "
        f"{cfg.es_writers} bulk writers")
    start_report(output)
    load_started = time.time()
    run = _load(cfg, cl, corpus, output)
    load_s = time.time() - load_started
    check = finish_index(client, cl, cfg.es_index, expected=run["indexed"], replicas=cfg.es_replicas,
                         refresh_interval=cfg.es_refresh_interval)
    client.close()
    accounted = run["input"] == run["indexed"] + run["rejected"]
    manifest = _timing({
        **manifest_header("build_index", cfg), "backend": "elasticsearch",
        "elasticsearch": {"url": cl.url, "index": cfg.es_index, "server_version": version, "index_was": state,
                          "client_version": client_version(), "auth": cl.auth},
        "input": run["input"], "indexed": run["indexed"], "rejected": run["rejected"],
        "reject_codes": dict(sorted(run["codes"].items())),
        "count_check": {**check, "input_minus_rejected": run["input"] - run["rejected"],
                        "ok": check["ok"] and accounted},
        "bulk": {"requests": run["requests"], "retried_requests": run["retries"], "bytes": run["bytes"],
                 "writers": cfg.es_writers, "max_docs": cfg.es_bulk_docs, "max_mb": cfg.es_bulk_mb},
        "outputs": {"rejected": str(output / REJECTED), "manifest": str(output / MANIFEST)},
    }, started)
    manifest["load_time_s"] = round(load_s, 2)  # the Ray Data load alone (the job also starts Ray, checks, counts)
    manifest["docs_per_s"] = round(run["indexed"] / load_s, 1) if load_s else None
    write_manifest(output, manifest)
    _report_count_check(cfg, run, check, manifest, output)
    return manifest


def _load(cfg: BuildIndexConfig, cl, corpus: str, output: Location) -> dict:
    """The Ray Data load: one reader task, es_writers BulkWriter actors; returns the summed counts."""
    import ray

    from .elastic.bulk import BulkWriter

    init_ray(cfg.ray_address, verbose=cfg.verbose)
    context = ray.data.DataContext.get_current()
    block_size = context.target_max_block_size
    # The reader is one task; Ray cuts its output into blocks of this size, one block per writer call.
    context.target_max_block_size = max(1, int(cfg.es_block_mb * 2**20))
    try:
        ds = ray.data.from_items([{"corpus": corpus}]).map_batches(
            read_passages, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)
        ds = ds.map_batches(
            BulkWriter, batch_size=None, batch_format="pyarrow", num_cpus=cfg.es_writer_cpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.es_writers),
            fn_constructor_kwargs={"cluster": cl, "index": cfg.es_index, "max_docs": cfg.es_bulk_docs,
                                   "max_bytes": max(1, int(cfg.es_bulk_mb * 1_000_000))})
        return _follow(ds, output, cfg.progress_interval_s, build_fingerprint(cfg))
    finally:
        context.target_max_block_size = block_size


def _report_count_check(cfg: BuildIndexConfig, run: dict, check: dict, manifest: dict, output: Location) -> None:
    log(f"read {run['input']} passages: indexed {run['indexed']}, rejected {run['rejected']} "
        f"({output / REJECTED}) in {manifest['load_time_s']}s ({manifest['docs_per_s']} docs/s)")
    log(f"count check: {cfg.es_index} holds {check['count']} documents; input - rejected = "
        f"{run['input'] - run['rejected']}: {'ok' if manifest['count_check']['ok'] else 'MISMATCH'}")
    log(f"manifest {output / MANIFEST}")
    if run["input"] != run["indexed"] + run["rejected"]:
        raise ClusterError(f"count check failed: {run['input']} passages read, {run['indexed']} indexed and "
                           f"{run['rejected']} rejected do not add up; rerun the build")
    if not check["ok"]:
        raise ClusterError(
            f"count check failed: index {cfg.es_index} holds {check['count']} documents but this run indexed "
            f"{run['indexed']} ({run['input']} read - {run['rejected']} rejected); documents of another corpus are "
            "still there: rerun with overwrite=true to rebuild the index from scratch")


def _follow(ds, output: Location, interval: float, fp: str) -> dict:
    """Drive the load: sum the writers' rows, write their rejects; a progress display runs meanwhile."""
    from ..console import Progress

    run = {"input": 0, "indexed": 0, "rejected": 0, "requests": 0, "retries": 0, "bytes": 0, "codes": Counter()}
    with Progress("build_index", None, "passages", interval=interval) as display:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                rejected = json.loads(row["rejected"])
                write_rejected(passage_rejects(rejected, fp), output)
                run["input"] += row["received"]
                run["indexed"] += row["indexed"]
                run["rejected"] += len(rejected)
                run["codes"].update(r["code"] for r in rejected)
                for key in ("requests", "retries", "bytes"):
                    run[key] += row[key]
            display.update(run["indexed"], run["rejected"])
    return run
