"""The passage index on Elasticsearch: its definition, creating or reusing it, checking that it can
serve the retriever, and finishing a bulk load (refresh, replicas, count check)."""

from __future__ import annotations

from ..base import check_fields, parse_fields
from .client import Cluster, ClusterError, call, connect, describe, log

# The analyzer equal to tantivy's "default" (retrieval.base.analyze): Rust's char::is_alphanumeric is the
# Unicode Alphabetic property or a numeric general category, which is Java's \\p{IsAlphabetic}\\p{N}.
ANALYZER = "instructrag_tantivy"
_TOKENIZER, _LONG_FILTER = "instructrag_tantivy_split", "instructrag_tantivy_long"
ANALYSIS = {
    "tokenizer": {_TOKENIZER: {"type": "pattern", "pattern": r"[^\p{IsAlphabetic}\p{N}]+"}},
    # tantivy drops tokens of >= 40 bytes; `length` counts characters (see the module docstring)
    "filter": {_LONG_FILTER: {"type": "length", "max": 39}},
    "analyzer": {ANALYZER: {"type": "custom", "tokenizer": _TOKENIZER, "filter": [_LONG_FILTER, "lowercase"]}},
}
SIMILARITY = "instructrag_bm25"
META_KEY = "instructrag_ray"  # mappings._meta.instructrag_ray.state: loading | complete


def index_definition(analyzer: str = "tantivy", shards: int = 1, k1: float = 1.2, b: float = 0.75) -> dict:
    """Settings and mappings of the passage index, as created for a bulk load (no replicas, no refresh).

    `analyzer` is "tantivy" (ANALYZER, the embedded backend's analysis) or a built-in Elasticsearch
    analyzer name such as "standard" or "english". Fields: id (keyword: the passage id, for ties and
    lookups), title and text (text, term frequencies without positions: BM25 needs no more).
    """
    name = ANALYZER if analyzer == "tantivy" else analyzer
    text = {"type": "text", "analyzer": name, "similarity": SIMILARITY, "index_options": "freqs"}
    return {
        "settings": {
            "number_of_shards": shards, "number_of_replicas": 0, "refresh_interval": "-1",
            "similarity": {SIMILARITY: {"type": "BM25", "k1": k1, "b": b}},
            "analysis": ANALYSIS,
        },
        "mappings": {
            "dynamic": "strict",
            "_meta": {META_KEY: {"state": "loading"}},
            "properties": {"id": {"type": "keyword"}, "title": dict(text), "text": dict(text)},
        },
    }


def get_index(client, cl: Cluster, index: str) -> dict | None:
    """GET /<index> (with retries): {concrete index name: {mappings, settings, ...}}, None if missing."""
    from elasticsearch import NotFoundError

    try:
        return call(cl, f"GET /{index}", lambda: client.indices.get(index=index)).body
    except NotFoundError:
        return None


def _same_analysis(settings: dict) -> bool:
    """The index defines ANALYZER exactly as ANALYSIS does (values compare as strings, as ES returns them)."""
    analysis = settings.get("index", {}).get("analysis", {})

    def norm(value):
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            return [norm(v) for v in value]
        return str(value)

    return all(norm(analysis.get(kind, {}).get(name)) == norm(spec)
               for kind in ANALYSIS for name, spec in ANALYSIS[kind].items())


def inspect_index(client, cl: Cluster, index: str, fields: dict[str, float]) -> tuple[str, list[str]]:
    """Check that `index` can serve the retriever; returns (query mode, notes).

    Needs: the index (or alias) exists; `id` is a keyword field; `text` and every searched field are
    text fields; no build is half done (mappings._meta.instructrag_ray.state == 'loading'). The mode
    is "terms" (retrieval/base.py's query from `analyze`) when every searched field uses ANALYZER as
    defined here, else "match" (one match query per field, analysed by the index). Raises ClusterError.
    """
    found = get_index(client, cl, index)
    if found is None:
        raise ClusterError(f"index {index!r} does not exist at {cl.url}; build it with `python jobs/build_index.py "
                           f"--corpus PASSAGES --output DIR backend=elasticsearch es_index={index}`, or fix "
                           f"{cl.keys}index")
    modes, notes = set(), []
    for name, spec in sorted(found.items()):
        mappings = spec.get("mappings") or {}
        props = mappings.get("properties") or {}
        state = ((mappings.get("_meta") or {}).get(META_KEY) or {}).get("state")
        if state == "loading":
            raise ClusterError(f"index {name!r} is being loaded by jobs/build_index.py, or its last build stopped before "
                               "the end; rerun the build until it prints its count check")
        have = ", ".join(f"{k} ({v.get('type', 'object')})" for k, v in sorted(props.items())) or "none"
        id_type = (props.get("id") or {}).get("type")
        if id_type != "keyword":
            raise ClusterError(f"index {name!r} has {'no field id' if id_type is None else f'id of type {id_type}'}; the "
                               f"retriever needs the passage id as a keyword field 'id' (its fields: {have}); rebuild "
                               "the index with jobs/build_index.py")
        for f in dict.fromkeys([*fields, "text"]):
            kind = (props.get(f) or {}).get("type")
            if kind != "text":
                raise ClusterError(f"index {name!r} has {'no field ' + repr(f) if kind is None else f'{f!r} of type {kind}'}; "
                                   f"the retriever needs text fields title and text (its fields: {have}); rebuild the "
                                   f"index with jobs/build_index.py, or search other fields with {cl.keys.replace('es_', '')}fields")
        if (mappings.get("_source") or {}).get("enabled") is False:
            raise ClusterError(f"index {name!r} does not keep _source, so passages cannot be returned; rebuild it with "
                               "jobs/build_index.py")
        analyzers = {f: (props[f] or {}).get("analyzer", "standard") for f in fields}
        ours = all(a == ANALYZER for a in analyzers.values()) and _same_analysis(spec.get("settings") or {})
        modes.add("terms" if ours else "match")
        if not ours:
            notes.append(f"index {name!r} analyses {', '.join(f'{f} with {a!r}' for f, a in analyzers.items())}, not "
                         f"{ANALYZER!r}: searching with match queries; rankings are not comparable with tantivy's")
    return ("terms" if modes == {"terms"} else "match"), notes


