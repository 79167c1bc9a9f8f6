"""Unit tests for instructrag_ray.retrieval (base, corpus, tantivy_index): BM25 on tantivy, corpus layouts, rejects, sharing."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrag_ray.errors import InputError, OutputConflict
from instructrag_ray.retrieval.base import Hit, QueryFailure, Retriever, analyze, parse_fields
from instructrag_ray.retrieval.corpus import read_corpus
from instructrag_ray.retrieval.tantivy_index import (TantivyRetriever, build_tantivy_index, content_fingerprint,
                                                     index_fingerprint)

K1, B = 1.2, 0.75
REPO = Path(__file__).resolve().parents[2]

# Every field is under 24 tokens, so Lucene's one-byte length norm stores each length exactly.
CORPUS = [
    {"id": "p1", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "p2", "title": "France", "text": "France is a country in Western Europe. Its capital is Paris."},
    {"id": "p3", "title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"id": "p4", "title": "Rock and roll", "text": "Rock and roll (often written as rock & roll) is a genre of popular music."},
    {"id": "p5", "title": "What's Up?", "text": "\"What's Up?\" is a song by 4 Non Blondes from 1993."},
    {"id": "p6", "title": "Salmon", "text": "A fish that is born in fresh water and migrates to the ocean."},
    {"id": "p7", "title": "Rivers", "text": "Salmon swim up rivers to spawn, and bears wait there for the salmon."},
    {"id": "p8", "title": "C++", "text": "C++ is a programming language; std::vector is its dynamic array."},
    {"id": "p9", "title": "", "text": "An untitled note about the capital of Germany and its rivers."},
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bm25") / "index"
    stats = build_tantivy_index(CORPUS, path, heap_mb=32)
    assert stats["indexed"] == len(CORPUS) and stats["rejected"] == []
    # the content fingerprint the build recorded: over the index's own files, the same on every read
    assert stats["fingerprint"] == index_fingerprint(path) == content_fingerprint(path)
    return path


@pytest.fixture(scope="module")
def retriever(index_dir):
    return TantivyRetriever(index_dir)


def reference_bm25(corpus, query, fields):
    """An independent BM25 (tantivy's statistics: N and avgdl over all documents, (k1+1) factor)."""
    tokenize = lambda s: re.findall(r"[^\W_]+", s.lower())  # noqa: E731 - ASCII corpus: same as tantivy's
    terms = tokenize(query)
    scores = {}
    for doc in corpus:
        total = 0.0
        for field, boost in fields.items():
            lengths = [len(tokenize(d[field])) for d in corpus]
            avgdl = sum(lengths) / len(corpus)
            doc_tokens = tokenize(doc[field])
            field_score = 0.0
            for term in terms:
                f = doc_tokens.count(term)
                if not f:
                    continue
                n = sum(term in tokenize(d[field]) for d in corpus)
                idf = math.log(1 + (len(corpus) - n + 0.5) / (n + 0.5))
                field_score += idf * f * (K1 + 1) / (f + K1 * (1 - B + B * len(doc_tokens) / avgdl))
            total += boost * field_score
        if total > 0:
            scores[doc["id"]] = total
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


# --- BM25 scores and ranking -------------------------------------------------------------------


def test_score_equals_hand_computed_lucene_bm25(tmp_path):
    corpus = [
        {"id": "a", "title": "", "text": "apple banana apple"},
        {"id": "b", "title": "", "text": "banana cherry"},
        {"id": "c", "title": "", "text": "cherry date elderberry fig"},
    ]
    build_tantivy_index(corpus, tmp_path / "idx", heap_mb=16)
    hits = TantivyRetriever(tmp_path / "idx", fields="text").search("apple", 5)
    # N=3 documents, n=1 contains "apple"; doc a: f=2, dl=3, avgdl=(3+2+4)/3=3
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    tf = 2 * (1.2 + 1) / (2 + 1.2 * (1 - 0.75 + 0.75 * 3 / 3))
    assert [h.id for h in hits] == ["a"]
    assert isinstance(hits[0].score, float)
    assert hits[0].score == pytest.approx(idf * tf, rel=1e-5)  # = 1.44036...


@pytest.mark.parametrize("fields", ["title,text", "text", "title^0.5,text", "title,text^0.1"])
@pytest.mark.parametrize("query", [
    "What is the capital of France?",
    "capital of Germany",
    "salmon rivers",
    "rock and roll music",
    "paris paris france",
])
def test_ranking_and_scores_equal_reference_bm25(index_dir, fields, query):
    hits = TantivyRetriever(index_dir, fields=fields).search(query, len(CORPUS))
    expected = reference_bm25(CORPUS, query, parse_fields(fields))
    assert [h.id for h in hits] == [doc_id for doc_id, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], rel=1e-5)


