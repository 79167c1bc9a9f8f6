"""Elasticsearch: connect and check a cluster, define and bulk-load the passage index, search it in batches.

Only this module talks to the `elasticsearch` client, and it imports the client inside functions, so
importing the package (or running the embedded tantivy backend) never loads it.

- `cluster(...)` builds the connection settings (`Cluster`); credentials come from the arguments, else
  from the environment (ES_API_KEY, or ES_USERNAME and ES_PASSWORD). An API key wins over basic auth.
  Secrets never appear in a repr, a message, a log line or a manifest written by this project.
- `connect` makes the checks that must pass before any work starts and turns each failure into one
  line that says what to fix (`ClusterError`): unreachable, TLS not verified, credentials refused, a
  server that does not pair with the installed client. `inspect_index` adds: the index exists, it has
  the fields the retriever needs, and no build is half done.
- `index_definition`, `prepare_index`, `BulkWriter`, `finish_index`: the bulk load run by
  `jobs/build_index.py backend=elasticsearch` (the Ray Data chain is in index.py).
- `ElasticsearchRetriever`: the `Retriever` interface of retrieve.py over one `msearch` per batch.

Every request is retried with exponential backoff (and jitter) on connection errors, timeouts, 429
and 502/503/504; when the retries are spent, `ClusterUnavailable` stops the job with one line (a
rerun resumes). Other errors are not retried.

Supported client/server pairs (elasticsearch-py's own compatibility matrix):

    Elasticsearch 9.x   <-  elasticsearch-py 9.x, or 8.x (8.15 or later)
    Elasticsearch 8.x   <-  elasticsearch-py 8.x only (8.15 or later); Elasticsearch 8 refuses the
                            9.x client's requests (media_type_header_exception)

Ranking parity with the embedded backend: the index defines the analyzer `ANALYZER` (tantivy's
"default": split on every character that is neither alphabetic nor numeric, drop long tokens,
lower-case) and BM25 with k1=1.2, b=0.75, and the retriever sends retrieve.py's query, built from
`retrieve.analyze` as `term` clauses. Residual differences, all outside plain ASCII text:
- tantivy drops tokens of 40 or more UTF-8 bytes, Elasticsearch's `length` filter counts UTF-16
  characters (so it keeps some long non-ASCII tokens; they never match a query, but they count in the
  field length);
- lower-casing is per character in both, but Rust and Java differ on a few characters whose lower
  case is two characters (e.g. U+0130);
- Rust and Java may implement different Unicode versions of "alphabetic" and "numeric".
An index whose fields use another analyzer (`es_analyzer=standard`, or an index built by other tools)
is searched with one `match` query per field instead (same structure, the index analyses the
question); its rankings are not comparable with tantivy's.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .retrieve import Hit, QueryFailure, _check_fields, _check_k, analyze, parse_fields

ENV_API_KEY, ENV_USERNAME, ENV_PASSWORD = "ES_API_KEY", "ES_USERNAME", "ES_PASSWORD"

# (client major, server major) pairs that elasticsearch-py supports.
SUPPORTED_PAIRS = {(8, 8), (8, 9), (9, 9)}
PAIRS_HINT = ("Elasticsearch 8 needs the 8.x client (pip install 'elasticsearch>=8.15,<9'); "
              "Elasticsearch 9 pairs with the 9.x client (pip install 'elasticsearch>=9,<10')")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 30.0

# The analyzer equal to tantivy's "default" (retrieve.analyze): Rust's char::is_alphanumeric is the
# Unicode Alphabetic property or a numeric general category, which is Java's \p{IsAlphabetic}\p{N}.
ANALYZER = "instructrag_tantivy"
_TOKENIZER, _LONG_FILTER = "instructrag_tantivy_split", "instructrag_tantivy_long"
ANALYSIS = {
    "tokenizer": {_TOKENIZER: {"type": "pattern", "pattern": r"[^\p{IsAlphabetic}\p{N}]+"}},
    # tantivy drops tokens of >= 40 bytes; `length` counts characters (see the module docstring)
    "filter": {_LONG_FILTER: {"type": "length", "max": 39}},
    "analyzer": {ANALYZER: {"type": "custom", "tokenizer": _TOKENIZER, "filter": [_LONG_FILTER, "lowercase"]}},
}
SIMILARITY = "instructrag_bm25"
SORT = ["_score", {"id": "asc"}]  # ties by passage id, as TantivyRetriever orders them
SOURCE = ["id", "title", "text"]
META_KEY = "instructrag_ray"  # mappings._meta.instructrag_ray.state: loading | complete


def log(message: str) -> None:
    print(f"[elasticsearch] {message}", flush=True)


# --- errors ---------------------------------------------------------------------------------------


class ClusterError(RuntimeError):
    """The cluster cannot be used as configured; the message is one line that says what to fix."""


class ClusterUnavailable(ClusterError):
    """The cluster stopped answering and the retries are spent."""


def cluster_error_in(exc: BaseException) -> str | None:
    """The one-line message of a ClusterError raised inside a Ray task or actor, else None.

    Ray Data re-raises a stage's exception as RayTaskError(UserCodeException), which is not an
    instance of ours but carries its formatted traceback; this finds our line in it.
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, ClusterError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    found = re.findall(r"(?:ClusterError|ClusterUnavailable): (.+)", str(exc))
    return found[-1].strip() if found else None


