"""In-flight rows and the one reject vocabulary of every job.

In-flight batches are pyarrow tables whose rows carry the QA columns, the columns each stage adds, and
three reject columns (reject_stage, reject_reason, reject_detail; null while the row is healthy).

A stage works on `batch.to_pylist()`, skips rows already rejected, may reject more rows, and returns
the table with its new columns appended (types from `schemas/rationales.json`). Rejected rows travel to
the end of the pipeline, where the writer sends them to `rejected/` with their original content.
Ray Data's default numpy batches would pickle the nested list columns, hence pyarrow throughout.
"""

from __future__ import annotations

import pyarrow as pa

from . import schemas

# The CPUs of a stateless Ray Data task (parse, select, check, write, score). They are light; asking for
# little leaves room for the actor pools on small nodes (an actor pool that takes every CPU starves
# these tasks and the job hangs silently).
TASK_CPUS = 0.1


def ok_rows(rows: list[dict]) -> list[int]:
    """Indices of the rows that are not rejected."""
    return [i for i, r in enumerate(rows) if r["reject_stage"] is None]


def reject(row: dict, stage: str, reason: str, detail: str) -> None:
    row["reject_stage"], row["reject_reason"], row["reject_detail"] = stage, reason, detail


def require(batch: pa.Table, stage: str, *names: str) -> None:
    """Fail naming the missing column (a wiring mistake, not a data problem)."""
    missing = [n for n in names if n not in batch.column_names]
    if missing:
        raise KeyError(f"stage '{stage}' needs column(s) {missing}; the batch has {batch.column_names}")


def output_field(column: str) -> pa.Field:
    """A stage's new column: its type from the rationales schema, nullable while in flight."""
    return schemas.field("rationales", column).with_nullable(True).remove_metadata()


def add_columns(batch: pa.Table, rows: list[dict], new: dict[str, list]) -> pa.Table:
    """`rows` (possibly with updated reject columns or values) plus the new columns, as one table."""
    schema = batch.schema
    for name in new:
        field = output_field(name)
        if name in schema.names:
            schema = schema.set(schema.get_field_index(name), field)
        else:
            schema = schema.append(field)
    merged = [{**row, **{name: values[i] for name, values in new.items()}} for i, row in enumerate(rows)]
    return pa.Table.from_pylist(merged, schema=schema)


def select_rows(batch: pa.Table, skip_ref, duplicate_ref, keep_ref) -> pa.Table:
    """Stage `select` of the synthesis and evaluation jobs: reads id, source, line. Drops rows past
    `limit` (keep: the (source, line) positions to keep, None = all) and rows already done (skip: ids;
    resume); marks all but the first row of a duplicated id as rejected (stage validate, duplicate_id).
    duplicates maps the (source, line) of every extra copy to whether an earlier run already rejected it."""
    skip, duplicates, keep = cached_get(skip_ref), cached_get(duplicate_ref), cached_get(keep_ref)
    rows = []
    for row in batch.to_pylist():
        position = (row["source"], row["line"])
        if keep is not None and position not in keep:
            continue
        if position in duplicates:
            if duplicates[position]:  # this extra copy was rejected by an earlier run
                continue
            reject(row, "validate", "duplicate_id",
                   f"id {row['id']} appears more than once in the input; the first occurrence was kept")
        elif row["id"] in skip:
            continue
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=batch.schema)


def reblock(ds, rows: int):
    """Blocks of at most `rows` rows. Ray Data concatenates what one task yields into blocks of up to
    128 MiB, so a file read by one task, or a generation actor's many batches, would travel (and be
    written, and committed) as one block; cut to the generation batch size, every batch lands on its own
    as soon as it is done, and spreads over every generation actor. Ray 2.60's streaming repartition
    (marked experimental; Ray is pinned) is used only here."""
    return ds.repartition(target_num_rows_per_block=rows)


_OBJECTS: dict = {}


def cached_get(ref):
    """ray.get once per worker process: the id sets can be large, so they travel by object ref."""
    import ray

    if ref is None:
        return None
    key = ref.hex()
    if key not in _OBJECTS:
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


# --- the rejected table (schemas/rejected.json), written by every job ---------------------------------


def rejected_record(row_id: str, dataset: str | None, stage: str, reason: str, detail: str, original: str,
                    fingerprint: str) -> dict:
    """One row of a job's rejected/ table: what was rejected, where (stage), why (a stable reason code and
    a sentence), and its original content, so nothing is lost."""
    return {"id": row_id, "dataset": dataset, "stage": stage, "reason": reason, "detail": detail,
            "original": original, "config_fingerprint": fingerprint}


def rejected_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=schemas.load("rejected"))


def rejects_of(rows: list[dict], fingerprint: str) -> list[dict]:
    """The rejected-table records of the in-flight rows that carry a reject."""
    return [rejected_record(r["id"], r["dataset"], r["reject_stage"], r["reject_reason"], r["reject_detail"],
                            r["original"], fingerprint) for r in rows if r["reject_stage"] is not None]