def test_hand_checked_top_k(retriever):
    # p1 has "paris" in its title and text, p2 only in its text.
    assert [h.id for h in retriever.search("paris", 5)] == ["p1", "p2"]
    # "germany" is in p3 and p9 (equal lengths); "berlin" only in p3.
    assert [h.id for h in retriever.search("Berlin, Germany", 5)] == ["p3", "p9"]
    hit = retriever.search("What's Up", 1)[0]
    assert hit == Hit(id="p5", title="What's Up?", text=CORPUS[4]["text"], score=hit.score)


def test_duplicate_query_terms_count_each_time(retriever):
    once = {h.id: h.score for h in retriever.search("salmon", 5)}
    twice = {h.id: h.score for h in retriever.search("salmon salmon", 5)}
    assert once.keys() == twice.keys() == {"p6", "p7"}
    for doc_id in once:
        assert twice[doc_id] == pytest.approx(2 * once[doc_id], rel=1e-6)


def test_field_boosts_change_ranking(index_dir):
    # p6 has "salmon" in its title only, p7 twice in its text only.
    assert [h.id for h in TantivyRetriever(index_dir, "title^10,text").search("salmon", 2)] == ["p6", "p7"]
    assert [h.id for h in TantivyRetriever(index_dir, "title^0.1,text").search("salmon", 2)] == ["p7", "p6"]
    assert [h.id for h in TantivyRetriever(index_dir, "title").search("salmon", 2)] == ["p6"]
    assert [h.id for h in TantivyRetriever(index_dir, {"text": 1.0}).search("salmon", 2)] == ["p7"]


def test_boost_scales_field_score(index_dir):
    plain = TantivyRetriever(index_dir, "text").search("capital", 10)
    boosted = TantivyRetriever(index_dir, "text^3").search("capital", 10)
    assert [h.id for h in plain] == [h.id for h in boosted]
    assert [h.score for h in boosted] == pytest.approx([3 * h.score for h in plain], rel=1e-6)


# --- question text is text, not query syntax --------------------------------------------------


@pytest.mark.parametrize("question", [
    "What's the capital of France?",
    "capital (of) France",
    "capital of \"France",
    "\"capital\" of France\"",
    "capital AND France",
    "capital OR France NOT",
    "AND",
    "title:France capital",
    "capital:of:France",
    "capital -France +of",
    "capital* of~2 France^3",
    "[capital TO France] {of}",
    "capital \\ of / France || && !",
    "c++ std::vector",
])
def test_query_syntax_characters_are_plain_text(retriever, question):
    hits = retriever.search(question, 5)
    same_terms = " ".join(analyze(question))
    assert hits == retriever.search(same_terms, 5)
    assert hits  # every question above has a term that occurs in the corpus


def test_boolean_words_are_terms(retriever):
    # "and" is an ordinary term: p4 ("Rock and roll") matches "AND" alone.
    assert "p4" in [h.id for h in retriever.search("AND", 9)]
    assert retriever.search("std::vector", 1)[0].id == "p8"


@pytest.mark.parametrize("question", ["", "   ", "?!...", "--- ::: ()", "\u2014", "x" * 40])
def test_query_without_terms_returns_empty_list(retriever, question):
    assert retriever.search(question, 5) == []


def test_no_stopword_list(retriever):
    # The "default" analyzer (like Elasticsearch's standard one) keeps stop words: a stop-word-only
    # question is a real query, not an empty one.
    assert analyze("the of a") == ["the", "of", "a"]
    assert retriever.search("the of", 3)


def test_analyzer_matches_index_tokenizer(tmp_path):
    text = ("ÉCOLE Straße naïve café_bar foo-bar 3.14 日本語 don't A1b2 "
            + "a" * 39 + " " + "b" * 40 + " " + "é" * 20)
    build_tantivy_index([{"id": "x", "title": "", "text": text}, {"id": "y", "title": "", "text": "other"}],
                        tmp_path / "idx", heap_mb=16)
    r = TantivyRetriever(tmp_path / "idx", "text")
    terms = analyze(text)
    assert terms == ["école", "straße", "naïve", "café", "bar", "foo", "bar", "3", "14", "日本語", "don", "t", "a1b2",
                     "a" * 39]  # 40 ASCII bytes and 20 two-byte characters are both dropped
    for term in terms:
        assert [h.id for h in r.search(term, 2)] == ["x"], term
    assert r.search("b" * 40, 2) == [] and r.search("é" * 20, 2) == []


