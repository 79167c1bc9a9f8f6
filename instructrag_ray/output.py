"""Job outputs on any filesystem (local or object store): Parquet with explicit schemas, an exactly-once
commit protocol, resume scans, compaction, the settings a resume must match, and the manifest.

Layout of an output (a directory or a URI prefix):
    rationales/part-*.parquet   schemas/rationales.json (predictions/ for evaluation)
    rejected/part-*.parquet     schemas/rejected.json; always there, an empty file when nothing was rejected
    README.md                   a dataset card, so `datasets.load_dataset(<output>)` loads rationales/ (a local
                                directory; on object storage pass data_files=<output>/rationales/*.parquet)
    settings.json               written first: the fingerprint and the settings that shape the rows
    manifest.json               written last: the job finished
    _staging/<run>/...          a run's written-but-not-committed files (removed when done)

Commit protocol. A write stage (on any worker) writes each batch's files under `_staging/<run id>/`
(each file atomically: a rename on a local disk, one upload on a store), and returns their names. Only
the driver commits: it moves each file to its table as the batch's stats reach it (`Run.commit`; a
rename, or a server-side copy, so the committed file appears whole), under a name that sorts in commit
order. So what a reader sees, and what a resume trusts, is exactly what the driver committed: after a
kill -9 of the driver, its workers may still finish writes, but only into its staging directory, which
the next run discards. Neither timing nor a quick restart can duplicate a row. As a last guard, a scan
that finds an id committed twice keeps the first committed copy and rewrites the later file without it.

Compaction merges the small per-batch files into files of about `rows_per_file` rows at the end of a
run (Ray tasks, one per merged file; a journal under `_compaction/` makes a merge that a kill
interrupts finish or vanish on the next scan).
"""

from __future__ import annotations

import json
import platform
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import pyarrow as pa

from . import schemas
from .config import to_dict
from .errors import OutputConflict
from .rows import rejected_record, rejected_table
from .storage import Location, dumps, location

RATIONALES, REJECTED, MANIFEST, SETTINGS, CARD = "rationales", "rejected", "manifest.json", "settings.json", "README.md"
STAGING, COMPACTION = "_staging", "_compaction"
# Rejects that a rerun may turn into rationales (a model server or a search cluster that failed for a
# while); every other reason is a property of the row and the settings, so a rerun keeps it.
RETRIED_ON_RESUME = frozenset({("generate", "generation_error"), ("generate", "rate_limited"),
                               ("generate", "server_error"), ("generate", "timeout"), ("retrieve", "search_failed")})
DUPLICATE_ID = "duplicate_id"


# --- writing and committing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run's writing context: the output, and the run id that names its staging directory. Pickles
    to the workers that write (Location carries the filesystem)."""

    out: Location
    run_id: str

    @property
    def staging(self) -> Location:
        return self.out / STAGING / self.run_id

    def stage(self, table_name: str, table: pa.Table) -> str | None:
        """Write one file of `table_name` into this run's staging directory; returns its name there."""
        if table.num_rows == 0:
            return None
        name = f"{table_name}/{uuid.uuid4().hex}.parquet"
        (self.staging / name).write_parquet(table)
        return name



def new_run(out: Location) -> Run:
    """A run id that sorts after every earlier run's (commit order across runs): UTC time to the
    microsecond, then a random part."""
    now = time.time()
    return Run(out, time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1e6) % 1_000_000:06d}-"
               + uuid.uuid4().hex[:6])


class Committer:
    """The driver's side of the protocol: moves a run's staged files to their tables, each under a name
    that sorts in commit order (`part-<run id>-<n>.parquet`). Nothing else ever commits a file."""

    def __init__(self, run: Run):
        self.run, self.committed = run, 0

    def __call__(self, staged: list[str]) -> None:
        for name in staged:
            table = name.split("/", 1)[0]
            self.committed += 1
            (self.run.staging / name).move_to(self.run.out / table / f"part-{self.run.run_id}-{self.committed:06d}.parquet")

    def finish(self) -> None:
        """Every staging directory goes: this run's is empty once everything was committed, and a killed
        run's workers may have written to theirs after this run started (one run per output at a time)."""
        discard_staging(self.run.out)


