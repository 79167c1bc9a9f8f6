"""The whole synthesis job on a local Ray, on the synthetic world, with the real tiny model and a real
tantivy index: schemas, counts, reject reasons, resume, manifest, and read-back by other tools."""

import json

import pyarrow.parquet as pq
import pytest

from instructrag_ray import schemas
from instructrag_ray.config import SynthesizeConfig, load_config
from instructrag_ray.synthesize import run_synthesis

pytestmark = pytest.mark.integration

BAD_ROWS = [
    '{"id": "bad-1", "question": "Who?"}',                                    # no answers
    '{"id": "bad-2", "answers": ["x"]}',                                      # no question
    '{"id": "bad-3", "question": "Who?", "answers": ["x"], "ctxs": [{"title": "t"}]}',  # malformed ctxs
    '{"id": "bad-4", "question": "Who?", "answers": [1]}',                    # wrong types
    '{"id": "bad-5", "question": "zzzqqq xxyyzz", "answers": ["x"]}',         # retrieval finds nothing
    '{not json',
]


@pytest.fixture
def qa_file(world, tmp_path):
    lines = world["qa"].read_text().splitlines()[:24]
    given = {"id": "given-1", "question": "Who founded Tarsel?", "answers": ["Ema Lorn"], "dataset": "popqa",
             "ctxs": [{"id": "d1", "title": "Tarsel", "text": "Tarsel was founded by Ema Lorn.", "score": "3.5"},
                      {"id": "d2", "title": "Other", "text": "Unrelated.", "score": "1.0"}]}
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines + BAD_ROWS + [json.dumps(given), lines[0]]) + "\n")  # last: duplicate id
    return path, len(lines) + len(BAD_ROWS) + 2


def config(qa, out, index, *extra):
    return load_config(SynthesizeConfig, None, [
        f"input={qa}", f"output={out}", f"retrieval.index_path={index}", "generation.max_new_tokens=8",
        "generation.batch_size=8", "generation.micro_batch_size=4", "progress_interval_s=0", *extra])


def read_dir(path):
    return pq.read_table(path).to_pylist() if any(path.glob("*.parquet")) else []


def test_synthesis_end_to_end_then_resume(ray_local, tiny_model, index, qa_file, tmp_path):
    qa, n_in = qa_file
    out = tmp_path / "out"
    manifest = run_synthesis(config(qa, out, index))

    files = sorted((out / "rationales").glob("*.parquet")) + sorted((out / "rejected").glob("*.parquet"))
    for f in files:
        kind = f.parent.name
        assert pq.read_schema(f).remove_metadata().equals(schemas.load(kind).remove_metadata(), check_metadata=False), f

    good, bad = read_dir(out / "rationales"), read_dir(out / "rejected")
    assert len(good) + len(bad) == n_in
    by_id = {r["id"]: r for r in bad}
    assert by_id["bad-1"]["reason"] == "missing_answers" and by_id["bad-2"]["reason"] == "missing_question"
    assert by_id["bad-3"]["reason"] == "bad_ctxs" and by_id["bad-4"]["reason"] == "bad_answers"
    assert by_id["bad-5"]["stage"] == "retrieve" and by_id["bad-5"]["reason"] == "no_documents"
    assert any(r["reason"] == "invalid_json" for r in bad)
    assert sum(r["reason"] == "duplicate_id" for r in bad) == 1
    assert all(r["original"] for r in bad)
    assert len({r["id"] for r in good}) == len(good)

    given = next(r for r in good if r["id"] == "given-1")
    assert given["ctxs_source"] == "given" and given["ctxs"][0]["score"] == 3.5
    assert all(r["ctxs_source"] == "retrieved" for r in good if r["id"] != "given-1")
    assert all(r["generator"] == "transformers:tiny" and r["prompt"].startswith("<|begin_of_text|>") for r in good)
    assert all(0 < r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in good)

    m = json.loads((out / "manifest.json").read_text())
    assert m == json.loads(json.dumps(manifest, default=str))
    assert m["input_rows"] == n_in and m["totals"]["rationales"] == len(good) and m["totals"]["rejected"] == len(bad)
    assert sum(m["totals"]["reject_reasons"].values()) == len(bad)
    assert m["this_run"]["completion_tokens"] == sum(r["completion_tokens"] for r in good)
    assert m["versions"]["ray"] and m["config_fingerprint"] == good[0]["config_fingerprint"]

    # the outputs read back with pandas and Hugging Face datasets
    import datasets
    import pandas as pd

    assert len(pd.read_parquet(out / "rationales")) == len(good)
    hf = datasets.load_dataset("parquet", data_files=str(out / "rationales" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == len(good) and set(hf.column_names) == set(schemas.columns("rationales"))

    # resume: nothing new, nothing duplicated
    before = sorted(p.name for p in out.rglob("*.parquet"))
    again = run_synthesis(config(qa, out, index))
    assert again["this_run"]["written"] == 0 and again["this_run"]["rejected"] == 0
    assert again["this_run"]["resumed_rows_skipped"] == n_in
    assert sorted(p.name for p in out.rglob("*.parquet")) == before

    # an interrupted run: drop some files, rerun, and the ids come back exactly once
    victim = sorted((out / "rationales").glob("*.parquet"))[0]
    lost = len(pq.read_table(victim))
    victim.unlink()
    third = run_synthesis(config(qa, out, index))
    assert third["this_run"]["written"] == lost
    ids = [r["id"] for r in read_dir(out / "rationales")]
    assert len(ids) == len(set(ids)) == len(good)

    # a changed prompt/model setting is refused, unless overwrite
    from instructrag_ray.errors import OutputConflict as ResumeConflict

    with pytest.raises(ResumeConflict, match="overwrite=true"):
        run_synthesis(config(qa, out, index, "prompt.num_docs=3"))
    fresh = run_synthesis(config(qa, out, index, "prompt.num_docs=3", "overwrite=true", "limit=5"))
    assert fresh["input_rows"] == 5 and fresh["totals"]["rationales"] + fresh["totals"]["rejected"] == 5


def test_template_baseline_is_consistent_when_the_answer_is_retrieved(ray_local, tiny_model, index, world, tmp_path):
    out = tmp_path / "tpl"
    run_synthesis(config(world["qa"], out, index, "generation.engine=template-baseline", "limit=40"))
    good = read_dir(out / "rationales")
    assert good and all(r["generator"] == "template-baseline" for r in good)
    # the template states a gold answer, so every rationale is consistent
    assert all(r["consistent"] for r in good)
    named = [r for r in good if r["answer_in_docs"]]
    assert named and all("contain" in r["rationale"] and "Document" in r["rationale"] for r in named)


def test_every_block_is_written_on_its_own(ray_local, tiny_model, index, world, tmp_path):
    """Blocks of a small run are one generation batch each and stay apart through every stage (Ray Data
    merges blocks smaller than an actor stage's batch_size: retrieval's 64 once held a whole run's rows
    in one block, so nothing was committed before the end). rows_per_file=0 keeps the file per block."""
    from instructrag_ray.synthesize import block_rows

    out = tmp_path / "out"
    manifest = run_synthesis(config(world["qa"], out, index, "limit=40", "generation.batch_size=4",
                                    "rows_per_file=0"))
    assert manifest["this_run"]["written"] + manifest["this_run"]["rejected"] == 40
    sizes = [pq.read_metadata(f).num_rows for f in (out / "rationales").glob("*.parquet")]
    assert block_rows(40, 4) == 4 and max(sizes) <= 4 and len(sizes) >= 40 // 4 - 1, sizes