def describe(exc: BaseException) -> str:
    """A short reason for a client exception (status, error type, server reason), never its repr:
    the repr of an ApiError holds the request headers, credentials included."""
    from elastic_transport import ApiError

    if isinstance(exc, ApiError):
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        if isinstance(error, dict):
            return f"{exc.meta.status} {error_reason(error)}"
        return f"{exc.meta.status} {str(exc.message)[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def error_reason(error: dict) -> str:
    """'type: reason (caused by: type: reason)' from an Elasticsearch error object."""
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}".strip()
    cause = error.get("caused_by")
    if isinstance(cause, dict) and cause.get("reason"):
        text += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    return text if len(text) <= 500 else f"{text[:240]} ... {text[-240:]}"  # the end often says what is wrong


# --- connecting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """How to reach a cluster: URL(s), credentials, TLS, timeout and retries. Pickles to Ray actors;
    the secrets are left out of its repr. `keys` is the config-key prefix used in messages."""

    url: str
    api_key: str = field(default="", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    ca_certs: str = ""
    verify_certs: bool = True
    request_timeout_s: float = 30.0
    max_retries: int = 5
    retry_backoff_s: float = 1.0
    keys: str = "es_"

    @property
    def hosts(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def auth(self) -> str:
        return "api_key" if self.api_key else "basic" if self.username else "none"

    def client(self):
        """A new client (one per actor); the client's own retries are off, `call` retries with backoff."""
        from elasticsearch import Elasticsearch

        options: dict[str, Any] = {"request_timeout": self.request_timeout_s, "max_retries": 0,
                                   "retry_on_timeout": False, "verify_certs": self.verify_certs}
        if self.ca_certs:
            options["ca_certs"] = self.ca_certs
        if self.api_key:
            options["api_key"] = self.api_key
        elif self.username:
            options["basic_auth"] = (self.username, self.password)
        return Elasticsearch(self.hosts, **options)


def cluster(url: str, *, api_key: str = "", username: str = "", password: str = "", ca_certs: str = "",
            verify_certs: bool = True, request_timeout_s: float = 30.0, max_retries: int = 5,
            retry_backoff_s: float = 1.0, keys: str = "es_", environ: dict | None = None) -> Cluster:
    """Connection settings; credentials not given here come from ES_API_KEY / ES_USERNAME / ES_PASSWORD.

    Raises ClusterError naming the key to fix: no URL, a URL that is not http(s), credentials inside
    the URL (they would end up in logs and manifests), a username without a password, a CA bundle
    that is not a file.
    """
    env = os.environ if environ is None else environ
    hosts = [u.strip() for u in url.split(",") if u.strip()]
    if not hosts:
        raise ClusterError(f"{keys}url is empty; pass {keys}url=https://HOST:9200")
    for host in hosts:
        parts = urlsplit(host)
        if "@" in parts.netloc:
            raise ClusterError(f"{keys}url carries credentials; remove them from the URL and set {ENV_API_KEY} "
                               f"(or {ENV_USERNAME} and {ENV_PASSWORD}) in the environment instead")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClusterError(f"{keys}url {host!r} is not an http:// or https:// URL (e.g. https://localhost:9200)")
    api_key = api_key or env.get(ENV_API_KEY, "")
    username = username or env.get(ENV_USERNAME, "")
    password = password or env.get(ENV_PASSWORD, "")
    if username and not password and not api_key:
        raise ClusterError(f"a username is set ({keys}username or {ENV_USERNAME}) but no password; set {ENV_PASSWORD} "
                           f"(or {keys}password), or use an API key ({ENV_API_KEY})")
    if ca_certs and not Path(ca_certs).is_file():
        raise ClusterError(f"{keys}ca_certs={ca_certs} is not a file; pass the cluster's CA certificate (PEM), "
                           "e.g. config/certs/http_ca.crt of a self-managed Elasticsearch")
    return Cluster(url=",".join(hosts), api_key=api_key, username=username if not api_key else "",
                   password=password if not api_key else "", ca_certs=ca_certs, verify_certs=verify_certs,
                   request_timeout_s=request_timeout_s, max_retries=max_retries, retry_backoff_s=retry_backoff_s,
                   keys=keys)