def write_rows(rows: list[dict], run: Run, table: str, schema_name: str,
               fingerprint_of: Callable[[dict], str]) -> tuple[list[dict], list[dict], list[str]]:
    """Stage a batch of in-flight rows: the healthy ones for <table> (schema `schema_name`), the rejected
    ones for rejected/, each row stamped with its config fingerprint. Returns (good, bad, staged names)."""
    good = [r for r in rows if r["reject_stage"] is None]
    bad = [r for r in rows if r["reject_stage"] is not None]
    schema = schemas.load(schema_name)
    for r in good:
        r["config_fingerprint"] = fingerprint_of(r)
    staged = [run.stage(table, pa.Table.from_pylist([{c: r[c] for c in schema.names} for r in good], schema=schema)),
              run.stage(REJECTED, rejected_table([
                  rejected_record(r["id"], r["dataset"], r["reject_stage"], r["reject_reason"], r["reject_detail"],
                                  r["original"], fingerprint_of(r)) for r in bad]))]
    return good, bad, [s for s in staged if s]


def write_batch(batch: pa.Table, run: Run, fingerprint: str) -> pa.Table:
    """Stage `write` of synthesis: reads every in-flight column; stages rationales/ and rejected/ files;
    returns one stats row (with the staged names, which the driver commits)."""
    good, bad, staged = write_rows(batch.to_pylist(), run, RATIONALES, "rationales", lambda _: fingerprint)
    return batch_stats(good, Counter(f"{r['reject_stage']}:{r['reject_reason']}" for r in bad), "consistent", staged)


def batch_stats(good: list[dict], reasons: Counter, flag: str, staged: list[str]) -> pa.Table:
    """The one stats row a write stage returns (progress.follow sums them): rows written, rejected (and
    why), how many written rows have `flag` set, token counts, and the staged files to commit."""
    return pa.table({
        "written": [len(good)],
        "rejected": [sum(reasons.values())],
        "reasons": [json.dumps(reasons)],
        flag: [sum(bool(r[flag]) for r in good)],
        "prompt_tokens": [sum(r["prompt_tokens"] for r in good)],
        "completion_tokens": [sum(r["completion_tokens"] for r in good)],
        "staged": [json.dumps(staged)],
    })


def write_table(table: pa.Table, directory: Location | str, prefix: str = "part") -> Location | None:
    """One Parquet file in `directory`, written atomically (for driver-side tables: reports, rejects of
    the index and training jobs); None when the table is empty."""
    if table.num_rows == 0:
        return None
    target = location(directory) / f"{prefix}-{uuid.uuid4().hex}.parquet"
    target.write_parquet(table)
    return target


def ensure_tables(out: Location, tables: dict[str, str]) -> None:
    """Every table directory holds at least one file ({table: schema name}): an empty Parquet file with
    the schema when nothing was written, so readers of the directory never fail on a missing path."""
    for table, schema_name in tables.items():
        if not (out / table).files((".parquet",)):
            (out / table / "part-empty.parquet").write_parquet(schemas.load(schema_name).empty_table())


def write_card(out: Location, tables: list[str], default: str, about: str) -> None:
    """README.md with the Hugging Face dataset-card header that makes `datasets.load_dataset(<output>)`
    load `default` (and `load_dataset(<output>, "<table>")` any other table) instead of merging tables."""
    configs = "".join(f"- config_name: {t}\n  data_files: \"{t}/*.parquet\"\n" + ("  default: true\n" if t == default else "")
                      for t in tables)
    (out / CARD).write_text(f"---\nconfigs:\n{configs}---\n\n{about}\n")


# --- what an output holds: scan, dedup, resume ------------------------------------------------------------


@dataclass
class ExistingOutput:
    """What an output already holds (committed files only)."""

    ids: set[str] = field(default_factory=set)              # done: a rationale or a reject for the row
    duplicate_counts: Counter = field(default_factory=Counter)  # id -> extra copies already rejected
    retry_ids: set[str] = field(default_factory=set)        # rejected for a passing failure: to try again
    fingerprints: set[str] = field(default_factory=set)
    files: int = 0
    removed_duplicates: int = 0


