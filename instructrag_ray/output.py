"""Job outputs: Parquet with explicit schemas, block by block, resume scans, and the manifest.

Layout of an output directory:
    rationales/part-*.parquet   schemas/rationales.json
    rejected/part-*.parquet     schemas/rejected.json
    manifest.json               written last: the job finished

Each batch is written as its own files the moment it is done (temporary name, then an atomic rename),
so a job that dies keeps every finished batch and never leaves a half-written file. A rerun reads the
ids and fingerprints already written, skips those ids, and refuses to mix settings; rows rejected for a
passing failure (RETRIED_ON_RESUME) are taken out of rejected/ and tried again.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .config import to_dict
from .errors import OutputConflict
from .rows import rejected_record, rejected_table

RATIONALES, REJECTED, MANIFEST = "rationales", "rejected", "manifest.json"
# Rejects that a rerun may turn into rationales (a model server or a search cluster that failed for a
# while); every other reason is a property of the row and the settings, so a rerun keeps it.
RETRIED_ON_RESUME = frozenset({("generate", "generation_error"), ("generate", "rate_limited"),
                               ("generate", "server_error"), ("generate", "timeout"), ("retrieve", "search_failed")})


def write_table(table: pa.Table, directory: Path, prefix: str = "part") -> Path | None:
    """Write one Parquet file atomically (temp file + rename); None when the table is empty."""
    if table.num_rows == 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return directory / name


def write_rows(rows: list[dict], output: str, table: str, schema_name: str,
               fingerprint_of: Callable[[dict], str]) -> tuple[list[dict], list[dict]]:
    """Write a batch of in-flight rows: the healthy ones to <output>/<table>/ (schema `schema_name`), the
    rejected ones to <output>/rejected/, each row stamped with its config fingerprint. Returns both lists."""
    good = [r for r in rows if r["reject_stage"] is None]
    bad = [r for r in rows if r["reject_stage"] is not None]
    out = Path(output)
    schema = schemas.load(schema_name)
    for r in good:
        r["config_fingerprint"] = fingerprint_of(r)
    write_table(pa.Table.from_pylist([{c: r[c] for c in schema.names} for r in good], schema=schema), out / table)
    write_table(rejected_table([rejected_record(r["id"], r["dataset"], r["reject_stage"], r["reject_reason"],
                                                r["reject_detail"], r["original"], fingerprint_of(r)) for r in bad]),
                out / REJECTED)
    return good, bad


def write_batch(batch: pa.Table, output: str, fingerprint: str) -> pa.Table:
    """Stage `write` of synthesis: reads every in-flight column; writes rationales/ and rejected/; returns
    one stats row for progress and the summary."""
    good, bad = write_rows(batch.to_pylist(), output, RATIONALES, "rationales", lambda _: fingerprint)
    return batch_stats(good, Counter(f"{r['reject_stage']}:{r['reject_reason']}" for r in bad), "consistent")


def batch_stats(good: list[dict], reasons: Counter, flag: str) -> pa.Table:
    """The one stats row a write stage returns (progress.follow sums them): rows written, rejected (and
    why), how many written rows have `flag` set, and token counts."""
    return pa.table({
        "written": [len(good)],
        "rejected": [sum(reasons.values())],
        "reasons": [json.dumps(reasons)],
        flag: [sum(bool(r[flag]) for r in good)],
        "prompt_tokens": [sum(r["prompt_tokens"] for r in good)],
        "completion_tokens": [sum(r["completion_tokens"] for r in good)],
    })


@dataclass
class ExistingOutput:
    """What an output directory already holds."""

    ids: set[str] = field(default_factory=set)            # done: a rationale or a reject for the row
    duplicate_ids: set[str] = field(default_factory=set)  # ids whose extra copies were already rejected
    retry_ids: set[str] = field(default_factory=set)      # rejected for a passing failure: to try again
    fingerprints: set[str] = field(default_factory=set)
    files: int = 0


def scan_output(output: str) -> ExistingOutput:
    """Ids and fingerprints already written under rationales/ and rejected/ (only a few columns are read).

    A `duplicate_id` reject shares its id with the row that was kept, so it must not mark that id
    done: it goes to `duplicate_ids` instead. A reject for a passing failure (RETRIED_ON_RESUME) does
    not mark its id done either: it goes to `retry_ids`.
    """
    found = ExistingOutput()
    for file in sorted((Path(output) / RATIONALES).glob("*.parquet")):
        table = pq.read_table(file, columns=["id", "config_fingerprint"]).to_pydict()
        found.ids.update(table["id"])
        found.fingerprints.update(table["config_fingerprint"])
        found.files += 1
    for file in sorted((Path(output) / REJECTED).glob("*.parquet")):
        table = pq.read_table(file, columns=["id", "stage", "reason", "config_fingerprint"]).to_pydict()
        for rid, stage, reason in zip(table["id"], table["stage"], table["reason"]):
            if reason == "duplicate_id":
                found.duplicate_ids.add(rid)
            elif (stage, reason) in RETRIED_ON_RESUME:
                found.retry_ids.add(rid)
            else:
                found.ids.add(rid)
        found.fingerprints.update(table["config_fingerprint"])
        found.files += 1
    return found


def prepare_output(output: str, fingerprint: str, overwrite: bool, check_only: bool = False) -> ExistingOutput:
    """Check an output directory before a run: resume it, clear it (overwrite), or refuse. With
    `check_only` (a dry run) nothing is changed: what a run would find there is returned."""
    existing = scan_output(output)
    other = existing.fingerprints - {fingerprint}
    if other and not overwrite:
        raise OutputConflict(
            f"{output} holds rows written with other settings (config fingerprint {sorted(other)[0]}, "
            f"now {fingerprint}); use a new --output, or pass overwrite=true to delete them and start again"
        )
    if check_only:
        return ExistingOutput() if other or overwrite else existing
    if other or (overwrite and existing.files):
        clear_output(output)
        return ExistingOutput()
    if existing.retry_ids:
        drop_retried_rejects(output)
    return existing


def drop_retried_rejects(output: str) -> None:
    """Take the RETRIED_ON_RESUME rejects out of rejected/ (each file rewritten atomically, or removed),
    so that a retried row ends up exactly once: as a rationale, or as this run's reject."""
    for file in sorted((Path(output) / REJECTED).glob("*.parquet")):
        table = pq.read_table(file)
        keep = [(stage, reason) not in RETRIED_ON_RESUME
                for stage, reason in zip(table["stage"].to_pylist(), table["reason"].to_pylist())]
        if all(keep):
            continue
        if any(keep):
            tmp = file.with_name(f".{file.name}.tmp")
            pq.write_table(table.filter(pa.array(keep)), tmp)
            os.replace(tmp, file)
        else:
            file.unlink()