# --- ties --------------------------------------------------------------------------------------


def test_ties_are_ordered_by_id(tmp_path):
    ids = ["d7", "d3", "d9", "d1", "d5", "d2", "d8", "d4", "d6", "d0"]
    corpus = [{"id": i, "title": "", "text": "same words here"} for i in ids]
    corpus.append({"id": "z", "title": "", "text": "same same words here"})
    build_tantivy_index(corpus, tmp_path / "idx", heap_mb=32)
    r = TantivyRetriever(tmp_path / "idx")
    assert [h.id for h in r.search("same", 3)] == ["z", "d0", "d1"]
    assert [h.id for h in r.search("words", 4)] == ["d0", "d1", "d2", "d3"]
    assert [h.id for h in r.search("words", 20)] == sorted(ids) + ["z"]  # z is longer: lower score


# --- fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("title,text", {"title": 1.0, "text": 1.0}),
    ("title^0.5,text", {"title": 0.5, "text": 1.0}),
    (" title ^ 2 , text^1.5 ", {"title": 2.0, "text": 1.5}),
    (["title^0.5", "text"], {"title": 0.5, "text": 1.0}),
    ("text", {"text": 1.0}),
])
def test_parse_fields(spec, expected):
    assert parse_fields(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("", "empty part"),
    ("title,,text", "empty part"),
    ("body", "unknown field 'body'; allowed: title, text"),
    ("id", "unknown field 'id'"),
    ("title^x", "boost 'x' of 'title' is not a number"),
    ("title^0", "positive finite"),
    ("title^-1", "positive finite"),
    ("title^nan", "positive finite"),
    ("title^inf", "positive finite"),
    ("title,title^2", "names 'title' twice"),
    ([], "names no field"),
    (3, "must be a string"),
])
def test_parse_fields_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_fields(spec)


def test_retriever_rejects_bad_fields(index_dir):
    with pytest.raises(ValueError, match="unknown field 'body'"):
        TantivyRetriever(index_dir, {"body": 1.0})
    with pytest.raises(ValueError, match="positive finite"):
        TantivyRetriever(index_dir, {"title": 0.0})


# --- corpus layouts ------------------------------------------------------------------------------


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def passages(path):
    return [p for p in read_corpus(path) if "_reject" not in p]


def test_read_jsonl_and_gz(tmp_path):
    records = [{"id": "1", "title": "A", "text": "alpha"}, {"id": 2, "text": "beta", "extra": 1}]
    expected = [{"id": "1", "title": "A", "text": "alpha"}, {"id": "2", "title": "", "text": "beta"}]
    assert list(read_corpus(write_jsonl(tmp_path / "c.jsonl", records))) == expected
    assert list(read_corpus(write_jsonl(tmp_path / "c.jsonl.gz", records, gzip.open))) == expected


def without_original(passages):
    """read_corpus's output with each reject's `_original` (the record as read) checked and dropped."""
    out = []
    for p in passages:
        if "_reject" in p:
            assert isinstance(p.pop("_original"), str)
        out.append(p)
    return out


def test_read_flashrag_contents_layout(tmp_path):
    records = [
        {"id": "0", "contents": "\"Evan Morris\"\nEvan Morris Evan L. Morris (January 26, 1977 \u2013 July 9, 2015) was a lobbyist."},
        {"id": "1", "contents": "Unquoted Title\nline one\nline two"},
        {"id": "2", "contents": "no newline at all"},
        {"id": "3", "contents": "\"\"\nquoted empty title"},
        {"id": "4"},
    ]
    got = without_original(read_corpus(write_jsonl(tmp_path / "sample_data.jsonl", records)))
    assert got[:4] == [
        {"id": "0", "title": "Evan Morris",
         "text": "Evan Morris Evan L. Morris (January 26, 1977 \u2013 July 9, 2015) was a lobbyist."},
        {"id": "1", "title": "Unquoted Title", "text": "line one\nline two"},
        {"id": "2", "title": "", "text": "no newline at all"},
        {"id": "3", "title": "", "text": "quoted empty title"},
    ]
    assert got[4] == {"id": "4", "_reject": "line 5: no contents"}