def transient(exc: BaseException) -> bool:
    """Worth retrying: the connection failed or timed out, or the cluster said 429/502/503/504."""
    from elastic_transport import ApiError, ConnectionError, ConnectionTimeout, TlsError

    if isinstance(exc, TlsError):
        return False  # a certificate problem does not go away by waiting
    if isinstance(exc, (ConnectionError, ConnectionTimeout)):
        return True
    return isinstance(exc, ApiError) and exc.meta.status in RETRY_STATUSES


def backoff_s(cl: Cluster, attempt: int) -> float:
    """Wait before retry `attempt` (1-based): doubling from retry_backoff_s, capped, with jitter."""
    return min(cl.retry_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


def call(cl: Cluster, what: str, request: Callable[[], Any]) -> Any:
    """`request()` with retries and backoff on transient failures.

    Raises ClusterUnavailable when the retries are spent, ClusterError for refused credentials, and
    re-raises any other error (a bad request is a bug, not a reason to wait).
    """
    from elastic_transport import ApiError

    attempt = 0
    while True:
        try:
            return request()
        except Exception as e:  # noqa: BLE001 - sorted into retry, stop with a line, or re-raise
            if isinstance(e, ApiError) and e.meta.status in (401, 403):
                raise ClusterError(credentials_message(cl, e)) from None
            if not transient(e):
                raise
            attempt += 1
            if attempt > cl.max_retries:
                raise ClusterUnavailable(
                    f"Elasticsearch at {cl.url} did not complete {what} after {attempt} tries ({describe(e)}); "
                    f"the job stopped: when the cluster answers again, rerun the same command, it resumes "
                    f"(raise {cl.keys}max_retries or {cl.keys}retry_backoff_s to wait longer)") from None
            wait = backoff_s(cl, attempt)
            log(f"{what}: {describe(e)}; retry {attempt}/{cl.max_retries} in {wait:.1f}s")
            time.sleep(wait)


def credentials_message(cl: Cluster, exc: BaseException) -> str:
    status = exc.meta.status  # type: ignore[attr-defined]
    if status == 403:
        return (f"Elasticsearch at {cl.url} refused the request for lack of a privilege ({describe(exc)}); the user or "
                "API key needs 'monitor' on the cluster, 'read' on the index to search it, and 'create_index', "
                "'write' and 'manage' on it to build it")
    if cl.auth == "none":
        return (f"Elasticsearch at {cl.url} wants credentials ({describe(exc)}); set {ENV_API_KEY}, or {ENV_USERNAME} "
                f"and {ENV_PASSWORD} (or {cl.keys}api_key / {cl.keys}username / {cl.keys}password)")
    given = f"API key ({ENV_API_KEY} or {cl.keys}api_key)" if cl.auth == "api_key" else (
        f"username and password ({ENV_USERNAME}/{ENV_PASSWORD} or {cl.keys}username/{cl.keys}password)")
    return f"Elasticsearch at {cl.url} refused the credentials ({describe(exc)}); check the {given}"


def connect(cl: Cluster):
    """A client and the server's `GET /` answer, after the checks that must pass before work starts.

    One request, no retries (a wrong URL should fail at once): reachable, TLS verified, credentials
    accepted, and a server major version that pairs with the installed client. Raises ClusterError.
    """
    from elastic_transport import ApiError, ConnectionError, ConnectionTimeout, TlsError
    from elasticsearch import UnsupportedProductError

    client = cl.client()
    try:
        info = client.info().body
    except TlsError as e:
        raise ClusterError(
            f"TLS certificate verification failed for {cl.url} ({describe(e)}); pass {cl.keys}ca_certs=PATH to the "
            "cluster's CA certificate (PEM; config/certs/http_ca.crt on a self-managed Elasticsearch)") from None
    except ConnectionTimeout as e:
        raise ClusterError(f"Elasticsearch at {cl.url} did not answer within {cl.request_timeout_s:g}s ({describe(e)}); "
                           f"check {cl.keys}url, or raise {cl.keys}request_timeout_s") from None
    except ConnectionError as e:
        raise ClusterError(f"cannot reach Elasticsearch at {cl.url} ({describe(e)}); check {cl.keys}url (scheme "
                           "http/https, host, port) and that the cluster is running") from None
    except UnsupportedProductError:
        raise ClusterError(f"{cl.url} answered but is not Elasticsearch (no 'X-Elastic-Product: Elasticsearch' "
                           f"header); check {cl.keys}url") from None
    except ApiError as e:
        if e.meta.status in (401, 403):
            raise ClusterError(credentials_message(cl, e)) from None
        if "media_type_header_exception" in describe(e):
            raise ClusterError(version_message(cl, _plain_version(client))) from None
        raise ClusterError(f"Elasticsearch at {cl.url} refused GET / ({describe(e)}); check {cl.keys}url") from None
    check_version(cl, info)
    return client, info


def _plain_version(client) -> str:
    """The server's version number asked without the client's compatibility headers (which an older
    server refuses); '' if that fails too."""
    try:
        _, body = client.transport.perform_request("GET", "/", headers={"accept": "application/json"})
        return str(body.get("version", {}).get("number", ""))
    except Exception:  # noqa: BLE001 - only used to make the message more precise
        return ""


def _client_version() -> str:
    from elasticsearch import __versionstr__

    return __versionstr__


def version_message(cl: Cluster, server: str) -> str:
    server_text = f"Elasticsearch {server}" if server else "an older Elasticsearch"
    return (f"{cl.url} is {server_text} and the installed elasticsearch client is {_client_version()}: they do "
            f"not pair. {PAIRS_HINT}")


def check_version(cl: Cluster, info: dict) -> None:
    """Stop on a client/server pair that elasticsearch-py does not support (see SUPPORTED_PAIRS)."""
    version = info.get("version") or {}
    number = str(version.get("number", ""))
    if version.get("build_flavor") == "serverless":
        return  # Elastic Cloud Serverless reports a fixed 8.11.0 and serves the current client
    client_major = int(_client_version().split(".")[0])
    match = re.match(r"(\d+)\.", number)
    if not match:
        raise ClusterError(f"{cl.url} reports no Elasticsearch version (GET / gave {number!r}); check {cl.keys}url")
    server_major = int(match.group(1))
    if (client_major, server_major) in SUPPORTED_PAIRS:
        return
    if server_major == client_major - 1 >= 8:
        # Elasticsearch itself refuses a newer client's compatibility headers (handled in connect);
        # a server that accepted them is not Elasticsearch (an emulator or a proxy that rewrites).
        log(f"note: {cl.url} reports Elasticsearch {number}, which the {client_major}.x client does not support, "
            "but it accepted the client's requests; continuing")
        return
    raise ClusterError(version_message(cl, number))


# --- the index ------------------------------------------------------------------------------------


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


def _get_index(client, cl: Cluster, index: str) -> dict | None:
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
    is "terms" (retrieve.py's query from `analyze`) when every searched field uses ANALYZER as
    defined here, else "match" (one match query per field, analysed by the index). Raises ClusterError.
    """
    found = _get_index(client, cl, index)
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
    fields = _check_fields(dict(fields), fields) if isinstance(fields, dict) else parse_fields(fields)
    client, info = connect(cl)
    try:
        _, notes = inspect_index(client, cl, index, fields)
    finally:
        client.close()
    for note in notes:
        log(f"note: {note}")
    return info


def prepare_index(client, cl: Cluster, index: str, definition: dict, overwrite: bool) -> str:
    """Make `index` ready for a bulk load: create it, replace it (overwrite), or reuse it; returns
    "created", "replaced" or "reused". A reused index (a rerun: documents are overwritten under their
    passage id) must have been built with the same shards and analysis; it is put back into load
    mode (no replicas, no refresh, _meta state loading) until `finish_index`."""
    found = _get_index(client, cl, index)
    if found is not None and index not in found:
        raise ClusterError(f"{cl.keys}index={index} is an alias of {', '.join(sorted(found))}; build into a concrete "
                           "index name and point the alias at it when the build has finished")
    if found is not None and not overwrite:
        _check_reusable(cl, index, found[index], definition)
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


# --- bulk loading ---------------------------------------------------------------------------------


@dataclass
class BulkStats:
    indexed: int = 0
    rejected: list[dict] = field(default_factory=list)  # {"id", "code", "reason"}
    requests: int = 0
    retries: int = 0
    bytes: int = 0


def _chunks(passages: Iterable[dict], max_docs: int, max_bytes: int) -> Iterator[list[tuple[dict, bytes]]]:
    """(passage, its two NDJSON lines) in bulk requests of at most max_docs documents and max_bytes
    bytes (a single larger document goes alone)."""
    chunk: list[tuple[dict, bytes]] = []
    size = 0
    for p in passages:
        lines = (json.dumps({"index": {"_id": p["id"]}}, ensure_ascii=False) + "\n"
                 + json.dumps({"id": p["id"], "title": p["title"], "text": p["text"]}, ensure_ascii=False) + "\n"
                 ).encode()
        if chunk and (len(chunk) >= max_docs or size + len(lines) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append((p, lines))
        size += len(lines)
    if chunk:
        yield chunk


def bulk_index(client, cl: Cluster, index: str, passages: Iterable[dict], *, max_docs: int = 1000,
               max_bytes: int = 5_000_000) -> BulkStats:
    """Index passages under their passage id (`_id` = id: a rerun overwrites, never duplicates).

    Request-level failures are retried by `call`; documents the cluster answered with 429/502/503/504
    are re-sent with backoff, and if it keeps refusing them ClusterUnavailable stops the load. Any
    other refused document is rejected with the server's reason (code "elasticsearch:<type>").
    """
    stats = BulkStats()
    for chunk in _chunks(passages, max_docs, max_bytes):
        pending, attempt = chunk, 0
        while pending:
            body = b"".join(lines for _, lines in pending)
            # The serializer passes bytes through, so the body is sent as measured.
            response = call(cl, f"a bulk request of {len(pending)} documents", lambda: client.bulk(
                index=index, operations=[body], filter_path="errors,items.*.status,items.*.error"))
            stats.requests += 1
            stats.bytes += len(body)
            items = response.get("items") or []
            if len(items) != len(pending):
                raise ClusterError(f"a bulk response to {index!r} has {len(items)} items for {len(pending)} documents")
            retry = []
            for (passage, lines), item in zip(pending, items):
                result = next(iter(item.values()))
                status = int(result.get("status", 500))
                if 200 <= status < 300:
                    stats.indexed += 1
                elif status in RETRY_STATUSES:
                    retry.append((passage, lines))
                else:
                    error = result.get("error") or {}
                    stats.rejected.append({"id": passage["id"], "code": f"elasticsearch:{error.get('type', status)}",
                                           "reason": f"Elasticsearch refused the document ({status} {error_reason(error)})"})
            if retry:
                attempt += 1
                if attempt > cl.max_retries:
                    raise ClusterUnavailable(
                        f"Elasticsearch at {cl.url} kept refusing {len(retry)} documents with status "
                        f"{sorted({int(next(iter(i.values())).get('status', 0)) for i in items} & RETRY_STATUSES)} "
                        f"after {attempt} tries; the load stopped: lower es_writers or es_bulk_docs (or give the "
                        "cluster more capacity) and rerun the same command")
                stats.retries += 1
                wait = backoff_s(cl, attempt)
                log(f"bulk: {len(retry)} documents refused for now (busy); retry {attempt}/{cl.max_retries} in {wait:.1f}s")
                time.sleep(wait)
            pending = retry
    return stats


class BulkWriter:
    """Stage `bulk` (actor; one client): reads id, title, text, code, reason. Indexes the passages
    whose `reason` is null, passes the others on as rejected; returns one row: received, indexed,
    requests, retries, bytes, and `rejected` (a JSON list of {id, code, reason}, written by the driver)."""

    def __init__(self, cluster: Cluster, index: str, max_docs: int, max_bytes: int):
        self.cluster, self.index = cluster, index
        self.max_docs, self.max_bytes = max_docs, max_bytes
        self.client = cluster.client()

    def __call__(self, batch):
        import pyarrow as pa

        from .batches import require

        require(batch, "bulk", "id", "title", "text", "code", "reason")
        rows = batch.to_pylist()
        rejected = [{"id": r["id"], "code": r["code"], "reason": r["reason"]} for r in rows if r["reason"] is not None]
        stats = bulk_index(self.client, self.cluster, self.index, (r for r in rows if r["reason"] is None),
                           max_docs=self.max_docs, max_bytes=self.max_bytes)
        return pa.table({"received": [len(rows)], "indexed": [stats.indexed], "requests": [stats.requests],
                         "retries": [stats.retries], "bytes": [stats.bytes],
                         "rejected": [json.dumps(rejected + stats.rejected)]})


# --- searching ------------------------------------------------------------------------------------


def es_query(question: str, fields: dict[str, float], mode: str = "terms") -> dict | None:
    """retrieve.py's query for `question` in Elasticsearch's DSL; None when it analyses to no term.

    mode "terms": per field, a bool.should of one `term` clause per analysed term (duplicates kept),
    boosted; the fields' bool queries are SHOULD clauses of one bool (scores add). mode "match": the
    same with one `match` query per field (for indexes analysed otherwise).
    """
    if mode == "match":
        if not question.strip():
            return None
        return {"bool": {"should": [{"match": {f: {"query": question, "boost": boost}}} for f, boost in fields.items()]}}
    terms = analyze(question)
    if not terms:
        return None
    return {"bool": {"should": [{"bool": {"should": [{"term": {f: t}} for t in terms], "boost": boost}}
                                for f, boost in fields.items()]}}


def search_request(query: dict, k: int) -> dict:
    """One search body: the top k by score, ties by id, with scores, without counting every hit."""
    return {"query": query, "size": k, "sort": SORT, "track_scores": True, "track_total_hits": False,
            "_source": SOURCE}


def _hits(response: dict) -> list[Hit]:
    hits = []
    for h in response["hits"]["hits"]:
        src = h.get("_source") or {}
        score = h.get("_score")
        hits.append(Hit(id=str(src.get("id", h["_id"])), title=src.get("title") or "", text=src.get("text") or "",
                        score=float(score if score is not None else h["sort"][0])))
    return hits


def _failure(cl: Cluster, index: str, response: dict) -> tuple[str, bool] | None:
    """(reason, transient) when one search of an msearch failed or is incomplete; None when it is fine.
    Raises ClusterError for failures that are the cluster's, not the query's (index gone, access)."""
    if "error" in response:
        error = response["error"] if isinstance(response["error"], dict) else {"type": str(response["error"])}
        status = int(response.get("status", 500))
        if status in (401, 403) or error.get("type") == "security_exception":
            raise ClusterError(f"Elasticsearch at {cl.url} refused a search on {index!r} ({status} "
                               f"{error_reason(error)}); check the credentials and their privileges")
        if status == 404 or error.get("type") == "index_not_found_exception":
            raise ClusterError(f"index {index!r} disappeared from {cl.url} during the job ({error_reason(error)}); "
                               f"rebuild it or fix {cl.keys}index, then rerun to resume")
        return f"Elasticsearch: {status} {error_reason(error)}", status in RETRY_STATUSES
    if response.get("timed_out"):
        return "Elasticsearch: the search timed out on the cluster (partial results discarded)", True
    shards = response.get("_shards") or {}
    if shards.get("failed"):
        first = (shards.get("failures") or [{}])[0].get("reason") or {}
        return f"Elasticsearch: {shards['failed']} shard(s) failed ({error_reason(first)})", True
    return None


class QueryError(RuntimeError):
    """One search failed on the cluster (the reason is the server's)."""


class ElasticsearchRetriever:
    """BM25 search over an Elasticsearch index, behind the `Retriever` interface of retrieve.py.

    One client per instance (one per Ray actor). `batch_search` sends one `msearch` per batch (the
    cluster runs at most `max_concurrent_searches` of its searches at once); a search that fails marks
    only its query (QueryFailure with the server's reason), after retries when the failure is
    transient; a cluster that stops answering raises ClusterUnavailable once the retries are spent.
    Pickles as its settings and reconnects on the other side.
    """

    def __init__(self, cluster: Cluster, index: str, fields: dict[str, float] | str | list[str] = "title,text", *,
                 max_concurrent_searches: int = 8, search_type: str = "query_then_fetch"):
        if search_type not in ("query_then_fetch", "dfs_query_then_fetch"):
            raise ValueError(f"search_type must be query_then_fetch or dfs_query_then_fetch, got {search_type!r}")
        if not index:
            raise ValueError("index must be an Elasticsearch index or alias name")
        self.cluster, self.index = cluster, index
        self.fields = _check_fields(dict(fields), fields) if isinstance(fields, dict) else parse_fields(fields)
        self.max_concurrent_searches, self.search_type = max_concurrent_searches, search_type
        self._client = cluster.client()
        self.query_mode, _ = inspect_index(self._client, cluster, index, self.fields)

    def __reduce__(self):
        return (_reopen, (self.cluster, self.index, dict(self.fields), self.max_concurrent_searches, self.search_type))

    def close(self) -> None:
        self._client.close()

    def query(self, question: str) -> dict | None:
        """The query this retriever sends for `question` (None: no term, no search)."""
        return es_query(question, self.fields, self.query_mode)

    def search(self, query: str, k: int) -> list[Hit]:
        """The top `k` passages for `query`, by BM25 score descending, ties by id ascending (one request).
        Raises QueryError when the cluster fails the search."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        _check_k(k)
        es_q = self.query(query)
        if es_q is None:
            return []
        response = call(self.cluster, "a search", lambda: self._client.search(
            index=self.index, search_type=self.search_type, query=es_q, size=k, sort=SORT, track_scores=True,
            track_total_hits=False, source=SOURCE)).body
        failure = _failure(self.cluster, self.index, response)
        if failure:
            raise QueryError(failure[0])
        return _hits(response)

    def batch_search(self, queries: list[str], k: int) -> list[list[Hit] | QueryFailure]:
        """`search` for each query in one msearch; a failed search becomes a QueryFailure and the rest go on."""
        _check_k(k)
        results: list[list[Hit] | QueryFailure | None] = [None] * len(queries)
        bodies: dict[int, dict] = {}
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                results[i] = QueryFailure(f"TypeError: query must be a string, got {type(q).__name__}")
                continue
            es_q = self.query(q)
            if es_q is None:
                results[i] = []
            else:
                bodies[i] = search_request(es_q, k)
        pending, attempt = list(bodies), 0
        while pending:
            searches: list[dict] = []
            for i in pending:
                searches += [{}, bodies[i]]
            responses = call(self.cluster, f"an msearch of {len(pending)} searches", lambda: self._client.msearch(
                index=self.index, searches=searches, max_concurrent_searches=self.max_concurrent_searches,
                search_type=self.search_type))["responses"]
            retry = []
            for i, response in zip(pending, responses):
                failure = _failure(self.cluster, self.index, response)
                if failure is None:
                    results[i] = _hits(response)
                elif failure[1] and attempt < self.cluster.max_retries:
                    retry.append(i)
                else:
                    results[i] = QueryFailure(failure[0] + (f" (after {attempt + 1} tries)" if failure[1] else ""))
            if retry:
                attempt += 1
                wait = backoff_s(self.cluster, attempt)
                log(f"msearch: {len(retry)} searches failed for now; retry {attempt}/{self.cluster.max_retries} "
                    f"in {wait:.1f}s")
                time.sleep(wait)
            pending = retry
        return results  # type: ignore[return-value]


def _reopen(cluster, index, fields, max_concurrent_searches, search_type):
    return ElasticsearchRetriever(cluster, index, fields, max_concurrent_searches=max_concurrent_searches,
                                  search_type=search_type)
