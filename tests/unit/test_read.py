import json
from pathlib import Path

import pyarrow as pa
import pytest

from instructrag_ray import read
from instructrag_ray.errors import InputError
from instructrag_ray.read import RowError, load_record, parse_record

RAW = Path(__file__).resolve().parents[3] / "shared" / "data" / "raw"


def parse(raw: str, dataset: str = "d") -> dict:
    return parse_record(load_record(raw), dataset)


def test_popqa_with_string_scores_and_possible_answers():
    row = parse(json.dumps({"id": 4382392, "question": "What is X's occupation?",
                            "possible_answers": "[\"politician\", \"pol\"]",
                            "ctxs": [{"id": 11, "title": "X", "text": "X was a politician.", "score": "1.69"},
                                     {"title": "Y", "text": "Y.", "score": "1.5"}]}), "popqa")
    assert row["id"] == "4382392" and row["answers"] == ["politician", "pol"] and row["dataset"] == "popqa"
    assert row["ctxs"][0] == {"id": "11", "title": "X", "text": "X was a politician.", "score": 1.69}
    assert row["ctxs"][1]["id"] == ""


def test_popqa_answer_plus_aliases_deduplicated():
    row = parse(json.dumps({"question": "Q?", "answer": "politician", "aliases": ["politician", "pol"]}))
    assert row["answers"] == ["politician", "pol"]


def test_nq_open_and_flashrag_fields():
    assert parse('{"question": "when", "answer": ["1972", "December 1972"]}')["answers"] == ["1972", "December 1972"]
    assert parse('{"id": "dev_0", "question": "q", "golden_answers": ["a"]}')["answers"] == ["a"]


def test_dpr_topics_lines_including_csv_doubled_quotes():
    assert parse("Who was the man?\t['David Seville']")["answers"] == ["David Seville"]
    # 15 TriviaQA lines are CSV-quoted, and their answers once more inside (SOURCES.md)
    line = 'Which song?\t"[\'""Michael Jackson\\\'s """"Thriller""""""\', ""Michael Jackson\'s Thriller""]"'
    assert parse(line)["answers"] == ['Michael Jackson\'s "Thriller"', "Michael Jackson's Thriller"]


def test_asqa_short_answers_become_qa_pairs():
    row = parse(json.dumps({"sample_id": "-70", "ambiguous_question": "Who has the highest goals?",
                            "qa_pairs": [{"question": "men?", "short_answers": ["Daei", "Ali Daei"]},
                                         {"question": "women?", "short_answers": ["Sinclair"]}]}), "asqa")
    assert row["id"] == "-70" and row["question"] == "Who has the highest goals?"
    assert row["qa_pairs"] == [{"question": "men?", "answers": ["Daei", "Ali Daei"]},
                               {"question": "women?", "answers": ["Sinclair"]}]
    assert row["answers"] == ["Daei", "Ali Daei", "Sinclair"]


def test_missing_id_is_derived_deterministically():
    a = parse('{"question": "q", "answers": ["a"]}')
    assert a["id"] == parse('{"question": "q", "answers": ["a"]}')["id"] and a["id"].startswith("qa-")
    assert a["id"] != parse('{"question": "q2", "answers": ["a"]}')["id"]