def test_read_dpr_tsv_and_gz(tmp_path):
    # DPR's psgs_w100.tsv: header id, text, title; CSV quoting with doubled quotes.
    content = ('id\ttext\ttitle\n'
               '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet."\tAaron\n'
               '2\tplain text, no quotes\tSecond title\n'
               '3\t\tEmpty text\n'
               '4\tonly two columns\n')
    (tmp_path / "psgs_w100.tsv").write_text(content, encoding="utf-8")
    with gzip.open(tmp_path / "psgs_w100.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(content)
    for name in ("psgs_w100.tsv", "psgs_w100.tsv.gz"):
        got = without_original(read_corpus(tmp_path / name))
        assert got == [
            {"id": "1", "title": "Aaron", "text": 'Aaron Aaron ( or ; "Ahärôn") is a prophet.'},
            {"id": "2", "title": "Second title", "text": "plain text, no quotes"},
            {"id": "3", "_reject": "line 4: text is empty"},
            {"id": "4", "_reject": "line 5: 2 columns, the header has 3"},
        ]


def test_read_tsv_without_header_is_an_error(tmp_path):
    (tmp_path / "x.tsv").write_text("1\tsome text\tTitle\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header naming id, text and title"):
        list(read_corpus(tmp_path / "x.tsv"))


def test_read_parquet(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", None], "title": ["T", None, "U"], "text": ["x y", "z", "w"]}),
                   tmp_path / "c.parquet")
    assert without_original(read_corpus(tmp_path / "c.parquet")) == [
        {"id": "a", "title": "T", "text": "x y"},
        {"id": "b", "title": "", "text": "z"},
        {"id": None, "_reject": "row 3: no id"},
    ]
    pq.write_table(pa.table({"id": ["a"], "contents": ['"T"\nbody']}), tmp_path / "f.parquet")
    assert list(read_corpus(tmp_path / "f.parquet")) == [{"id": "a", "title": "T", "text": "body"}]
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lack id and text"):
        list(read_corpus(tmp_path / "bad.parquet"))


def test_read_corpus_directory(tmp_path):
    shards = tmp_path / "corpus"
    (shards / "b").mkdir(parents=True)
    write_jsonl(shards / "a.jsonl", [{"id": "1", "text": "one"}, {"id": "2"}])
    write_jsonl(shards / "b" / "c.jsonl", [{"id": "3", "contents": '"T"\nthree'}])  # its own layout
    (shards / "notes.txt").write_text("ignored")
    assert without_original(read_corpus(shards)) == [
        {"id": "1", "title": "", "text": "one"},
        {"id": "2", "_reject": "a.jsonl line 2: no text"},
        {"id": "3", "title": "T", "text": "three"},
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .jsonl"):
        read_corpus(tmp_path / "empty")


def test_read_corpus_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv").write_text("id,text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown extension; supported: \.jsonl"):
        read_corpus(tmp_path / "c.csv")


def test_bad_passages_are_yielded_as_rejects(tmp_path):
    lines = [
        {"id": "ok", "title": "T", "text": "fine"},
        {"id": "no-text", "title": "T"},
        {"id": "empty", "title": "T", "text": "   "},
        {"id": "num-text", "title": "T", "text": 42},
        {"id": "list-title", "title": ["T"], "text": "x"},
        {"title": "T", "text": "no id"},
        {"id": ["x"], "text": "list id"},
        "{not json",
        "[1, 2]",
        "",
    ]
    got = without_original(read_corpus(write_jsonl(tmp_path / "c.jsonl", lines)))
    assert got == [
        {"id": "ok", "title": "T", "text": "fine"},
        {"id": "no-text", "_reject": "line 2: no text"},
        {"id": "empty", "_reject": "line 3: text is empty"},
        {"id": "num-text", "_reject": "line 4: text is int, not a string"},
        {"id": "list-title", "_reject": "line 5: title is list, not a string"},
        {"id": None, "_reject": "line 6: no id"},
        {"id": None, "_reject": "line 7: id ['x'] is not a non-empty string or integer"},
        {"id": None, "_reject": "line 8: not valid JSON (Expecting property name enclosed in double quotes)"},
        {"id": None, "_reject": "line 9: not a JSON object"},
    ]


# --- building ------------------------------------------------------------------------------------


def test_build_counts_rejects_and_duplicates(tmp_path):
    records = [
        {"id": "a", "title": "A", "text": "alpha"},
        {"id": "b", "title": "B"},  # no text
        {"id": "x", "_reject": "line 3: not valid JSON", "_original": "{x"},  # a reject from read_corpus
        {"id": "a", "title": "A2", "text": "alpha again"},
        {"id": "c", "title": None, "text": "gamma"},
    ]
    stats = build_tantivy_index(records, tmp_path / "idx", heap_mb=16)
    assert stats["indexed"] == 2
    assert [(r["id"], r["_code"], r["_reject"]) for r in stats["rejected"]] == [
        ("b", "invalid_passage", "passage 2: no text"),
        ("x", "invalid_passage", "line 3: not valid JSON"),
        ("a", "duplicate_id", "passage 4: duplicate id (the first one is indexed)"),
    ]
    assert [r["_original"] for r in stats["rejected"]] == [
        '{"id": "b", "title": "B"}', "{x", '{"id": "a", "title": "A2", "text": "alpha again"}']
    r = TantivyRetriever(tmp_path / "idx")
    assert r.num_docs == 2
    assert [(h.id, h.title) for h in r.search("alpha", 5)] == [("a", "A")]
    assert r.search("gamma", 5)[0].title == ""


def test_build_from_read_corpus(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "title": "T", "text": "hello"}, {"id": "2"}])
    stats = build_tantivy_index(read_corpus(path), tmp_path / "idx", heap_mb=16)
    assert {k: stats[k] for k in ("indexed", "rejected")} == {"indexed": 1, "rejected": [{"id": "2", "_reject": "line 2: no text", "_code": "invalid_passage",
                                                 "_original": '{"id": "2"}'}]}