def scan_output(out: Location, table: str = RATIONALES, repair: bool = True) -> ExistingOutput:
    """Ids and fingerprints committed under <table>/ and rejected/ (only a few columns are read), after
    finishing interrupted compactions and removing any id committed twice (first committed copy wins;
    with repair=False, a dry run, nothing is changed and the later copies are only left uncounted).

    A `duplicate_id` reject shares its id with the row that was kept, so it does not mark that id done:
    it counts in `duplicate_counts`. A reject for a passing failure (RETRIED_ON_RESUME) does not mark its
    id done either: it goes to `retry_ids`.
    """
    if repair:
        recover_compactions(out)
    found = ExistingOutput()
    files = [(f, t) for t in (table, REJECTED) for f in (out / t).files((".parquet",))]
    seen: set[str] = set()
    for file, kind in sorted(files, key=lambda ft: ft[0].name):  # names sort in commit order
        cols = ["id", "config_fingerprint"] + (["stage", "reason"] if kind == REJECTED else [])
        t = file.read_parquet(cols).to_pydict()
        found.files += 1
        extra = [i for i, rid in enumerate(t["id"]) if rid in seen and not (kind == REJECTED and t["reason"][i] == DUPLICATE_ID)]
        if extra:
            if repair:
                _drop_rows(file, set(extra))
            found.removed_duplicates += len(extra)
        for i, rid in enumerate(t["id"]):
            if i in extra:
                continue
            found.fingerprints.add(t["config_fingerprint"][i])
            if kind == REJECTED and t["reason"][i] == DUPLICATE_ID:
                found.duplicate_counts[rid] += 1
            elif kind == REJECTED and (t["stage"][i], t["reason"][i]) in RETRIED_ON_RESUME:
                found.retry_ids.add(rid)
            else:
                found.ids.add(rid)
                seen.add(rid)
    return found


def _drop_rows(file: Location, rows: set[int]) -> None:
    """Rewrite `file` without the given row indices (atomically), or remove it when nothing is left."""
    table = file.read_parquet()
    keep = [i not in rows for i in range(table.num_rows)]
    if any(keep):
        file.write_parquet(table.filter(pa.array(keep)))
    else:
        file.delete()


def refuse_other_settings(out: Location, existing: ExistingOutput, fingerprint: str, shaping: dict,
                          overwrite: bool) -> None:
    """A resume must match: rows written under another fingerprint are another kind of output. Raises
    OutputConflict naming each changed setting, unless overwrite. Reads only."""
    if existing.fingerprints - {fingerprint} and not overwrite:
        raise OutputConflict(f"{out.uri} holds rows written with other settings ({changed_settings(out, shaping)}); "
                             "use a new --output, or pass overwrite=true to delete them and start again")


def prepare_output(out: Location, existing: ExistingOutput, fingerprint: str, shaping: dict, overwrite: bool,
                   table: str = RATIONALES) -> ExistingOutput:
    """Make an output ready for a run: clear it (overwrite, or other settings with overwrite), take the
    rejects to retry out of rejected/, record the settings. Call it only after every check passed: with
    overwrite it deletes the old output. Returns what the run resumes from."""
    refuse_other_settings(out, existing, fingerprint, shaping, overwrite)
    if (existing.fingerprints - {fingerprint}) or (overwrite and existing.files):
        clear_output(out, [table])
        existing = ExistingOutput()
    elif existing.retry_ids:
        drop_retried_rejects(out)
    (out / SETTINGS).write_bytes(dumps({"fingerprint": fingerprint, "settings": shaping}))
    return existing


def changed_settings(out: Location, shaping: dict) -> str:
    """'generation.max_new_tokens: 48 -> 64, ...' from the settings.json the earlier run wrote."""
    try:
        old = json.loads((out / SETTINGS).read_text())["settings"]
    except (OSError, KeyError, ValueError):
        return "config fingerprint differs; the earlier run left no settings.json to compare"
    before, after = _flat(old), _flat(shaping)
    changes = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]
    return ", ".join(changes) or "the same settings, written under another fingerprint"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, list) else v
    return out


def drop_retried_rejects(out: Location) -> None:
    """Take the RETRIED_ON_RESUME rejects out of rejected/ (each file rewritten atomically, or removed),
    so that a retried row ends up exactly once: as a rationale, or as this run's reject."""
    for file in (out / REJECTED).files((".parquet",)):
        t = file.read_parquet(["stage", "reason"]).to_pydict()
        drop = {i for i, key in enumerate(zip(t["stage"], t["reason"])) if key in RETRIED_ON_RESUME}
        if drop:
            _drop_rows(file, drop)


def clear_output(out: Location, tables: list[str]) -> None:
    for sub in [*tables, REJECTED, STAGING, COMPACTION]:
        (out / sub).delete()
    for name in (MANIFEST, SETTINGS, CARD):
        (out / name).delete()


def discard_staging(out: Location, keep: str = "") -> None:
    """Remove the staging directories of other runs (a killed run's uncommitted files)."""
    for run_dir in (out / STAGING).subdirs():
        if run_dir.name != keep:
            run_dir.delete()
    if not keep:
        (out / STAGING).delete()


# --- compaction ----------------------------------------------------------------------------------------


