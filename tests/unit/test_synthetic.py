"""The synthetic world: deterministic, well-formed, answerable where it says so, and noisy in the
ways the benchmark needs (near-duplicate names, distractors, rare answers, no-answer questions)."""

import bisect
import collections
import json
import math
import re

import pytest

from instructrag_ray.answers import has_answer
from instructrag_ray.testing.synthetic import ASQA, POPQA, TWOWIKI, generate_world, is_train, main, write_world

DATASETS = {POPQA, TWOWIKI, ASQA}


@pytest.fixture(scope="module")
def world():
    return generate_world()


@pytest.fixture(scope="module")
def by_id(world):
    return {p["id"]: p for p in world.passages}


def full(passage):
    return f"{passage['title']} {passage['text']}"


def mentions(text, name):
    """Whole-word mention: 'Dorin Maskel' is not mentioned by 'Dorin Maskell'."""
    return name in text and re.search(r"(?<![A-Za-z])" + re.escape(name) + r"(?![A-Za-z])", text) is not None


def contains_answer(text, answers):
    low = text.lower()
    return any(a.lower() in low for a in answers)


# -- determinism and shape ---------------------------------------------------------------------

def test_same_seed_same_world_other_seed_other_world():
    a, b = generate_world(3, 60, 80), generate_world(3, 60, 80)
    assert a.passages == b.passages and a.questions == b.questions
    c = generate_world(4, 60, 80)
    assert c.passages != a.passages and c.questions != a.questions


def test_passage_schema(world):
    ids = [p["id"] for p in world.passages]
    assert len(set(ids)) == len(ids)
    for p in world.passages:
        assert set(p) == {"id", "title", "text"}
        assert re.fullmatch(r"p\d{6}", p["id"])
        assert p["title"] and isinstance(p["title"], str)
        assert 40 <= len(p["text"].split()) <= 100, p


def test_question_schema(world):
    ids = [q["id"] for q in world.questions]
    assert len(set(ids)) == len(ids) == 300
    assert all(re.fullmatch(r"syn-0-\d+", i) for i in ids)
    assert len({q["question"] for q in world.questions}) == 300
    passage_ids = {p["id"] for p in world.passages}
    base = {"id", "dataset", "question", "answers", "gold_passage_ids", "bridge_passage_ids", "style",
            "relation", "entities"}
    for q in world.questions:
        assert set(q) == base | ({"qa_pairs"} if q["dataset"] == ASQA else set()), q
        assert q["dataset"] in DATASETS
        assert q["question"].endswith("?")
        assert q["answers"] and all(isinstance(a, str) and a.strip() for a in q["answers"])
        assert len(set(q["answers"])) == len(q["answers"])
        assert set(q["gold_passage_ids"]) <= passage_ids and set(q["bridge_passage_ids"]) <= passage_ids
        assert q["style"] == {POPQA: "single-fact", TWOWIKI: "two-hop", ASQA: "ambiguous"}[q["dataset"]]
        assert q["entities"] and all(mentions(q["question"], e) for e in q["entities"][:1])
        if q["dataset"] == ASQA:
            for pair in q["qa_pairs"]:
                assert set(pair) == {"question", "answers"} and pair["answers"]


def test_style_mix_and_no_answer_share(world):
    counts = collections.Counter(q["dataset"] for q in world.questions)
    assert counts == {POPQA: 180, TWOWIKI: 75, ASQA: 45}
    no_answer = [q for q in world.questions if not q["gold_passage_ids"]]
    assert len(no_answer) == 30
    assert {q["dataset"] for q in no_answer} == {POPQA, TWOWIKI}  # ambiguous ones always answerable


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_no_answer_fraction_is_configurable(fraction):
    w = generate_world(1, 80, 200, no_answer_fraction=fraction)
    assert sum(not q["gold_passage_ids"] for q in w.questions) == round(200 * fraction)


def test_scales_to_benchmark_sizes():
    # 2000 people / 5000 questions takes about a second; half that keeps this file fast.
    w = generate_world(0, n_people=1000, n_questions=2500)
    assert len(w.questions) == 2500 and len(w.passages) > 4000
    assert collections.Counter(q["dataset"] for q in w.questions)[TWOWIKI] == 625


