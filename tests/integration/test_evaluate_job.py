"""The whole evaluation job on a local Ray, on the synthetic world: template rationales from the synthesis
job as demonstrations, the real tiny model (and a copy of it standing in for a fine-tuned model), a real
tantivy index. Every method writes predictions, metrics and the report; a rerun resumes; bad inputs
fail before any generation."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from instructrag_ray import schemas
from instructrag_ray.answers import has_answer, str_em
from instructrag_ray.config import EvaluateConfig, SynthesizeConfig, load_config
from instructrag_ray.errors import JobError as EvaluationError
from instructrag_ray.evaluate import run_evaluation
from instructrag_ray.synthesize import run_synthesis

pytestmark = pytest.mark.integration

METHODS = ["instructrag-ft", "instructrag-icl", "vanilla-rag", "icl-qa", "no-retrieval"]


@pytest.fixture(scope="module")
def synthesis(ray_local, tiny_model, index, world, tmp_path_factory):
    """Template rationales for the training split: the demonstrations' source."""
    out = tmp_path_factory.mktemp("synthesis")
    run_synthesis(load_config(SynthesizeConfig, None, [
        f"input={world['train']}", f"output={out}", f"retrieval.index_path={index}",
        "generation.engine=template-baseline", "progress_interval_s=0"]))
    return out


@pytest.fixture(scope="module")
def ft_model(tiny_model, tmp_path_factory):
    # jobs/train.py's output stands in here: a model directory of its own (the tiny model, copied).
    path = tmp_path_factory.mktemp("ft") / "model"
    shutil.copytree(tiny_model, path)
    return str(path)


@pytest.fixture
def test_file(world, tmp_path):
    rows = [json.loads(line) for line in world["test"].read_text().splitlines()]
    given = {"id": "given-1", "dataset": "synthetic-popqa", "question": "Who founded Tarsel?", "answers": ["Ema Lorn"],
             "ctxs": [{"id": "g1", "title": "Tarsel", "text": "Tarsel was founded by Ema Lorn.", "score": "3.5"},
                      {"id": "g2", "title": "Other", "text": "Unrelated.", "score": "1.0"}]}
    no_answers = {"id": "bad-1", "dataset": "synthetic-popqa", "question": "Who?"}
    path = tmp_path / "qa_test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows + [given, no_answers]) + "\n")
    return path, {r["id"]: r for r in rows + [given]}


def config(qa, out, index, demos, ft, *extra):
    return load_config(EvaluateConfig, None, [
        f"input={qa}", f"output={out}", f"retrieval.index_path={index}", f"demos.path={demos}", f"ft_model={ft}",
        "generation.max_new_tokens=8", "generation.batch_size=16", "generation.micro_batch_size=8",
        "generation.num_cpus=0.5", "metrics.resamples=200", "progress_interval_s=0", *extra])


