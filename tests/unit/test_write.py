"""Outputs: staging and driver-side commit, resume scans (duplicates, retried rejects, first committed copy
wins), compaction and its journal, the settings a resume must match, the tables readers can always open.
Local directories here; tests/integration/test_object_storage.py runs the same on a real S3 API."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrag_ray import output as write
from instructrag_ray import read, schemas
from instructrag_ray.errors import OutputConflict
from instructrag_ray.storage import location


def flight_rows(n_good=2, n_bad=1, prefix="r"):
    rows = []
    for i in range(n_good + n_bad):
        bad = i >= n_good
        rows.append({
            "id": f"{prefix}{i}", "dataset": "d", "question": "q?", "answers": ["a"], "qa_pairs": None,
            "ctxs": [{"id": "1", "title": "t", "text": "a", "score": 1.0}], "ctxs_source": "given",
            "source": "f", "line": i, "original": json.dumps({"id": f"{prefix}{i}"}),
            "reject_stage": "generate" if bad else None, "reject_reason": "generation_error" if bad else None,
            "reject_detail": "boom" if bad else None,
            "prompt": None if bad else "p", "prompt_tokens": None if bad else 3, "truncated_tokens": None if bad else 0,
            "rationale": None if bad else "a", "completion_tokens": None if bad else 2,
            "finish_reason": None if bad else "stop", "generator": None if bad else "x", "consistent": None if bad else True,
            "answer_in_docs": None if bad else True,
        })
    return rows


def write_and_commit(out, rows, fingerprint="fp"):
    """One batch through the protocol: staged by the write stage, committed by the driver."""
    run = write.new_run(out)
    commit = write.Committer(run)
    stats = write.write_batch(pa.Table.from_pylist(rows), run, fingerprint).to_pylist()[0]
    commit(json.loads(stats["staged"]))
    commit.finish()
    return stats


def test_staged_files_are_invisible_until_the_driver_commits(tmp_path):
    out = location(tmp_path / "out")
    run = write.new_run(out)
    stats = write.write_batch(pa.Table.from_pylist(flight_rows()), run, "fp1").to_pylist()[0]
    assert stats["written"] == 2 and stats["rejected"] == 1 and json.loads(stats["reasons"]) == {"generate:generation_error": 1}
    staged = json.loads(stats["staged"])
    assert sorted(s.split("/")[0] for s in staged) == ["rationales", "rejected"]
    assert not (out / "rationales").files((".parquet",))  # a reader (or a resume) sees nothing yet
    assert write.scan_output(out).ids == set()
    write.Committer(run)(staged)
    good = pq.read_table(tmp_path / "out" / "rationales")
    assert good.schema.equals(schemas.load("rationales"), check_metadata=False) and good.num_rows == 2
    bad = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert bad[0]["original"] == '{"id": "r2"}' and bad[0]["config_fingerprint"] == "fp1"
    assert write.scan_output(out).ids == {"r0", "r1"}


def test_a_killed_runs_staging_is_discarded_and_never_committed(tmp_path):
    out = location(tmp_path / "out")
    dead = write.new_run(out)  # its driver was killed: its workers' writes stay in its staging directory
    write.write_batch(pa.Table.from_pylist(flight_rows(prefix="late")), dead, "fp")
    write_and_commit(out, flight_rows(prefix="r"))
    write.discard_staging(out)
    assert not (tmp_path / "out" / "_staging").exists()
    assert write.scan_output(out).ids == {"r0", "r1"}


def test_commit_names_sort_in_commit_order_across_runs(tmp_path):
    out = location(tmp_path / "out")
    write_and_commit(out, flight_rows(1, 0, prefix="a"))
    write_and_commit(out, flight_rows(1, 0, prefix="b"))
    names = [f.name for f in (out / "rationales").files((".parquet",))]
    firsts = [pq.read_table(tmp_path / "out" / "rationales" / n)["id"][0].as_py() for n in names]
    assert firsts == ["a0", "b0"]


def test_an_id_committed_twice_keeps_its_first_copy(tmp_path):
    out = location(tmp_path / "out")
    write_and_commit(out, flight_rows(2, 0))
    write_and_commit(out, flight_rows(3, 0))  # r0, r1 again (as if a batch were redone), and r2
    found = write.scan_output(out)
    assert found.removed_duplicates == 2 and found.ids == {"r0", "r1", "r2"}
    table = pq.read_table(tmp_path / "out" / "rationales")
    assert sorted(table["id"].to_pylist()) == ["r0", "r1", "r2"]
    assert write.scan_output(out).removed_duplicates == 0  # repaired once


def test_prepare_output_resumes_refuses_naming_the_changed_setting_and_overwrites(tmp_path):
    out = location(tmp_path / "out")
    rows = flight_rows()
    rows[2].update(reject_stage="prompt", reject_reason="prompt_too_long")
    shaping = {"generation": {"max_new_tokens": 48, "model": "tiny"}, "prompt": {"num_docs": 5}}
    write.prepare_output(out, write.scan_output(out), "fp1", shaping, overwrite=False)
    write_and_commit(out, rows, "fp1")
    existing = write.scan_output(out)
    assert write.prepare_output(out, existing, "fp1", shaping, overwrite=False).ids == {"r0", "r1", "r2"}
    changed = {"generation": {"max_new_tokens": 64, "model": "tiny"}, "prompt": {"num_docs": 5}}
    with pytest.raises(OutputConflict, match=r"generation.max_new_tokens: 48 -> 64\); .*overwrite=true"):
        write.prepare_output(out, write.scan_output(out), "fp2", changed, overwrite=False)
    assert write.prepare_output(out, write.scan_output(out), "fp2", changed, overwrite=True).ids == set()
    assert not list((tmp_path / "out").rglob("*.parquet"))
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["settings"] == changed


def test_rejects_for_a_passing_failure_are_taken_out_and_tried_again(tmp_path):
    out = location(tmp_path / "out")
    rows = flight_rows(1, 4)  # r1..r4 rejected
    rows[2].update(reject_stage="retrieve", reject_reason="search_failed")
    rows[3].update(reject_stage="validate", reject_reason="missing_answers")
    rows[4].update(reject_stage="prompt", reject_reason="prompt_too_long")
    write_and_commit(out, rows)
    alone = flight_rows(0, 1)
    alone[0]["id"] = "r5"
    write_and_commit(out, alone)  # a file of one generation_error
    (only_retried,) = [f for f in (tmp_path / "out" / "rejected").glob("*.parquet") if pq.read_metadata(f).num_rows == 1]

    existing = write.prepare_output(out, write.scan_output(out), "fp", {}, overwrite=False)
    assert existing.ids == {"r0", "r3", "r4"} and existing.retry_ids == {"r1", "r2", "r5"}
    left = pq.read_table(tmp_path / "out" / "rejected")
    assert left.schema.equals(schemas.load("rejected"), check_metadata=False)
    assert sorted(left["id"].to_pylist()) == ["r3", "r4"]  # kept: properties of the row and the settings
    assert not only_retried.exists() and not list(tmp_path.rglob(".*.tmp"))
    assert write.output_totals(out)["reject_reasons"] == {"validate:missing_answers": 1, "prompt:prompt_too_long": 1}


def test_duplicate_rejects_are_counted_not_marked_done(tmp_path):
    out = location(tmp_path / "out")
    rows = flight_rows(1, 2)
    rows[1].update(id="r0", reject_stage="validate", reject_reason="duplicate_id")
    rows[2].update(id="r0", reject_stage="validate", reject_reason="duplicate_id")
    write_and_commit(out, rows)
    found = write.scan_output(out)
    assert found.ids == {"r0"} and found.duplicate_counts == {"r0": 2} and found.removed_duplicates == 0


def test_compaction_merges_small_files_and_a_kill_mid_merge_is_recovered(tmp_path, ray_local):
    out = location(tmp_path / "out")
    for k in range(5):
        write_and_commit(out, flight_rows(3, 0, prefix=f"b{k}-"))
    assert len((out / "rationales").files((".parquet",))) == 5
    assert write.compact(out, ["rationales"], rows_per_file=7) == 2  # 5 files -> 3 (6 + 6 + 3 rows)
    files = (out / "rationales").files((".parquet",))
    assert [pq.read_metadata(f.path).num_rows for f in files] == [6, 6, 3]
    assert sorted(pq.read_table(tmp_path / "out" / "rationales")["id"].to_pylist()) == sorted(
        f"b{k}-{i}" for k in range(5) for i in range(3))

    # a merge killed after its merged file was written: the sources go on the next scan
    group = [f for f in files if pq.read_metadata(f.path).num_rows == 6]
    journal = out / "_compaction" / "j.json"
    merged = group[0].parent / "part-x-merged.parquet"
    journal.write_bytes(json.dumps({"target": merged.uri, "sources": [f.uri for f in group]}).encode())
    merged.write_parquet(pa.concat_tables([f.read_parquet() for f in group]))
    assert write.scan_output(out).ids == {f"b{k}-{i}" for k in range(5) for i in range(3)}
    assert write.scan_output(out).removed_duplicates == 0 and not journal.exists()
    # a merge killed before its merged file: nothing happened
    journal.write_bytes(json.dumps({"target": (group[0].parent / "never.parquet").uri,
                                    "sources": [merged.uri]}).encode())
    assert len(write.scan_output(out).ids) == 15 and merged.exists() and not journal.exists()


def test_compaction_groups_only_small_consecutive_files():
    files = [(f"f{i}", n) for i, n in enumerate([3, 3, 10, 2, 2, 2, 9])]
    assert write.compaction_groups(files, rows_per_file=5) == [["f3", "f4"]]  # 3+3 > 5; f2 is full
    assert write.compaction_groups(files, rows_per_file=7) == [["f0", "f1"], ["f3", "f4", "f5"]]
    assert write.compaction_groups(files, rows_per_file=100) == [["f0", "f1", "f2", "f3", "f4", "f5", "f6"]]


def test_tables_always_exist_and_the_card_names_them(tmp_path):
    out = location(tmp_path / "out")
    write_and_commit(out, flight_rows(2, 0))  # nothing rejected
    write.ensure_tables(out, {"rationales": "rationales", "rejected": "rejected"})
    rejected = pq.read_table(tmp_path / "out" / "rejected")
    assert rejected.num_rows == 0 and rejected.schema.equals(schemas.load("rejected"), check_metadata=False)
    write.write_card(out, ["rationales", "rejected"], "rationales", "About.")
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'config_name: rationales\n  data_files: "rationales/*.parquet"\n  default: true' in card


def test_output_totals_count_everything(tmp_path):
    out = location(tmp_path / "out")
    write_and_commit(out, flight_rows(3, 2))
    totals = write.output_totals(out)
    assert totals["rationales"] == 3 and totals["rejected"] == 2 and totals["consistency"] == 1.0
    assert totals["reject_reasons"] == {"generate:generation_error": 2} and totals["finish_reasons"] == {"stop": 3}


def test_flight_schema_starts_from_the_qa_schema():
    assert read.FLIGHT_SCHEMA.names[: len(schemas.columns("qa"))] == schemas.columns("qa")