def compaction_groups(files: list[tuple[Location, int]], rows_per_file: int) -> list[list[Location]]:
    """Consecutive small files (fewer rows than rows_per_file) gathered into groups of at most
    rows_per_file rows; groups of one file are left alone."""
    groups, current, rows = [], [], 0
    for file, n in files:
        if n >= rows_per_file:  # a full file ends the run of small ones (merges keep the files' order)
            groups.append(current)
            current, rows = [], 0
            continue
        if current and rows + n > rows_per_file:
            groups.append(current)
            current, rows = [], 0
        current.append(file)
        rows += n
    groups.append(current)
    return [g for g in groups if len(g) > 1]


def compact(out: Location, tables: list[str], rows_per_file: int) -> int:
    """Merge each table's small files into files of about rows_per_file rows (Ray tasks, one per merged
    file); returns how many files were merged away. 0 rows_per_file: nothing to do."""
    if not rows_per_file:
        return 0
    import pyarrow.parquet as pq
    import ray

    groups = []
    for table in tables:
        files = [(f, pq.read_metadata(f.path, filesystem=f.fs).num_rows) for f in (out / table).files((".parquet",))]
        groups += compaction_groups(files, rows_per_file)
    merge = ray.remote(num_cpus=0.25)(merge_files)
    ray.get([merge.remote(out, group) for group in groups])
    return sum(len(g) - 1 for g in groups)


def merge_files(out: Location, group: list[Location]) -> None:
    """One merge: journal, merged file (named to sort where its first source did), sources removed,
    journal removed. `recover_compactions` finishes or drops a merge that a kill interrupted."""
    target = group[0].path.rsplit("/", 1)[0]
    merged = Location(group[0].fs, f"{target}/{group[0].name[:-len('.parquet')]}-merged.parquet",
                      f"{group[0].uri[:-len('.parquet')]}-merged.parquet")
    journal = out / COMPACTION / f"{uuid.uuid4().hex}.json"
    journal.write_bytes(dumps({"target": merged.uri, "sources": [f.uri for f in group]}))
    merged.write_parquet(pa.concat_tables([f.read_parquet() for f in group]))
    for f in group:
        f.delete()
    journal.delete()


def recover_compactions(out: Location) -> None:
    """A merge the kill interrupted: once its merged file exists, its sources go; before that, the
    merge never happened (its journal goes)."""
    for journal in (out / COMPACTION).files((".json",)):
        entry = json.loads(journal.read_text())
        if location(entry["target"]).exists():
            for source in entry["sources"]:
                location(source).delete()
        journal.delete()


# --- totals and the manifest ------------------------------------------------------------------------------


def output_totals(out: Location) -> dict:
    """Totals over everything committed in a synthesis output (this run and earlier resumed runs)."""
    totals = {"rationales": 0, "rejected": 0, "consistent": 0, "answer_in_docs": 0,
              "consistent_when_answer_in_docs": 0, "prompt_tokens": 0, "completion_tokens": 0,
              "finish_reasons": Counter(), "reject_reasons": Counter()}
    for file in (out / RATIONALES).files((".parquet",)):
        t = file.read_parquet(["consistent", "answer_in_docs", "prompt_tokens", "completion_tokens",
                               "finish_reason"]).to_pydict()
        totals["rationales"] += len(t["consistent"])
        totals["consistent"] += sum(t["consistent"])
        totals["answer_in_docs"] += sum(t["answer_in_docs"])
        totals["consistent_when_answer_in_docs"] += sum(c and a for c, a in zip(t["consistent"], t["answer_in_docs"]))
        totals["prompt_tokens"] += sum(t["prompt_tokens"])
        totals["completion_tokens"] += sum(t["completion_tokens"])
        totals["finish_reasons"].update(t["finish_reason"])
    for file in (out / REJECTED).files((".parquet",)):
        t = file.read_parquet(["stage", "reason"]).to_pydict()
        totals["rejected"] += len(t["stage"])
        totals["reject_reasons"].update(f"{s}:{r}" for s, r in zip(t["stage"], t["reason"]))
    totals["consistency"] = totals["consistent"] / totals["rationales"] if totals["rationales"] else None
    totals["consistency_when_answer_in_docs"] = (
        totals["consistent_when_answer_in_docs"] / totals["answer_in_docs"] if totals["answer_in_docs"] else None)
    totals["finish_reasons"] = dict(totals["finish_reasons"])
    totals["reject_reasons"] = dict(sorted(totals["reject_reasons"].items()))
    return totals


def write_manifest(out: Location | str, manifest: dict) -> Location:
    """Write manifest.json last (atomically): its presence means the job finished."""
    path = location(out) / MANIFEST
    path.write_bytes(dumps(manifest))
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