def check_search_index(cl: Cluster, index: str, fields: str | dict[str, float]) -> dict:
    """The driver's checks before a job that searches `index`; prints notes, raises ClusterError.
    Returns the server's GET / answer."""
    if not index:
        raise ClusterError(f"{cl.keys}index is not set; pass {cl.keys}index=NAME (jobs/build_index.py "
                           "backend=elasticsearch builds one)")
    fields = check_fields(dict(fields), fields) if isinstance(fields, dict) else parse_fields(fields)
    client, info = connect(cl)
    try:
        _, notes = inspect_index(client, cl, index, fields)
    finally:
        client.close()
    for note in notes:
        log(f"note: {note}")
    return info


def index_state(cl: Cluster, index: str, found: dict | None, definition: dict, overwrite: bool) -> str:
    """What prepare_index will do with `index` (`found`: get_index's answer), changing nothing: "created",
    "replaced" or "reused"; ClusterError for an alias or an index that cannot be reused."""
    if found is not None and index not in found:
        raise ClusterError(f"{cl.keys}index={index} is an alias of {', '.join(sorted(found))}; build into a concrete "
                           "index name and point the alias at it when the build has finished")
    if found is None:
        return "created"
    if overwrite:
        return "replaced"
    _check_reusable(cl, index, found[index], definition)
    return "reused"


def prepare_index(client, cl: Cluster, index: str, definition: dict, overwrite: bool) -> str:
    """Make `index` ready for a bulk load: create it, replace it (overwrite), or reuse it; returns
    "created", "replaced" or "reused". A reused index (a rerun: documents are overwritten under their
    passage id) must have been built with the same shards and analysis; it is put back into load
    mode (no replicas, no refresh, _meta state loading) until `finish_index`."""
    found = get_index(client, cl, index)
    state = index_state(cl, index, found, definition, overwrite)
    if state == "reused":
        settings = {"index": {"number_of_replicas": 0, "refresh_interval": "-1"}}
        call(cl, f"PUT /{index}/_settings", lambda: client.indices.put_settings(index=index, settings=settings))
        call(cl, f"PUT /{index}/_mapping", lambda: client.indices.put_mapping(
            index=index, meta=definition["mappings"]["_meta"]))
        return "reused"
    if found is not None:
        call(cl, f"DELETE /{index}", lambda: client.indices.delete(index=index))
    from elasticsearch import BadRequestError

    try:
        call(cl, f"PUT /{index}", lambda: client.indices.create(
            index=index, settings=definition["settings"], mappings=definition["mappings"]))
    except BadRequestError as e:
        raise ClusterError(f"Elasticsearch refused to create index {index!r} ({describe(e)}); check {cl.keys}index "
                           f"(lower case, no spaces) and {cl.keys}analyzer") from None
    return "replaced" if found is not None else "created"


def _check_reusable(cl: Cluster, index: str, spec: dict, definition: dict) -> None:
    props = (spec.get("mappings") or {}).get("properties") or {}
    settings = (spec.get("settings") or {}).get("index") or {}
    want_props = definition["mappings"]["properties"]
    want_shards = str(definition["settings"]["number_of_shards"])
    problems = []
    for name, want in want_props.items():
        have = props.get(name) or {}
        if have.get("type") != want["type"] or have.get("analyzer") != want.get("analyzer"):
            problems.append(f"{name} is {have.get('type', 'missing')}"
                            + (f" analysed by {have.get('analyzer', 'standard')!r}" if have.get("type") == "text" else "")
                            + f", this build wants {want['type']}"
                            + (f" analysed by {want['analyzer']!r}" if want.get("analyzer") else ""))
    if str(settings.get("number_of_shards", want_shards)) != want_shards:
        problems.append(f"{settings.get('number_of_shards')} shards, this build wants {want_shards}")
    if want_props["text"].get("analyzer") == ANALYZER and not _same_analysis(spec.get("settings") or {}):
        problems.append(f"its {ANALYZER!r} analyzer is defined differently")
    if problems:
        raise ClusterError(f"index {index!r} exists with other settings ({'; '.join(problems)}); pass overwrite=true to "
                           f"replace it, or choose another {cl.keys}index")


def finish_index(client, cl: Cluster, index: str, *, expected: int, replicas: int, refresh_interval: str) -> dict:
    """After a bulk load: refresh, restore replicas and refresh interval, count. The index is marked
    complete (and so searchable by the retriever) only when the count equals `expected`."""
    call(cl, f"POST /{index}/_refresh", lambda: client.indices.refresh(index=index))
    settings = {"index": {"number_of_replicas": replicas, "refresh_interval": refresh_interval}}
    call(cl, f"PUT /{index}/_settings", lambda: client.indices.put_settings(index=index, settings=settings))
    count = int(call(cl, f"GET /{index}/_count", lambda: client.count(index=index))["count"])
    if count == expected:
        call(cl, f"PUT /{index}/_mapping", lambda: client.indices.put_mapping(
            index=index, meta={META_KEY: {"state": "complete", "documents": count}}))
    return {"count": count, "expected": expected, "ok": count == expected}
