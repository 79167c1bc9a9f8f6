"""The evaluation job's parts without Ray: each method's prompt, demonstrations (loading, consistency,
reproducible draws, exclusions), early checks on models and config, resume bookkeeping, the prompt and
score stages on hand-made batches."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrag_ray import prompts, read, schemas
from instructrag_ray.config import ConfigError, EvaluateConfig, load_config
from instructrag_ray.demos import load_demo_pool, select_demos, short_answer
from instructrag_ray.errors import JobError as EvaluationError
from instructrag_ray.storage import location
from instructrag_ray.evaluate import NO_RETRIEVAL_QUESTION, PromptStage, check_model, method_parts, prepare_output, score_batch

DOCS = [{"id": "d2", "title": "B", "text": "Bravo.", "score": 1.0}, {"id": "d1", "title": "A", "text": "Alpha.", "score": 2.0}]
DEMOS = [{"id": "x1", "question": "Who wrote Emma?", "rationale": "Document 1 says Austen. So: Jane Austen.",
          "answer": "Jane Austen"},
         {"id": "x2", "question": ". where is Paris", "rationale": "Paris is in France.", "answer": "France"}]


# --- prompts ---------------------------------------------------------------------------------------------


def test_ft_and_vanilla_rag_share_papers_ft_prompt():
    ft = method_parts("instructrag-ft", "Who is X?", DOCS, [])
    assert ft == method_parts("vanilla-rag", "Who is X?", DOCS, []) == prompts.ft_parts("Who is X?", DOCS)
    assert ft.text == ("Document 1 (Title: B): Bravo.\n\nDocument 2 (Title: A): Alpha.\n\n"
                       "Based on your knowledge and the provided information, answer the question:\nwho is X?")


def test_icl_prompts_differ_only_in_the_demonstration_answers():
    icl = method_parts("instructrag-icl", "Who is X", DOCS, DEMOS).text
    qa = method_parts("icl-qa", "Who is X", DOCS, DEMOS).text
    assert icl == prompts.icl_parts("Who is X", DOCS, DEMOS).text
    assert "Example 1\n\nQuestion: who wrote Emma?\n\nAnswer: Document 1 says Austen. So: Jane Austen.\n\n" in icl
    assert "Example 1\n\nQuestion: who wrote Emma?\n\nAnswer: Jane Austen\n\n" in qa
    assert "Example 2\n\nQuestion: where is Paris?\n\nAnswer: France\n\n###" in qa
    assert icl.replace(DEMOS[0]["rationale"], "Jane Austen").replace(DEMOS[1]["rationale"], "France") == qa
    assert qa.endswith("Document 2 (Title: A): Alpha.\n\n"
                       "Based on your knowledge and the provided information, answer the question:\nwho is X?")


def test_no_retrieval_is_the_question_alone():
    parts = method_parts("no-retrieval", ". Who is X", DOCS, DEMOS)
    assert parts.docs == "" and parts.head == ""
    assert parts.text == NO_RETRIEVAL_QUESTION.format(question="who is X?")
    assert parts.text == "Based on your knowledge, answer the question:\nwho is X?"


def test_short_answer_for_icl_qa():
    assert short_answer(["Paris", "Paris, France"], None) == "Paris"
    pairs = [{"question": "a", "answers": ["X", "Xx"]}, {"question": "b", "answers": ["Y"]},
             {"question": "c", "answers": ["Z"]}, {"question": "d", "answers": []}]
    assert short_answer(["ignored"], pairs) == "X, Y and Z"
    assert short_answer(None, None) is None


# --- demonstrations --------------------------------------------------------------------------------------


def write_rationales(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("dataset", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string())),
        ("rationale", pa.string()), ("consistent", pa.bool_())]))
    pq.write_table(table, folder / "part-0.parquet")


def rationale_rows():
    rows = []
    for i in range(12):
        ds = "popqa" if i < 8 else "asqa"
        rows.append({"id": f"r{i:02d}", "dataset": ds, "question": f"Question {i}?", "answers": [f"ans{i}"],
                     "rationale": f"The answer is ans{i}." if i % 4 else "I do not know.",
                     "consistent": bool(i % 4)})
    return rows


def test_demos_from_a_synthesis_output_are_consistent_reproducible_and_never_test_rows(tmp_path):
    write_rationales(tmp_path / "syn" / "rationales", rationale_rows())
    pool = load_demo_pool(str(tmp_path / "syn"))
    assert [d["id"] for d in pool] == [f"r{i:02d}" for i in range(12)]
    assert pool[1]["answer"] == "ans1" and pool[0]["consistent"] is False

    args = dict(datasets=["popqa", "asqa"], num=2, seed=0, mode="same", exclude_ids={"r01"},
                exclude_questions={"question 2?"})
    chosen = select_demos(pool, **args)
    assert chosen == select_demos(pool, **args)  # reproducible
    popqa_ids = [d["id"] for d in chosen["popqa"]]
    assert len(popqa_ids) == 2 and popqa_ids == sorted(popqa_ids)
    assert set(popqa_ids) <= {"r03", "r05", "r06", "r07"}  # consistent, popqa, not r01 (test id), not r02 (test question)
    assert len(chosen["asqa"]) == 2 and {d["id"] for d in chosen["asqa"]} <= {"r09", "r10", "r11"}  # r08 inconsistent
    assert all(d["dataset"] == "asqa" for d in chosen["asqa"])
    seeds = {tuple(d["id"] for d in select_demos(pool, **{**args, "seed": s})["popqa"]) for s in range(20)}
    assert len(seeds) > 1  # the seed matters


def test_too_few_consistent_demos_fail_with_a_clear_message(tmp_path):
    write_rationales(tmp_path / "r", rationale_rows())
    pool = load_demo_pool(str(tmp_path / "r"))  # a bare directory of Parquet works too
    with pytest.raises(EvaluationError, match="for dataset 'asqa' but demos.num=4.*demos.pool=any"):
        select_demos(pool, ["asqa"], 4, 0, "same", set(), set(), "r")
    assert len(select_demos(pool, ["asqa"], 4, 0, "any", set(), set())["asqa"]) == 4
    with pytest.raises(EvaluationError, match="for dataset 'nq'"):
        select_demos(pool, ["nq"], 2, 0, "same", set(), set())


def test_missing_or_malformed_demos_fail_at_start(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        load_demo_pool(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="holds no rationale Parquet"):
        load_demo_pool(str(tmp_path / "empty"))
    pq.write_table(pa.table({"id": ["a"], "question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(EvaluationError, match=r"lacks column\(s\) \['answers', 'rationale'\]"):
        load_demo_pool(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(EvaluationError, match="record 0 needs 'question' and 'rationale'"):
        load_demo_pool(str(tmp_path / "bad.json"))


def test_demos_json_in_the_authors_format(tmp_path):
    # The authors' demos.json stores answers and qa_pairs as Python-literal strings and has no dataset.
    demos = [
        {"question": "Who is the author of The Mahdi?", "answers": "['A. J. Quinnell', 'Philip Nicholson']",
         "qa_pairs": "None", "rationale": "Document 2 names A.J. Quinnell, so the answer is A. J. Quinnell.",
         "ctxs": "[]"},
        {"question": "Who won the contest?", "answers": "['long answer']",
         "qa_pairs": "[{'question': 'men?', 'answers': ['Joey Chestnut']}, {'question': 'women?', 'answers': ['Miki Sudo']}]",
         "rationale": "Joey Chestnut and Miki Sudo won."},
        {"question": "Inconsistent?", "answers": "['Zed']", "rationale": "No idea."},
    ]
    path = tmp_path / "demos.json"
    path.write_text(json.dumps(demos))
    pool = load_demo_pool(str(path))
    assert [d["id"] for d in pool] == ["demos.json#0", "demos.json#1", "demos.json#2"]
    assert [d["consistent"] for d in pool] == [True, False, False]  # 'long answer' is not in the rationale
    assert pool[0]["dataset"] is None and pool[0]["answer"] == "A. J. Quinnell"
    assert pool[1]["answer"] == "Joey Chestnut and Miki Sudo"
    chosen = select_demos(pool, ["popqa", "nq"], 1, 0, "same", set(), set())  # no dataset: serves every dataset
    assert chosen["popqa"][0]["id"] == chosen["nq"][0]["id"] == "demos.json#0"
    # JSON lines work too, and a file of question + rationale only is trusted as written
    (tmp_path / "d.jsonl").write_text('{"question": "q1", "rationale": "r1"}\n{"question": "q2", "rationale": "r2"}\n')
    lines = load_demo_pool(str(tmp_path / "d.jsonl"))
    assert [d["consistent"] for d in lines] == [True, True] and lines[0]["answer"] is None
    with pytest.raises(EvaluationError, match="icl-qa needs them"):
        select_demos(lines, ["nq"], 1, 0, "same", set(), set(), need_answer=True)


# --- early checks ----------------------------------------------------------------------------------------


def test_config_names_the_bad_method_and_what_each_method_needs():
    def cfg(*extra):
        return load_config(EvaluateConfig, None, ["input=a", "output=b", *extra])

    assert cfg("methods=vanilla-rag,no-retrieval,vanilla-rag").method_list() == ["vanilla-rag", "no-retrieval"]
    with pytest.raises(ConfigError, match="unknown method 'icl'.*allowed: instructrag-ft"):
        cfg("methods=icl")
    with pytest.raises(ConfigError, match="ft_model is empty"):
        cfg("methods=instructrag-ft")
    with pytest.raises(ConfigError, match="sft_model is empty; pass sft_model=DIR .*data.target=answer"):
        cfg("methods=vanilla-sft")
    assert "vanilla-sft" not in EvaluateConfig().method_list()  # opt-in: it needs a second training run
    with pytest.raises(ConfigError, match="demos.path is empty"):
        cfg("methods=icl-qa")
    with pytest.raises(ConfigError, match="the template baseline reads the gold answers"):
        cfg("methods=vanilla-rag", "generation.engine=template-baseline")
    assert cfg("methods=instructrag-ft,instructrag-icl", "ft_model=m", "demos.path=d").demos.num == 2


def test_a_model_that_does_not_load_fails_at_start(tiny_model, tmp_path):
    assert check_model("generation.model", "tiny") == tiny_model
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(EvaluationError, match=r"ft_model='.*junk' could not be loaded"):
        check_model("ft_model", str(tmp_path / "junk"))
    with pytest.raises(EvaluationError, match="could not be loaded"):
        check_model("ft_model", str(tmp_path / "missing-dir"))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(EvaluationError, match="no weights"):
        check_model("ft_model", str(no_weights))


def test_resume_skips_pairs_written_with_the_same_settings_and_refuses_others(tmp_path):
    out = tmp_path / "out"
    schema = schemas.load("predictions")
    row = {c: None for c in schema.names}
    row.update(id="q1", dataset="d", method="vanilla-rag", question="q", answers=["a"], prompt="p", prompt_tokens=1,
               truncated_tokens=0, prediction="a", completion_tokens=1, finish_reason="stop", correct=True,
               generator="g", config_fingerprint="fp-v")
    (out / "predictions").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row, {**row, "method": "no-retrieval", "config_fingerprint": "fp-n"}],
                                        schema=schema), out / "predictions" / "part-x.parquet")
    (out / "rejected").mkdir()
    (out / "metrics.json").write_text("{}")
    loc = location(out)
    assert prepare_output(loc, {"vanilla-rag": "fp-v", "icl-qa": "fp-q"}, False) == {("q1", "vanilla-rag")}
    assert not (out / "rejected").exists() and not (out / "metrics.json").exists()  # rebuilt by the run
    with pytest.raises(EvaluationError, match="vanilla-rag predictions written with other settings.*overwrite=true"):
        prepare_output(loc, {"vanilla-rag": "fp-other"}, False)
    assert prepare_output(loc, {"vanilla-rag": "fp-other"}, True) == set()
    assert not (out / "predictions").exists()


# --- the prompt and score stages on a hand-made batch -------------------------------------------------------


def flight(rows):
    base = {c: None for c in read.FLIGHT_SCHEMA.names}
    return pa.Table.from_pylist([{**base, "source": "s", "line": i, "original": "{}", **r} for i, r in enumerate(rows)],
                                schema=read.FLIGHT_SCHEMA)


def test_prompt_stage_emits_one_row_per_method_and_carries_rejects_once(tiny_model):
    ok = {"id": "a", "dataset": "popqa", "question": "Who wrote Emma?", "answers": ["Alpha"], "ctxs": DOCS,
          "ctxs_source": "given"}
    bad = {"id": "b", "dataset": "popqa", "reject_stage": "validate", "reject_reason": "missing_answers",
           "reject_detail": "no answers"}
    no_docs = {"id": "c", "dataset": "popqa", "question": "Who?", "answers": ["x"], "reject_stage": "retrieve",
               "reject_reason": "no_documents", "reject_detail": "nothing found"}
    methods = ["instructrag-icl", "icl-qa", "vanilla-rag", "no-retrieval"]
    stage = PromptStage("tiny", methods, {"popqa": DEMOS}, num_docs=5, max_model_len=0, max_new_tokens=8,
                        done_ref=None, carry_rejects=True)
    out = stage(flight([ok, bad, no_docs])).to_pylist()
    assert [(r["id"], r["method"], r["reject_reason"]) for r in out] == [
        ("a", m, None) for m in methods] + [("b", None, "missing_answers"), ("c", None, "no_documents"),
                                            ("c", "no-retrieval", None)]
    by = {r["method"]: r for r in out if r["id"] == "a"}
    assert by["vanilla-rag"]["doc_ids"] == ["d2", "d1"] and by["vanilla-rag"]["answer_in_docs"] is True
    assert by["icl-qa"]["demo_ids"] == ["x1", "x2"] and by["vanilla-rag"]["demo_ids"] is None
    assert by["no-retrieval"]["doc_ids"] is None and by["no-retrieval"]["ctxs_source"] is None
    assert "Document 1" not in by["no-retrieval"]["prompt"]
    assert all(r["prompt"].startswith("<|begin_of_text|>") and r["prompt_tokens"] > 0 for r in by.values())
    # a second model's branch does not repeat the rejects
    ft = PromptStage("tiny", ["instructrag-ft"], {}, num_docs=5, max_model_len=0, max_new_tokens=8, done_ref=None,
                     carry_rejects=False)
    assert [(r["id"], r["method"]) for r in ft(flight([ok, bad, no_docs])).to_pylist()] == [("a", "instructrag-ft")]


def test_prompt_too_long_rejects_only_that_method(tiny_model):
    ok = {"id": "a", "dataset": "popqa", "question": "Who wrote Emma?", "answers": ["Alpha"], "ctxs": DOCS,
          "ctxs_source": "given"}
    long_demos = {"popqa": [dict(d, rationale="word " * 400) for d in DEMOS]}
    stage = PromptStage("tiny", ["instructrag-icl", "vanilla-rag"], long_demos, num_docs=5, max_model_len=300,
                        max_new_tokens=8, done_ref=None, carry_rejects=True)
    out = {r["method"]: r for r in stage(flight([ok])).to_pylist()}
    assert out["instructrag-icl"]["reject_reason"] == "prompt_too_long"
    assert out["instructrag-icl"]["reject_detail"].startswith("method instructrag-icl: ")
    assert out["vanilla-rag"]["reject_stage"] is None


def test_score_stage_uses_the_one_definition_of_correct():
    table = pa.Table.from_pylist([
        {"rationale": "So the answer is the Eiffel Tower.", "answers": ["Eiffel Tower"], "qa_pairs": None,
         "reject_stage": None},
        {"rationale": "Chestnut.", "answers": ["Joey Chestnut", "Chestnut"],
         "qa_pairs": [{"question": "m", "answers": ["Chestnut"]}, {"question": "w", "answers": ["Sudo"]}],
         "reject_stage": None},
        {"rationale": None, "answers": ["x"], "qa_pairs": None, "reject_stage": "generate"},
    ], schema=pa.schema([("rationale", pa.string()), ("answers", pa.list_(pa.string())),
                         ("qa_pairs", schemas.field("predictions", "qa_pairs").type), ("reject_stage", pa.string())]))
    out = score_batch(table).to_pylist()
    assert [(r["correct"], r["str_em"]) for r in out] == [(True, None), (True, 0.5), (None, None)]
    assert out[0]["prediction"] == "So the answer is the Eiffel Tower."


def test_vanilla_sft_uses_its_own_model_and_the_ft_prompt():
    from instructrag_ray.evaluate import method_parts, model_groups

    cfg = load_config(EvaluateConfig, None, ["input=a", "output=b", "methods=vanilla-sft,instructrag-ft,vanilla-rag",
                                             "ft_model=/ft", "sft_model=/sft"])
    groups = model_groups(cfg, cfg.method_list())
    assert [(key, model, methods) for key, model, methods in groups] == [
        ("generation.model", "tiny", ["vanilla-rag"]), ("ft_model", "/ft", ["instructrag-ft"]),
        ("sft_model", "/sft", ["vanilla-sft"])]
    docs = [{"title": "T", "text": "x", "score": 1.0}]
    assert method_parts("vanilla-sft", "Q?", docs, []) == method_parts("instructrag-ft", "Q?", docs, [])
