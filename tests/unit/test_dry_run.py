"""--dry-run of every job: the checks a run makes before work, then what it would run; nothing is written
and Ray is not needed (the integration demo test runs one with an unreachable RAY_ADDRESS)."""

import json

import pytest

from instructrag_ray import cli, dryrun
from instructrag_ray.config import BuildIndexConfig, EvaluateConfig, SynthesizeConfig, load_config
from instructrag_ray.errors import InputError, OutputConflict
from instructrag_ray.storage import StorageError
from instructrag_ray.evaluate import run_evaluation
from instructrag_ray.retrieval.build import build_index
from instructrag_ray.synthesize import PLAN_COLUMNS, plan_from_rows, run_synthesis
from instructrag_ray.output import ExistingOutput


def test_parsed_rows_are_the_pipelines_rows_in_input_order(world):
    rows = dryrun.parsed_rows(str(world["qa"]), "qa", list(PLAN_COLUMNS))
    lines = world["qa"].read_bytes().splitlines(keepends=True)
    offsets = [sum(len(line) for line in lines[:n]) for n in range(len(lines))]  # a row's position: its byte offset
    assert len(rows) == len(lines) and [r["line"] for r in rows] == offsets
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in lines]


def test_synthesis_dry_run_counts_rows_and_writes_nothing(world, index, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = load_config(SynthesizeConfig, None, [f"input={world['qa']}", f"output={out}", f"retrieval.index_path={index}",
                                               "limit=20", "generation.max_new_tokens=8"])
    plan = run_synthesis(cfg, dry_run=True)
    assert not out.exists()
    assert plan["dry_run"] and plan["output"] == f"{out}: 0 rows already written (resumed), 20 to process"
    assert plan["stages"] == "read -> validate -> select -> retrieve -> prompt -> generate -> check -> write"
    assert plan["retrieve"].startswith(f"tantivy index {index}, top 5, for 20 rows: 1 actor x 0.5 CPU")
    assert plan["generate"] == "transformers, tiny: 1 actor x 1 CPU, batches of 128, at most 8 new tokens"
    printed = capsys.readouterr().out
    assert printed.startswith("[synthesize] dry run: every check passed; nothing was started\n")


def test_dry_run_fails_like_the_run_would(world, tiny_model, tmp_path):
    base = [f"input={world['qa']}", f"output={tmp_path / 'o'}"]
    with pytest.raises(InputError, match="retrieval.index_path is not set"):
        run_synthesis(load_config(SynthesizeConfig, None, base), dry_run=True)
    with pytest.raises(StorageError, match="does not exist; pass --input"):
        run_synthesis(load_config(SynthesizeConfig, None, [f"input={tmp_path / 'none.jsonl'}", "output=o"]), dry_run=True)


def test_plan_from_rows_skips_done_ids_and_extra_copies():
    rows = [{"id": i, "source": "f", "line": n, "ctxs_source": None, "reject_stage": None}
            for n, i in enumerate(["a", "b", "a", "c"], 1)]
    plan = plan_from_rows(rows, ExistingOutput(ids={"b"}), limit=0)
    assert (plan.total, plan.todo, plan.skipped, plan.need_retrieval) == (4, 3, 1, 2)
    assert plan.duplicates == {("f", 3): False}
    assert plan_from_rows(rows, ExistingOutput(), limit=2).keep == {("f", 1), ("f", 2)}


def test_evaluation_dry_run(world, index, tiny_model, tmp_path):
    out = tmp_path / "eval"
    cfg = load_config(EvaluateConfig, None, [f"input={world['test']}", f"output={out}", f"retrieval.index_path={index}",
                                             "methods=vanilla-rag,no-retrieval", "limit=6"])
    plan = run_evaluation(cfg, dry_run=True)
    assert not out.exists()
    assert plan["methods"] == "vanilla-rag, no-retrieval"
    assert plan["output"] == f"{out}: 0 (row, method) pairs already predicted (resumed), 12 to generate"
    assert plan["generate (generation.model)"].startswith("transformers, tiny: 1 actor x 1 CPU")


def test_build_index_dry_run(world, index, tmp_path):
    new = tmp_path / "new-index"
    plan = build_index(load_config(BuildIndexConfig, None, [f"corpus={world['corpus']}", f"index={new}"]), dry_run=True)
    assert "would be created" in plan["index"] and not new.exists()
    with pytest.raises(OutputConflict, match="overwrite=true"):
        build_index(load_config(BuildIndexConfig, None, [f"corpus={world['corpus']}", f"index={index}"]), dry_run=True)
    plan = build_index(load_config(BuildIndexConfig, None, [f"corpus={world['corpus']}", f"index={index}",
                                                            "overwrite=true"]), dry_run=True)
    assert "would be replaced" in plan["index"]


def test_dry_run_flag_reaches_the_job(world, index, tiny_model, tmp_path, capsys):
    cli.job_main("synthesize", ["--input", str(world["qa"]), f"retrieval.index_path={index}", "--dry-run",
                                "--output", str(tmp_path / "o"), "limit=3"])
    assert "3 to process" in capsys.readouterr().out and not (tmp_path / "o").exists()
