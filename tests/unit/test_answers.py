import pytest

from instructrag_ray.answers import has_answer, normalize, str_em


@pytest.mark.parametrize("text,expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("An apple, a pear.", "apple pear"),
    ("Theatre then", "theatre then"),          # 'the' only as a whole word
    ("U.S.A.", "usa"),
    ("  A  ", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_has_answer_substring_after_normalisation():
    assert has_answer("It was built by THE Eiffel company.", ["eiffel"])
    assert has_answer("born in Paris, France.", ["Lyon", "paris france"])  # any of several answers
    assert not has_answer("born in Lyon", ["Paris"])
    assert not has_answer("anything at all", ["The", "?"])  # answers that normalise to nothing never match
    assert not has_answer("", ["Paris"])


def test_str_em():
    pairs = [{"question": "q1", "answers": ["Daei", "Ali Daei"]}, {"question": "q2", "answers": ["Bican"]},
             {"question": "q3", "answers": ["Sinclair"]}]
    assert str_em("Ali Daei and Josef Bican", pairs) == pytest.approx(2 / 3)
    assert str_em("nobody", pairs) == 0.0
    assert str_em("x", []) == 0.0
