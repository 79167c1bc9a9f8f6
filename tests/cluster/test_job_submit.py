"""The README's job-submission path: `ray start --head`, then `ray job submit --working-dir .` of the
demo synthesis job, run in a private namespace (conftest.py), and the job's outputs checked here."""

import json

import pyarrow.parquet as pq
import pytest

from instructrag_ray import schemas

pytestmark = pytest.mark.integration

ROWS = 12


def test_ray_job_submit_runs_the_synthesis_job(run_scenario, outside_ray, tiny_model, world, index, tmp_path):
    out = tmp_path / "synthesis"
    result = run_scenario("submit", [
        "--input", str(world["qa"]), "--output", str(out), f"retrieval.index_path={index}", f"limit={ROWS}",
        "generation.max_new_tokens=8", "generation.batch_size=4", "progress_interval_s=0"], 300)

    job = result["job"]
    assert result["ray_start_rc"] == 0, f"ray start --head failed; see {result['log']}"
    assert result["submit_rc"] == 0 and job["status"] == "SUCCEEDED", job["message"] + "\n" + job["logs"][-4000:]
    assert job["entrypoint"].startswith("python jobs/synthesize.py")
    assert "[synthesize] done" in job["logs"]
    assert result["ray_stop_rc"] == 0

    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert manifest["input_rows"] == ROWS and totals["rationales"] + totals["rejected"] == ROWS
    assert totals["rationales"] > 0
    files = sorted((out / "rationales").glob("*.parquet"))
    for f in files:
        assert pq.read_schema(f).remove_metadata().equals(schemas.load("rationales").remove_metadata())
    rows = pq.read_table(out / "rationales").to_pylist()
    assert len(rows) == totals["rationales"] and all(r["generator"] == "transformers:tiny" for r in rows)
    assert all(r["ctxs_source"] == "retrieved" and r["ctxs"] for r in rows)

    # `ray stop --force` ran inside the namespace; the session's own Ray outside it is untouched
    outside_ray.check()