def test_every_method_writes_predictions_metrics_and_report_then_resumes(ray_local, index, synthesis, ft_model,
                                                                         test_file, tmp_path):
    qa, expected = test_file
    out = tmp_path / "eval"
    manifest = run_evaluation(config(qa, out, index, synthesis, ft_model))

    files = sorted((out / "predictions").glob("*.parquet"))
    for f in files:
        assert pq.read_schema(f).remove_metadata().equals(schemas.load("predictions").remove_metadata()), f
    preds = pq.read_table(out / "predictions").to_pylist()
    assert sorted((r["id"], r["method"]) for r in preds) == sorted((i, m) for i in expected for m in METHODS)

    demo_ids = {d["id"] for chosen in manifest["demonstrations"].values() for d in chosen}
    rationales = {r["id"]: r for r in pq.read_table(synthesis / "rationales").to_pylist()}
    assert demo_ids and all(rationales[i]["consistent"] for i in demo_ids) and not demo_ids & set(expected)
    for r in preds:
        row = expected[r["id"]]
        assert r["correct"] == has_answer(r["prediction"], row["answers"])  # the one definition
        assert (r["str_em"] is None) == (not row.get("qa_pairs"))
        if row.get("qa_pairs"):
            pairs = [{"question": p["question"], "answers": p["answers"]} for p in row["qa_pairs"]]
            assert r["str_em"] == pytest.approx(str_em(r["prediction"], pairs))
        assert 0 < r["completion_tokens"] <= 8 and r["prompt"].startswith("<|begin_of_text|>")
        assert r["generator"] == (f"transformers:{ft_model}" if r["method"] == "instructrag-ft" else "transformers:tiny")
        if r["method"] == "no-retrieval":
            assert r["doc_ids"] is None and "Document 1" not in r["prompt"]
        else:
            assert r["doc_ids"] and r["ctxs_source"] == ("given" if r["id"] == "given-1" else "retrieved")
        if r["method"] in ("instructrag-icl", "icl-qa"):
            assert len(r["demo_ids"]) == 2 and set(r["demo_ids"]) <= demo_ids
            demo = rationales[r["demo_ids"][0]]
            shown = demo["rationale"] if r["method"] == "instructrag-icl" else "Answer: "
            assert shown in r["prompt"]
        else:
            assert r["demo_ids"] is None
    given = {r["method"]: r for r in preds if r["id"] == "given-1"}
    assert given["vanilla-rag"]["doc_ids"] == ["g2", "g1"] and given["vanilla-rag"]["answer_in_docs"]

    # the row without answers is rejected once, not once per method
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejected] == [("bad-1", "missing_answers")]
    assert manifest["rejected"] == {"all methods": {"validate:missing_answers": 1}}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == METHODS
    datasets = sorted({r["dataset"] for r in expected.values()})
    assert metrics["datasets"] == datasets + ["overall"]
    for m in METHODS:
        overall = metrics["scores"][m]["overall"]
        assert overall["n"] == len(expected)
        acc = overall["accuracy"]
        assert acc["value"] == pytest.approx(sum(r["correct"] for r in preds if r["method"] == m) / len(expected))
        assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
        for d in datasets:
            assert metrics["scores"][m][d]["n"] == sum(r["dataset"] == d for r in expected.values())
    assert metrics["headline"]["synthetic-asqa"] == "str_em" and metrics["headline"]["synthetic-popqa"] == "accuracy"
    assert len({(p["a"], p["b"]) for p in metrics["paired"]}) == 10
    assert all(p["n"] == len(expected) for p in metrics["paired"] if p["dataset"] == "overall" and p["metric"] == "accuracy")

    report = (out / "report.md").read_text()
    assert all(f"| {m} | " in report for m in METHODS) and "instructrag-ft − vanilla-rag" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "manifest.json").read_text())["predictions"] == {m: len(expected) for m in METHODS}

    # a rerun resumes: nothing generated again, nothing duplicated, the reports rebuilt
    before = sorted(p.name for p in (out / "predictions").glob("*.parquet"))
    again = run_evaluation(config(qa, out, index, synthesis, ft_model))
    assert again["this_run"]["written"] == 0 and again["this_run"]["resumed_pairs_skipped"] == len(preds)
    assert sorted(p.name for p in (out / "predictions").glob("*.parquet")) == before
    assert json.loads((out / "metrics.json").read_text())["scores"] == metrics["scores"]
    assert [r["id"] for r in pq.read_table(out / "rejected").to_pylist()] == ["bad-1"]


def test_bad_inputs_fail_before_any_generation(ray_local, index, synthesis, ft_model, world, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EvaluationError, match="demos.path .*nope does not exist"):
        run_evaluation(config(world["test"], out, index, tmp_path / "nope", ft_model))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(EvaluationError, match="ft_model=.*broken-model' could not be loaded"):
        run_evaluation(config(world["test"], out, index, synthesis, broken))
    no_answers = tmp_path / "questions.jsonl"
    no_answers.write_text('{"question": "Who built Tarsel?"}\n{"question": "Where is Orvel?"}\n')
    with pytest.raises(EvaluationError, match="dataset 'questions' in .* has no row with gold answers"):
        run_evaluation(config(no_answers, out, index, synthesis, ft_model))
    assert not (out / "predictions").exists()