def test_too_many_questions_for_the_people_is_an_error():
    with pytest.raises(ValueError, match="n_people"):
        generate_world(0, n_people=20, n_questions=2000)
    with pytest.raises(ValueError, match="n_people"):
        generate_world(0, n_people=5)


# -- answerability -----------------------------------------------------------------------------

def test_every_gold_passage_holds_an_answer_and_names_the_entity(world, by_id):
    for q in world.questions:
        entity = q["entities"][-1]  # two-hop: the bridge, which the answer-bearing passage describes
        for pid in q["gold_passage_ids"]:
            text = full(by_id[pid])
            assert contains_answer(text, q["answers"]), (q, by_id[pid])
            assert has_answer(text, q["answers"])  # the project's own definition of correct agrees
            assert mentions(text, entity), (q, by_id[pid])


def test_each_ambiguous_reading_is_answerable(world, by_id):
    for q in world.questions:
        if q["dataset"] != ASQA:
            continue
        for pair in q["qa_pairs"]:
            assert any(contains_answer(full(by_id[pid]), pair["answers"]) for pid in q["gold_passage_ids"])


def test_no_answer_questions_have_no_passage_with_answer_and_entity(world):
    texts = [full(p) for p in world.passages]
    for q in world.questions:
        if q["gold_passage_ids"]:
            continue
        for text in texts:
            if any(mentions(text, e) for e in q["entities"]):
                assert not contains_answer(text, q["answers"]), (q, text)


def test_two_hop_facts_sit_in_different_passages(world, by_id):
    two_hop = [q for q in world.questions if q["dataset"] == TWOWIKI]
    for q in two_hop:
        assert q["bridge_passage_ids"], q  # the first hop is always written
        assert not set(q["bridge_passage_ids"]) & set(q["gold_passage_ids"])
        # the first hop names the bridge entity, which the question itself does not
        bridge = q["entities"][1]
        assert not mentions(q["question"], bridge)
        assert any(mentions(full(by_id[pid]), bridge) for pid in q["bridge_passage_ids"])


def test_ambiguous_answers_are_the_union_of_the_readings(world):
    asqa = [q for q in world.questions if q["dataset"] == ASQA]
    assert asqa
    for q in asqa:
        pairs = q["qa_pairs"]
        assert 2 <= len(pairs) <= 3
        assert q["answers"] == list(dict.fromkeys(a for p in pairs for a in p["answers"]))
        assert len({p["question"] for p in pairs}) == len(pairs)
        assert len({tuple(p["answers"]) for p in pairs}) == len(pairs)  # the people really differ
        assert all(mentions(p["question"], q["entities"][0]) for p in pairs)


# -- retrieval noise ---------------------------------------------------------------------------

def one_letter_apart(a, b):
    """Same length with one letter changed, or one letter inserted."""
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    if abs(len(a) - len(b)) != 1:
        return False
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def test_near_duplicate_names_exist(world):
    people = sorted({e for q in world.questions for e in q["entities"][:1] if q["relation"] == "occupation"}
                    | {p["title"] for p in world.passages if len(p["title"].split()) == 2})
    one_letter = shared_surname = 0
    for i, a in enumerate(people):
        for b in people[i + 1:]:
            (fa, la), (fb, lb) = a.split(), b.split()
            if (fa == fb and one_letter_apart(la, lb)) or (la == lb and one_letter_apart(fa, fb)):
                one_letter += 1
            if la == lb and fa != fb:
                shared_surname += 1
    assert one_letter >= 10 and shared_surname >= 10
    # and a shared name behind every ambiguous question, with its own disambiguation page
    titles = {p["title"] for p in world.passages}
    for q in world.questions:
        if q["dataset"] == ASQA:
            assert f"{q['entities'][0]} (disambiguation)" in titles


