"""In-flight batches: pyarrow tables whose rows carry the QA columns, the columns each stage adds, and
three reject columns (reject_stage, reject_reason, reject_detail; null while the row is healthy).

A stage works on `batch.to_pylist()`, skips rows already rejected, may reject more rows, and returns
the table with its new columns appended (types from `schemas/rationales.json`). Rejected rows travel to
the end of the pipeline, where the writer sends them to `rejected/` with their original content.
Ray Data's default numpy batches would pickle the nested list columns, hence pyarrow throughout.
"""

from __future__ import annotations

import pyarrow as pa

from . import schemas

REJECT_COLUMNS = ("reject_stage", "reject_reason", "reject_detail")


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