def test_overwrite(tmp_path):
    target = tmp_path / "idx"
    build_tantivy_index([{"id": "1", "text": "old words"}], target, heap_mb=16)
    with pytest.raises(OutputConflict, match="not empty; pass overwrite=true"):
        build_tantivy_index([{"id": "2", "text": "new words"}], target, heap_mb=16)
    assert [h.id for h in TantivyRetriever(target).search("words", 5)] == ["1"]
    build_tantivy_index([{"id": "2", "text": "new words"}], target, heap_mb=16, overwrite=True)
    assert [h.id for h in TantivyRetriever(target).search("words", 5)] == ["2"]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary build directory left


def test_overwrite_never_deletes_a_directory_that_is_not_an_index(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(OutputConflict, match="holds no tantivy index"):
        build_tantivy_index([{"id": "1", "text": "x"}], target, heap_mb=16, overwrite=True)
    assert (target / "keep.txt").read_text() == "precious"


def test_build_into_empty_existing_directory(tmp_path):
    (tmp_path / "idx").mkdir()
    assert build_tantivy_index([{"id": "1", "text": "x"}], tmp_path / "idx", heap_mb=16)["indexed"] == 1


def test_failed_build_leaves_nothing(tmp_path):
    def broken():
        yield {"id": "1", "text": "x"}
        raise RuntimeError("corpus read failed")

    with pytest.raises(RuntimeError, match="corpus read failed"):
        build_tantivy_index(broken(), tmp_path / "idx", heap_mb=16)
    assert list(tmp_path.iterdir()) == []


def test_missing_index_error_names_path_and_job(tmp_path):
    with pytest.raises(InputError) as err:
        TantivyRetriever(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "jobs/build_index.py" in str(err.value)


# --- interface, batches, sharing ----------------------------------------------------------------


def test_implements_retriever(retriever):
    assert isinstance(retriever, Retriever)


def test_batch_search(retriever):
    results = retriever.batch_search(["paris", "?!", None, "berlin"], 2)
    assert [h.id for h in results[0]] == ["p1", "p2"]
    assert results[1] == []
    assert results[2] == QueryFailure("TypeError: query must be a string, got NoneType")
    assert [h.id for h in results[3]] == ["p3"]
    assert results[0] == retriever.search("paris", 2)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k(retriever, k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retriever.search("paris", k)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retriever.batch_search(["paris"], k)


def test_pickles_by_path(retriever):
    clone = pickle.loads(pickle.dumps(retriever))
    assert clone.fields == retriever.fields
    assert clone.search("capital", 3) == retriever.search("capital", 3)


def test_index_shared_by_retrievers_and_processes(index_dir, retriever):
    other = TantivyRetriever(index_dir, "title,text")
    expected = [(h.id, h.score) for h in retriever.search("capital of France", 4)]
    assert [(h.id, h.score) for h in other.search("capital of France", 4)] == expected
    code = ("import json, sys; from instructrag_ray.retrieval.tantivy_index import TantivyRetriever; "
            "r = TantivyRetriever(sys.argv[1]); "
            "print(json.dumps([[h.id, h.score] for h in r.search('capital of France', 4)]))")
    out = subprocess.run([sys.executable, "-c", code, str(index_dir)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert [tuple(x) for x in json.loads(out.stdout)] == expected
    # both retrievers in this process still work while the other process had the index open
    assert [(h.id, h.score) for h in other.search("capital of France", 4)] == expected