def test_distractors_name_the_entity_without_the_answer(world):
    texts = [full(p) for p in world.passages]
    single = [q for q in world.questions if q["dataset"] == POPQA and q["gold_passage_ids"]
              and q["relation"] in ("occupation", "birthplace", "birth_year")]
    with_distractor = with_wording = louder = 0
    word = {"occupation": "occupation", "birthplace": "born", "birth_year": "born"}
    for q in single:
        name = q["entities"][0]
        gold = set(q["gold_passage_ids"])
        named = [(p["id"], t) for p, t in zip(world.passages, texts) if mentions(t, name)]
        distractors = [t for pid, t in named if pid not in gold and not contains_answer(t, q["answers"])]
        with_distractor += bool(distractors)
        with_wording += any(word[q["relation"]] in t for t in distractors)
        # the name said more often in a passage without the answer than in any passage with it
        most_in_gold = max(t.count(name) for pid, t in named if pid in gold)
        louder += any(t.count(name) > most_in_gold for t in distractors)
    assert len(single) >= 40
    assert with_distractor / len(single) > 0.9
    assert with_wording / len(single) > 0.5
    assert louder / len(single) > 0.7


def test_answers_are_rare_and_never_inside_other_words(world):
    texts = [full(p).lower() for p in world.passages]
    corpus = "\n".join(texts)  # one string: a handful of C-speed scans per answer
    starts = [0]
    for t in texts[:-1]:
        starts.append(starts[-1] + len(t) + 1)
    limit = max(25, 0.03 * len(texts))
    for answer in sorted({a for q in world.questions for a in q["answers"]}):
        a = answer.lower()
        positions, pos = [], corpus.find(a)
        while pos >= 0:
            positions.append(pos)
            pos = corpus.find(a, pos + 1)
        assert len({bisect.bisect_right(starts, pos) for pos in positions}) <= limit, answer
        # every occurrence is a whole word: no 'orin' inside 'Dorin', no '1931' inside '19310'
        for pos in positions:
            before, after = corpus[pos - 1:pos], corpus[pos + len(a):pos + len(a) + 1]
            assert not (before.isalnum() or after.isalnum()), (answer, corpus[pos - 20:pos + len(a) + 20])


def bm25_ranker(passages, k1=1.2, b=0.75):
    """Plain Okapi BM25 over title + text, for a realism check independent of the retrieval module."""
    tokenize = lambda s: re.findall(r"[a-z0-9]+", s.lower())  # noqa: E731
    docs = [tokenize(full(p)) for p in passages]
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    postings = collections.defaultdict(list)
    for i, doc in enumerate(docs):
        for term, tf in collections.Counter(doc).items():
            postings[term].append((i, tf))

    def rank(question):
        scores = collections.Counter()
        for term in tokenize(question):
            idf = math.log(1 + (n - len(postings[term]) + 0.5) / (len(postings[term]) + 0.5))
            for i, tf in postings[term]:
                scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(docs[i]) / avg))
        return [passages[i]["id"] for i, _ in scores.most_common()]

    return rank


def test_bm25_finds_gold_near_the_top_but_not_always_first(world):
    rank = bm25_ranker(world.passages)
    ranks = []
    for q in world.questions:
        if q["dataset"] == POPQA and q["gold_passage_ids"]:
            order = rank(q["question"])
            ranks.append(min(order.index(g) if g in order else len(order) for g in q["gold_passage_ids"]))
    top1 = sum(r == 0 for r in ranks) / len(ranks)
    top10 = sum(r < 10 for r in ranks) / len(ranks)
    assert top1 < 0.6, top1  # distractors often outrank the passage with the answer
    assert top10 > 0.8, top10  # but retrieval can still find it


# -- files -------------------------------------------------------------------------------------

def test_write_world_round_trips_and_splits(tmp_path):
    paths = write_world(tmp_path / "w", seed=5, n_people=60, n_questions=120)
    assert set(paths) == {"corpus", "qa", "train", "test"}
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    expected = generate_world(5, 60, 120)
    assert read(paths["corpus"]) == expected.passages
    qa = read(paths["qa"])
    assert qa == expected.questions
    train, test = read(paths["train"]), read(paths["test"])
    train_ids, test_ids = {q["id"] for q in train}, {q["id"] for q in test}
    assert not train_ids & test_ids
    assert train_ids | test_ids == {q["id"] for q in qa}
    assert 0.65 < len(train) / len(qa) < 0.95
    assert all(is_train(i) for i in train_ids) and not any(is_train(i) for i in test_ids)


def test_cli_writes_the_files_and_reports_counts(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "2", "--people", "40", "--questions", "50"])
    out = capsys.readouterr().out
    assert "qa.jsonl" in out and "corpus.jsonl" in out
    assert len((tmp_path / "cli" / "qa.jsonl").read_text().splitlines()) == 50