@pytest.mark.parametrize("raw,reason", [
    ('{"answers": ["a"]}', "missing_question"),
    ('{"question": "  ", "answers": ["a"]}', "missing_question"),
    ('{"question": 5, "answers": ["a"]}', "bad_question"),
    ('{"question": "q"}', "missing_answers"),
    ('{"question": "q", "answers": []}', "missing_answers"),
    ('{"question": "q", "answers": [1, 2]}', "bad_answers"),
    ('{"question": "q", "answers": {"a": 1}}', "bad_answers"),
    ('{"question": "q", "answers": ["a"], "ctxs": "doc"}', "bad_ctxs"),
    ('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}', "bad_ctxs"),
    ('{"question": "q", "answers": ["a"], "ctxs": [{"text": "t", "score": "high"}]}', "bad_ctxs"),
    ('{"question": "q", "answers": ["a"], "qa_pairs": [{"question": 1}]}', "bad_qa_pairs"),
    ('{"question": "q", "answers": ["a"], "id": [1]}', "bad_id"),
    ('{"question": "q", "answers": ["a"]', "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ("just some words", "invalid_json"),
    ("Q?\tnot a list (", "bad_answers"),
])
def test_bad_rows_raise_a_reason(raw, reason):
    with pytest.raises(RowError) as e:
        parse(raw)
    assert e.value.reason == reason and e.value.detail


def test_parse_batch_keeps_bad_rows_with_their_original():
    batch = pa.table({"source": ["f", "f"], "line": [1, 2],
                      "raw": ['{"id": "ok", "question": "q", "answers": ["a"]}', '{"id": "bad", "question": "q"}']})
    out = read.parse_batch(batch, "d").to_pylist()
    assert out[0]["reject_stage"] is None and out[0]["ctxs_source"] is None
    assert out[1]["id"] == "bad" and out[1]["reject_reason"] == "missing_answers"
    assert out[1]["original"] == '{"id": "bad", "question": "q"}'


def test_iter_raw_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "q1", "answers": ["a"]}\n\n{"question": "q2", "answers": ["b"]}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"question": "q3", "answers": ["c"]}]))
    (tmp_path / "c.json").write_text(json.dumps({"dev": {"id9": {"question": "q4", "answers": ["d"]}}}))
    pa.parquet = __import__("pyarrow.parquet").parquet
    pa.parquet.write_table(pa.table({"question": ["q5"], "answers": [["e"]]}), tmp_path / "d.parquet")
    rows = list(read.iter_raw(tmp_path))
    questions = [parse(raw)["question"] for _, _, raw, _ in rows]
    assert questions == ["q1", "q2", "q3", "q4", "q5"]
    first = '{"question": "q1", "answers": ["a"]}\n\n'
    assert [position for _, position, _, _ in rows][:2] == [0, len(first)]  # byte offsets; blank lines skipped
    assert [position for _, position, _, _ in rows][2:] == [1, 1, 1]  # index in the array / table
    assert parse(rows[3][2])["id"] == "id9"


def test_hf_dataset_on_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "q", "answers": ["a"]}]).save_to_disk(str(tmp_path / "hf"))
    rows = list(read.iter_raw(tmp_path / "hf"))
    assert parse(rows[0][2])["answers"] == ["a"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(read.iter_raw(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        list(read.iter_raw(tmp_path / "empty"))


def test_default_dataset_names():
    assert read.default_dataset("x/popqa_longtail.jsonl") == "popqa"
    assert read.default_dataset("topics.dpr.trivia.test.txt") == "triviaqa"
    assert read.default_dataset("NQ-open.dev.jsonl") == "nq"
    assert read.default_dataset("my_data.jsonl") == "my_data"
    assert read.default_dataset("x.jsonl", "mine") == "mine"


# --- the real files in ../shared/data/raw (read only, never copied into the project) ---------------

REAL = [
    ("s2rag_popqa/popqa_longtail_w_gs_example.jsonl", "popqa", 100),
    ("corver_popqa/popqa_test.json", "popqa", 14267),
    ("nq_open_official/NQ-open.dev.jsonl", "nq", 3610),
    ("anserini_dpr_topics/topics.dpr.trivia.test.txt", "triviaqa", 11313),
    ("asqa_dev_agentic_disambiguation/asqa_dev.json", "asqa", 948),
]


@pytest.mark.parametrize("path,dataset,rows", REAL)
def test_real_files_parse_without_rejects(path, dataset, rows):
    if not (RAW / path).exists():
        pytest.skip(f"{RAW / path} not present (it lies in ../shared beside the project in CI and sessions)")
    assert read.default_dataset(str(RAW / path)) == dataset
    parsed = [parse(raw, dataset) for _, _, raw, _ in read.iter_raw(RAW / path)]
    assert len(parsed) == rows
    assert all(r["answers"] and r["question"] for r in parsed)
    if dataset == "asqa":
        assert all(r["qa_pairs"] for r in parsed)
    if path.startswith("s2rag"):
        assert all(len(r["ctxs"]) == 25 and isinstance(r["ctxs"][0]["score"], float) for r in parsed)
