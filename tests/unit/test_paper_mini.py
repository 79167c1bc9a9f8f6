"""benchmarks/paper_mini.py's data: the four datasets from ../shared/data/raw split by question, with
no test question trained on under any dataset's name, in a form the jobs read unchanged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from instructrag_ray.read import parse_record

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT.parent / "shared" / "data" / "raw"


def paper_mini():
    spec = importlib.util.spec_from_file_location("paper_mini", ROOT / "benchmarks" / "paper_mini.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    if not (RAW / "neuropath_hipporag2" / "popqa.json").exists():
        pytest.skip(f"{RAW} not present (it lies in ../shared beside the project in CI and sessions)")
    pm = paper_mini()
    out = tmp_path_factory.mktemp("paper_mini")
    # 87 of the Contriever file's 100 questions are HippoRAG PopQA questions: a large test split of one
    # makes the other's train split skip them.
    stats = pm.build_splits(RAW, out, list(pm.DATASETS), 30, 60, 0)
    rows = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "test")}
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    return pm, stats, rows, corpus


def test_every_dataset_gets_its_sizes(splits):
    pm, stats, rows, _ = splits
    for split, size in (("train", 30), ("test", 60)):
        for name in pm.DATASETS:
            assert sum(r["dataset"] == name for r in rows[split]) == size, (split, name)
    assert stats["questions"]["popqa-bm25"] == 999  # HippoRAG's 1000 rows repeat one question


def test_no_test_question_is_a_train_question_under_any_name(splits):
    pm, _, rows, _ = splits
    test_questions = {pm.question_key(r["question"]) for r in rows["test"]}
    assert not test_questions & {pm.question_key(r["question"]) for r in rows["train"]}
    assert not {r["id"] for r in rows["test"]} & {r["id"] for r in rows["train"]}
    # the overlap the split has to handle is really there
    popqa = {d: {pm.question_key(r["question"]) for r in pm.LOADERS[d](RAW)[0]} for d in ("popqa-bm25", "popqa-contriever")}
    assert len(popqa["popqa-bm25"] & popqa["popqa-contriever"]) == 87


def test_rows_parse_as_the_jobs_read_them(splits):
    _, _, rows, _ = splits
    for r in rows["train"] + rows["test"]:
        qa = parse_record(r, "")
        assert qa["dataset"] == r["dataset"] and qa["answers"]
        # only the Contriever rows bring documents; the others are retrieved from the BM25 pool
        assert (qa["ctxs"] is not None) == (r["dataset"] == "popqa-contriever")
        if qa["ctxs"]:
            assert len(qa["ctxs"]) == 25  # as released: some with empty text or no score (category pages)


def test_the_bm25_pool_holds_each_questions_own_paragraphs(splits):
    pm, stats, _, corpus = splits
    pool = {(p["title"], p["text"]) for p in corpus}
    assert len(pool) == len(corpus) == stats["passages"]
    for name in ("popqa-bm25", "2wiki", "nq"):
        _, passages = pm.LOADERS[name](RAW)
        assert passages and set(passages) <= pool, name
    # a 2Wiki paragraph is its sentences joined: the film's first sentence is its title alone
    film = [p["text"] for p in corpus if p["title"] == "Polish-Russian War (film)"]
    assert film == ["Polish-Russian War (Wojna polsko-ruska) is a 2009 Polish film directed by Xawery Żuławski based "
                    "on the novel Polish-Russian War under the white-red flag by Dorota Masłowska."]
