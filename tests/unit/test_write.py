import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrag_ray import output as write
from instructrag_ray.errors import OutputConflict
from instructrag_ray import read, schemas


def flight_rows(n_good=2, n_bad=1):
    rows = []
    for i in range(n_good + n_bad):
        bad = i >= n_good
        rows.append({
            "id": f"r{i}", "dataset": "d", "question": "q?", "answers": ["a"], "qa_pairs": None,
            "ctxs": [{"id": "1", "title": "t", "text": "a", "score": 1.0}], "ctxs_source": "given",
            "source": "f", "line": i, "original": json.dumps({"id": f"r{i}"}),
            "reject_stage": "generate" if bad else None, "reject_reason": "generation_error" if bad else None,
            "reject_detail": "boom" if bad else None,
            "prompt": None if bad else "p", "prompt_tokens": None if bad else 3, "truncated_tokens": None if bad else 0,
            "rationale": None if bad else "a", "completion_tokens": None if bad else 2,
            "finish_reason": None if bad else "stop", "generator": None if bad else "x", "consistent": None if bad else True,
            "answer_in_docs": None if bad else True,
        })
    return rows


def test_write_batch_splits_rows_with_explicit_schemas(tmp_path):
    stats = write.write_batch(pa.Table.from_pylist(flight_rows()), str(tmp_path), "fp1").to_pylist()[0]
    assert stats["written"] == 2 and stats["rejected"] == 1 and json.loads(stats["reasons"]) == {"generate:generation_error": 1}
    good = pq.read_table(tmp_path / "rationales")
    assert good.schema.equals(schemas.load("rationales"), check_metadata=False) and good.num_rows == 2
    bad = pq.read_table(tmp_path / "rejected").to_pylist()
    assert bad[0]["original"] == '{"id": "r2"}' and bad[0]["config_fingerprint"] == "fp1"
    assert not list(tmp_path.rglob(".*.tmp"))  # nothing half-written left behind


def test_prepare_output_resumes_refuses_and_overwrites(tmp_path):
    rows = flight_rows()
    rows[2].update(reject_stage="prompt", reject_reason="prompt_too_long")
    write.write_batch(pa.Table.from_pylist(rows), str(tmp_path), "fp1")
    assert write.prepare_output(str(tmp_path), "fp1", overwrite=False).ids == {"r0", "r1", "r2"}
    with pytest.raises(OutputConflict, match="overwrite=true"):
        write.prepare_output(str(tmp_path), "fp2", overwrite=False)
    assert write.prepare_output(str(tmp_path), "fp2", overwrite=True).ids == set()
    assert not list(tmp_path.rglob("*.parquet"))


def test_rejects_for_a_passing_failure_are_taken_out_and_tried_again(tmp_path):
    rows = flight_rows(1, 4)  # r1..r4 rejected
    rows[2].update(reject_stage="retrieve", reject_reason="search_failed")
    rows[3].update(reject_stage="validate", reject_reason="missing_answers")
    rows[4].update(reject_stage="prompt", reject_reason="prompt_too_long")
    write.write_batch(pa.Table.from_pylist(rows), str(tmp_path), "fp")
    alone = flight_rows(0, 1)
    alone[0]["id"] = "r5"
    write.write_batch(pa.Table.from_pylist(alone), str(tmp_path), "fp")  # a file of one generation_error
    (only_retried,) = [f for f in (tmp_path / "rejected").glob("*.parquet") if pq.read_metadata(f).num_rows == 1]

    existing = write.prepare_output(str(tmp_path), "fp", overwrite=False)
    assert existing.ids == {"r0", "r3", "r4"} and existing.retry_ids == {"r1", "r2", "r5"}
    left = pq.read_table(tmp_path / "rejected")
    assert left.schema.equals(schemas.load("rejected"), check_metadata=False)
    assert sorted(left["id"].to_pylist()) == ["r3", "r4"]  # kept: properties of the row and the settings
    assert not only_retried.exists() and not list(tmp_path.rglob(".*.tmp"))
    assert write.output_totals(str(tmp_path))["reject_reasons"] == {"validate:missing_answers": 1,
                                                                     "prompt:prompt_too_long": 1}


def test_duplicate_rejects_do_not_mark_the_kept_id_done(tmp_path):
    rows = flight_rows(1, 1)
    rows[1].update(id="r0", reject_stage="validate", reject_reason="duplicate_id")
    write.write_batch(pa.Table.from_pylist(rows), str(tmp_path), "fp")
    (tmp_path / "rationales").rename(tmp_path / "lost")  # the kept row's file is lost
    found = write.scan_output(str(tmp_path))
    assert found.ids == set() and found.duplicate_ids == {"r0"}


def test_output_totals_count_everything(tmp_path):
    write.write_batch(pa.Table.from_pylist(flight_rows(3, 2)), str(tmp_path), "fp")
    totals = write.output_totals(str(tmp_path))
    assert totals["rationales"] == 3 and totals["rejected"] == 2 and totals["consistency"] == 1.0
    assert totals["reject_reasons"] == {"generate:generation_error": 2} and totals["finish_reasons"] == {"stop": 3}


def test_flight_schema_starts_from_the_qa_schema():
    assert read.FLIGHT_SCHEMA.names[: len(schemas.columns("qa"))] == schemas.columns("qa")