def clear_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def clear_output(output: str) -> None:
    for sub in (RATIONALES, REJECTED):
        shutil.rmtree(Path(output) / sub, ignore_errors=True)
    (Path(output) / MANIFEST).unlink(missing_ok=True)


def output_totals(output: str) -> dict:
    """Totals over everything in the output directory (this run and earlier resumed runs)."""
    totals = {"rationales": 0, "rejected": 0, "consistent": 0, "answer_in_docs": 0,
              "consistent_when_answer_in_docs": 0, "prompt_tokens": 0, "completion_tokens": 0,
              "finish_reasons": Counter(), "reject_reasons": Counter()}
    for file in sorted((Path(output) / RATIONALES).glob("*.parquet")):
        t = pq.read_table(file, columns=["consistent", "answer_in_docs", "prompt_tokens", "completion_tokens",
                                         "finish_reason"]).to_pydict()
        totals["rationales"] += len(t["consistent"])
        totals["consistent"] += sum(t["consistent"])
        totals["answer_in_docs"] += sum(t["answer_in_docs"])
        totals["consistent_when_answer_in_docs"] += sum(c and a for c, a in zip(t["consistent"], t["answer_in_docs"]))
        totals["prompt_tokens"] += sum(t["prompt_tokens"])
        totals["completion_tokens"] += sum(t["completion_tokens"])
        totals["finish_reasons"].update(t["finish_reason"])
    for file in sorted((Path(output) / REJECTED).glob("*.parquet")):
        t = pq.read_table(file, columns=["stage", "reason"]).to_pydict()
        totals["rejected"] += len(t["stage"])
        totals["reject_reasons"].update(f"{s}:{r}" for s, r in zip(t["stage"], t["reason"]))
    totals["consistency"] = totals["consistent"] / totals["rationales"] if totals["rationales"] else None
    totals["consistency_when_answer_in_docs"] = (
        totals["consistent_when_answer_in_docs"] / totals["answer_in_docs"] if totals["answer_in_docs"] else None)
    totals["finish_reasons"] = dict(totals["finish_reasons"])
    totals["reject_reasons"] = dict(sorted(totals["reject_reasons"].items()))
    return totals


def write_manifest(output: str, manifest: dict) -> Path:
    """Write manifest.json last (atomically): its presence means the job finished."""
    path = Path(output) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def manifest_header(job: str, cfg) -> dict:
    """The first keys of every job's manifest: which job, when, its whole config (secrets masked), versions."""
    return {"job": job, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": to_dict(cfg),
            "versions": package_versions()}


@lru_cache(maxsize=1)
def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": sys.platform}
    for name in ("instructrag-ray", "ray", "torch", "transformers", "pyarrow", "tantivy", "elasticsearch",
                 "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
