"""The retrieval interface and the one query definition every backend sends.

`Retriever` is the interface the pipeline uses (`search`, `batch_search`, returning our own `Hit`s);
`stage.make_retriever` builds the configured backend: `tantivy_index.TantivyRetriever` (the embedded,
memory-mapped BM25 index that `tantivy_index.build_tantivy_index` builds from the passages
`corpus.read_corpus` reads), or `elastic.search.ElasticsearchRetriever` (imported only when chosen).
Both send the query described below, so that they rank alike.

The query (one definition for every backend)
--------------------------------------------
Question text is never given to a query parser (tantivy's parser raises on "what's", parentheses,
quotes, a bare AND/OR/NOT and `word:word`). It is analysed into terms with `analyze` and the query is
built from the terms, the way an Elasticsearch `match` query does it:

    bool.should(                                       # field scores add (multi_match most_fields)
        boost(bool.should(term(f, t1), term(f, t2), ..., term(f, tn)), boost_f)
        for each field f in fields                     # e.g. {"title": 1.0, "text": 1.0}
    )

- `t1..tn` are `analyze(question)` in order, duplicates kept: a term that occurs twice in the
  question is two clauses and counts twice (Lucene merges equal SHOULD clauses by adding their
  boosts, which scores the same).
- No clause is required (OR semantics, minimum_should_match unset); a document's score is the sum,
  over fields, of boost_f times the sum of BM25(t, f) over the clauses it matches.
- A question that analyses to no term returns [] and is not an error.
- BM25 is Lucene's, k1=1.2, b=0.75: idf = ln(1 + (N - n + 0.5) / (n + 0.5)),
  tf = f / (f + k1 * (1 - b + b * dl / avgdl)), with dl decoded from a one-byte length norm.

In Elasticsearch terms, for fields "title^0.5,text" and a question analysing to [t1, t2]:

    {"bool": {"should": [
        {"bool": {"should": [{"term": {"title": "t1"}}, {"term": {"title": "t2"}}], "boost": 0.5}},
        {"bool": {"should": [{"term": {"text": "t1"}},  {"term": {"text": "t2"}}],  "boost": 1.0}}]}}

(the same as one `match` per field when the field's analyzer equals `analyze`; sending `term`
clauses built from `analyze` makes the query side identical by construction).

The analyzer is tantivy's "default": split on every character that is not alphanumeric (Unicode,
Rust's `char::is_alphanumeric`), drop tokens of 40 bytes or more (UTF-8), lower-case. It has no
stop words, so "the of" is a real query. Elasticsearch's `standard` analyzer differs ("don't" and
"3.14" stay one token there), so the Elasticsearch index must define a matching analyzer.

Known score differences between the backends (ranking is the same where statistics agree):
- tantivy multiplies every term score by (k1 + 1) = 2.2; Lucene >= 8 (Elasticsearch >= 7) does
  not. Scores are comparable only up to that constant.
- tantivy's N and avgdl count every document in the index; Lucene's count only the documents that
  have the field. They differ for `title` when some passages have an empty title.

Ties are ordered by score, descending, then by passage id (Python string order), so results do not
depend on how tantivy split the index into segments; an Elasticsearch backend sorts by
`["_score", {"id": "asc"}]` for the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

SEARCHABLE_FIELDS = ("title", "text")
# tantivy's "default" analyzer drops tokens whose UTF-8 length is >= this.
MAX_TOKEN_BYTES = 40


# --- our types and the interface ------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float


@dataclass(frozen=True)
class QueryFailure:
    """One query of a batch failed; only its row is rejected."""

    reason: str


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[Hit]: ...

    def batch_search(self, queries: list[str], k: int) -> list[list[Hit] | QueryFailure]: ...


# --- fields ---------------------------------------------------------------------------------------


def parse_fields(spec: str | list[str]) -> dict[str, float]:
    """Fields and boosts to search: "title^0.5,text" or ["title^0.5", "text"] -> {"title": 0.5, "text": 1.0}.

    Raises ValueError naming the bad part: an unknown field (allowed: title, text), a repeated
    field, a boost that is not a positive finite number, or an empty spec.
    """
    if isinstance(spec, str):
        parts = spec.split(",")
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        raise ValueError(f"fields must be a string like 'title^0.5,text' or a list of such parts, got {type(spec).__name__}")
    fields: dict[str, float] = {}
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"fields spec {spec!r}: each part must be a string like 'title^0.5', got {part!r}")
        part = part.strip()
        if not part:
            raise ValueError(f"fields spec {spec!r} has an empty part; write e.g. 'title^0.5,text'")
        name, caret, boost_text = part.partition("^")
        name = name.strip()
        boost = 1.0
        if caret:
            try:
                boost = float(boost_text)
            except ValueError:
                raise ValueError(f"fields spec {spec!r}: boost {boost_text.strip()!r} of {name!r} is not a number") from None
        if name in fields:
            raise ValueError(f"fields spec {spec!r} names {name!r} twice")
        fields[name] = boost
    if not fields:
        raise ValueError(f"fields spec {spec!r} names no field; allowed: {', '.join(SEARCHABLE_FIELDS)}")
    return check_fields(fields, spec)


def check_fields(fields: dict[str, float], spec: Any) -> dict[str, float]:
    for name, boost in fields.items():
        if name not in SEARCHABLE_FIELDS:
            raise ValueError(f"fields spec {spec!r}: unknown field {name!r}; allowed: {', '.join(SEARCHABLE_FIELDS)}")
        if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not math.isfinite(boost) or boost <= 0:
            raise ValueError(f"fields spec {spec!r}: boost of {name!r} must be a positive finite number, got {boost!r}")
    return {name: float(boost) for name, boost in fields.items()}


# --- analysis -------------------------------------------------------------------------------------

_ANALYZER = None


def analyze(text: str) -> list[str]:
    """The terms of `text` under tantivy's "default" analyzer, in order, duplicates kept.

    Built from tantivy's own pieces (SimpleTokenizer, RemoveLongFilter(40), LowerCaser: the
    definition of "default" in tantivy's tokenizer manager), so query terms equal indexed terms.
    """
    global _ANALYZER
    if _ANALYZER is None:
        import tantivy

        _ANALYZER = (
            tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(MAX_TOKEN_BYTES))
            .filter(tantivy.Filter.lowercase())
            .build()
        )
    return _ANALYZER.analyze(text)


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
