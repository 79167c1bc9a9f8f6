"""Unit tests for instructrag_ray.elastic: the query and index definitions, connection settings and
secrets, and the client's behaviour against small in-process HTTP stubs that answer the way
Elasticsearch does in cases noida-db cannot show (another server version, 401/403, 429s, mixed
msearch and bulk results). No services: the stubs listen on 127.0.0.1 inside the test process."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import elasticsearch
import pytest

from instructrag_ray import errors
from instructrag_ray.retrieval.elastic import bulk as es_bulk
from instructrag_ray.retrieval.elastic import client as es_client
from instructrag_ray.retrieval.elastic import index as es_index
from instructrag_ray.retrieval.elastic import search as es_search
from instructrag_ray.config import BuildIndexConfig, ConfigError, SynthesizeConfig, describe, load_config, to_dict
from instructrag_ray.retrieval.base import QueryFailure, Retriever, analyze
from instructrag_ray.retrieval.stage import make_retriever, retriever_options

CLIENT_MAJOR = int(elasticsearch.__versionstr__.split(".")[0])
INDEX = "passages"


# --- a stub server ----------------------------------------------------------------------------------


class Stub:
    """An HTTP server on 127.0.0.1 that answers with `respond(method, path, headers, body)` ->
    (status, json body[, extra headers]); records every request as (method, path, headers, body)."""

    def __init__(self, respond):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, payload, *extra = respond(self.command, self.path, self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                headers = {"Content-Type": "application/json", "X-Elastic-Product": "Elasticsearch",
                           **(extra[0] if extra else {})}
                for k, v in headers.items():
                    if v is not None:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    stubs = []

    def make(respond):
        stubs.append(Stub(respond))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def info(number, flavor="default"):
    return {"name": "node", "cluster_name": "c", "version": {"number": number, "build_flavor": flavor},
            "tagline": "You Know, for Search"}


def version_server(number, flavor="default"):
    """GET / like Elasticsearch `number`: a server refuses a newer client's compatibility headers."""
    major = int(number.split(".")[0])

    def respond(method, path, headers, body):
        accept = headers.get("Accept", "")
        wanted = int(accept.split("compatible-with=")[1]) if "compatible-with=" in accept else None
        if wanted and flavor != "serverless" and wanted > major:
            error = {"type": "media_type_header_exception", "reason": "Invalid media-type value on headers [Accept, Content-Type]",
                     "caused_by": {"type": "status_exception",
                                   "reason": f"Accept version must be either version {major} or {major - 1}, but found {wanted}"}}
            return 400, {"error": {"root_cause": [error], **error}, "status": 400}
        return 200, info(number, flavor)
    return respond


def cl(url, **kw):
    return es_client.cluster(url, max_retries=kw.pop("max_retries", 3), retry_backoff_s=0.01, environ=kw.pop("environ", {}),
                           **kw)


# --- the query and the index --------------------------------------------------------------------------


def test_query_is_the_documented_structure():
    fields = {"title": 0.5, "text": 1.0}
    assert analyze("What's up, up?") == ["what", "s", "up", "up"]
    assert es_search.es_query("What's up, up?", fields) == {"bool": {"should": [
        {"bool": {"should": [{"term": {"title": "what"}}, {"term": {"title": "s"}}, {"term": {"title": "up"}},
                             {"term": {"title": "up"}}], "boost": 0.5}},
        {"bool": {"should": [{"term": {"text": "what"}}, {"term": {"text": "s"}}, {"term": {"text": "up"}},
                             {"term": {"text": "up"}}], "boost": 1.0}}]}}
    assert es_search.es_query("?! ...", fields) is None
    assert es_search.es_query("a b", {"text": 2.0}, "match") == {"bool": {"should": [
        {"match": {"text": {"query": "a b", "boost": 2.0}}}]}}
    assert es_search.search_request({"match_all": {}}, 7) == {
        "query": {"match_all": {}}, "size": 7, "sort": ["_score", {"id": "asc"}], "track_scores": True,
        "track_total_hits": False, "_source": ["id", "title", "text"]}


def test_index_definition():
    d = es_index.index_definition("tantivy", shards=3, k1=1.2, b=0.75)
    s, m = d["settings"], d["mappings"]
    assert (s["number_of_shards"], s["number_of_replicas"], s["refresh_interval"]) == (3, 0, "-1")
    assert s["similarity"] == {es_index.SIMILARITY: {"type": "BM25", "k1": 1.2, "b": 0.75}}
    assert s["analysis"]["analyzer"][es_index.ANALYZER] == {
        "type": "custom", "tokenizer": es_index._TOKENIZER, "filter": [es_index._LONG_FILTER, "lowercase"]}
    assert s["analysis"]["filter"][es_index._LONG_FILTER] == {"type": "length", "max": 39}
    assert m["dynamic"] == "strict" and m["_meta"] == {"instructrag_ray": {"state": "loading"}}
    assert m["properties"]["id"] == {"type": "keyword"}
    for f in ("title", "text"):
        assert m["properties"][f] == {"type": "text", "analyzer": es_index.ANALYZER, "similarity": es_index.SIMILARITY,
                                      "index_options": "freqs"}
    assert es_index.index_definition("english")["mappings"]["properties"]["text"]["analyzer"] == "english"


def test_bulk_requests_are_cut_by_documents_and_bytes():
    passages = [{"id": str(i), "title": "", "text": "x" * 100} for i in range(10)]
    assert [len(c) for c in es_bulk._chunks(passages, max_docs=4, max_bytes=10**6)] == [4, 4, 2]
    one = len(next(es_bulk._chunks(passages[:1], 1, 10**6))[0][1])
    assert [len(c) for c in es_bulk._chunks(passages, max_docs=100, max_bytes=3 * one)] == [3, 3, 3, 1]
    assert [len(c) for c in es_bulk._chunks(passages, max_docs=100, max_bytes=1)] == [1] * 10  # a big one goes alone
    lines = next(es_bulk._chunks([{"id": "é", "title": "t", "text": "x"}], 1, 100))[0][1].decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"index": {"_id": "é"}}, {"id": "é", "title": "t", "text": "x"}]


# --- connection settings and secrets -------------------------------------------------------------------


def test_credentials_come_from_config_else_environment_and_never_show():
    env = {"ES_API_KEY": "env-key", "ES_USERNAME": "u", "ES_PASSWORD": "env-pw"}
    c = es_client.cluster("https://h:9200", environ=env)
    assert (c.api_key, c.username, c.password, c.auth) == ("env-key", "", "", "api_key")  # an API key wins
    c = es_client.cluster("https://h:9200", api_key="cfg-key", environ=env)
    assert c.api_key == "cfg-key"
    c = es_client.cluster("https://h:9200", environ={"ES_USERNAME": "u", "ES_PASSWORD": "pw"})
    assert (c.username, c.password, c.auth) == ("u", "pw", "basic")
    c = es_client.cluster("https://a:9200, https://b:9200", api_key="secret-key", password="secret-pw", environ={})
    assert c.hosts == ["https://a:9200", "https://b:9200"]
    assert "secret" not in repr(c) and "secret" not in str(c)


@pytest.mark.parametrize("url,kwargs,message", [
    ("", {}, "es_url is empty"),
    ("localhost:9200", {}, "not an http:// or https:// URL"),
    ("https://elastic:hunter2@h:9200", {}, "carries credentials.*ES_API_KEY"),
    ("https://h:9200", {"username": "u"}, "no password.*ES_PASSWORD"),
    ("https://h:9200", {"ca_certs": "/no/such/ca.pem"}, "es_ca_certs=/no/such/ca.pem is not a file"),
])
def test_bad_connection_settings_name_the_key(url, kwargs, message):
    with pytest.raises(errors.ClusterError, match=message) as err:
        es_client.cluster(url, environ={}, **kwargs)
    assert "hunter2" not in str(err.value)


def test_manifests_mask_secrets_and_every_key_is_described():
    cfg = load_config(SynthesizeConfig, None, ["input=i", "output=o", "retrieval.backend=elasticsearch",
                                               "retrieval.es_api_key=k3y", "retrieval.es_password=pw"])
    d = to_dict(cfg)
    assert d["retrieval"]["es_api_key"] == "***" and d["retrieval"]["es_password"] == "***"
    assert d["retrieval"]["es_username"] == "" and "k3y" not in json.dumps(d) and "pw\"" not in json.dumps(d)
    assert to_dict(load_config(SynthesizeConfig, None, ["input=i", "output=o"]))["retrieval"]["es_api_key"] == ""
    assert cfg.retrieval.es_api_key == "k3y"  # only the written form is masked
    keys = [k for k, _, _ in describe(BuildIndexConfig)]
    assert {"es_url", "es_index", "es_bulk_docs", "es_bulk_mb", "es_writers", "es_shards", "es_analyzer"} <= set(keys)


def test_retriever_options_are_plain_values(monkeypatch):
    monkeypatch.setenv("ES_API_KEY", "from-env")
    cfg = load_config(SynthesizeConfig, None, ["input=i", "output=o", "retrieval.backend=elasticsearch",
                                               "retrieval.es_index=wiki", "retrieval.es_url=https://h:9200"])
    options = retriever_options(cfg.retrieval)
    assert options["es_index"] == "wiki" and options["es_cluster"].api_key == "from-env"
    assert options["es_cluster"].keys == "retrieval.es_"
    assert retriever_options(load_config(SynthesizeConfig, None, ["input=i", "output=o"]).retrieval) == {
        "backend": "tantivy", "index_path": "", "fields": "title,text"}
    with pytest.raises(ValueError, match="unknown retrieval backend 'x'"):
        make_retriever("x")


@pytest.mark.parametrize("overrides,message", [
    (["backend=elasticsearch", "output=o"], "es_index is required for backend=elasticsearch"),
    (["backend=elasticsearch", "es_index=w"], "output is required for backend=elasticsearch"),
    (["backend=tantivy"], "index is required for backend=tantivy"),
    (["backend=elasticsearch", "es_index=w", "output=o", "es_bm25_b=2"], "es_bm25_b"),
    (["backend=solr"], "allowed: tantivy, elasticsearch"),
])
def test_build_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BuildIndexConfig, None, ["corpus=c.jsonl", *overrides])


def test_backoff_doubles_with_jitter_and_a_cap():
    c = es_client.cluster("http://h:9200", retry_backoff_s=1.0, environ={})
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 30)]:
        waits = [es_client.backoff_s(c, attempt) for _ in range(50)]
        assert all(base * 0.5 <= w <= base for w in waits)


def test_job_errors_are_found_in_exception_chains():
    class RayLikeWrapper(Exception):  # Ray's RayTaskError keeps the remote exception in .cause
        def __init__(self, cause):
            super().__init__("ray::MapWorker(MapBatches(RetrieveStage)).submit() ... long traceback")
            self.cause = cause

    outage = errors.ClusterUnavailable("Elasticsearch at http://h:9200 did not complete x\nFailed to apply UDF")
    assert errors.job_error_in(RayLikeWrapper(outage)) is outage
    assert errors.one_line(outage) == "Elasticsearch at http://h:9200 did not complete x"
    assert errors.job_error_in(RuntimeError("something else")) is None
    try:
        raise ValueError("wrapped") from errors.ClusterError("the line")
    except ValueError as e:
        assert str(errors.job_error_in(e)) == "the line"


# --- versions, credentials, product ------------------------------------------------------------------


@pytest.mark.parametrize("number,flavor", [("8.15.0", "default"), ("9.1.0", "default"), ("7.17.0", "default"),
                                           ("10.0.0", "default"), ("8.11.0", "serverless")])
def test_client_server_pairs(stub, number, flavor, capsys):
    server = stub(version_server(number, flavor))
    major = int(number.split(".")[0])
    supported = flavor == "serverless" or (CLIENT_MAJOR, major) in es_client.SUPPORTED_PAIRS
    if supported:
        client, got = es_client.connect(cl(server.url))
        assert got["version"]["number"] == number
        return
    with pytest.raises(errors.ClusterError) as err:
        es_client.connect(cl(server.url))
    message = str(err.value)
    assert f"is Elasticsearch {number} and the installed elasticsearch client is {elasticsearch.__versionstr__}" in message
    assert "Elasticsearch 8 needs the 8.x client (pip install 'elasticsearch>=8.15,<9')" in message
    assert "\n" not in message


def test_a_server_that_accepts_a_newer_client_is_let_through_with_a_note(stub, capsys):
    # what an emulator does (Elasticsearch itself refuses, see test_client_server_pairs)
    server = stub(lambda *a: (200, info(f"{CLIENT_MAJOR - 1}.15.3")))
    if CLIENT_MAJOR - 1 < 8:
        pytest.fail("the test assumes a client of major 9 or later")  # pragma: no cover
    es_client.connect(cl(server.url))
    assert "which the" in capsys.readouterr().out


def unauthorized(method, path, headers, body):
    error = {"type": "security_exception", "reason": "unable to authenticate user [x] for REST request [/]"}
    return 401, {"error": {"root_cause": [error], **error}, "status": 401}, {"WWW-Authenticate": "ApiKey"}


def test_credentials_are_sent_and_refusals_say_what_to_fix(stub):
    server = stub(unauthorized)
    with pytest.raises(errors.ClusterError, match="wants credentials.*set ES_API_KEY, or ES_USERNAME and ES_PASSWORD"):
        es_client.connect(cl(server.url))
    with pytest.raises(errors.ClusterError, match="refused the credentials .*401 security_exception.*check the API key"):
        es_client.connect(cl(server.url, api_key="k-123"))
    with pytest.raises(errors.ClusterError, match="check the username and password") as err:
        es_client.connect(cl(server.url, username="ann", password="pw-456"))
    assert "pw-456" not in str(err.value)
    auths = [headers.get("authorization") for _, _, headers, _ in server.requests]
    assert auths == [None, "ApiKey k-123", "Basic " + base64.b64encode(b"ann:pw-456").decode()]

    forbidden = stub(lambda *a: (403, {"error": {"type": "security_exception", "reason": "action [x] is unauthorized"},
                                       "status": 403}))
    with pytest.raises(errors.ClusterError, match="lack of a privilege.*'read' on the index"):
        es_client.connect(cl(forbidden.url, api_key="k"))


def test_a_server_that_is_not_elasticsearch(stub):
    server = stub(lambda *a: (200, info("9.0.0"), {"X-Elastic-Product": None}))
    with pytest.raises(errors.ClusterError, match="is not Elasticsearch"):
        es_client.connect(cl(server.url))


# --- msearch and bulk against a stub cluster ------------------------------------------------------------


def index_spec():
    d = es_index.index_definition()
    d["mappings"]["_meta"] = {"instructrag_ray": {"state": "complete"}}
    return {INDEX: {"aliases": {}, "mappings": d["mappings"], "settings": {"index": d["settings"]}}}


def hit(pid, score):
    return {"_index": INDEX, "_id": pid, "_score": score, "sort": [score, pid],
            "_source": {"id": pid, "title": f"T{pid}", "text": f"text {pid}"}}


def ok(*hits):
    return {"took": 1, "timed_out": False, "_shards": {"total": 1, "successful": 1, "failed": 0},
            "hits": {"hits": list(hits)}, "status": 200}


def test_msearch_retries_the_request_and_transient_searches_and_rejects_only_bad_ones(stub):
    calls = []

    def respond(method, path, headers, body):
        if path.startswith(f"/{INDEX}/_msearch"):
            calls.append([json.loads(line) for line in body.decode().splitlines()][1::2])
            if len(calls) == 1:
                return 429, {"error": {"type": "es_rejected_execution_exception", "reason": "queue full"}, "status": 429}
            if len(calls) == 2:
                bad = {"type": "query_shard_exception", "reason": "failed to create query: too many clauses"}
                busy = {"type": "es_rejected_execution_exception", "reason": "rejected execution"}
                return 200, {"responses": [ok(hit("a", 2.0), hit("b", 1.0)), {"error": bad, "status": 400},
                                           {"error": busy, "status": 429}]}
            return 200, {"responses": [ok(hit("c", 3.0))]}
        if path.startswith(f"/{INDEX}"):
            return 200, index_spec()
        return 200, info(f"{CLIENT_MAJOR}.0.0")

    server = stub(respond)
    retriever = es_search.ElasticsearchRetriever(cl(server.url), INDEX, "title,text", max_concurrent_searches=3)
    assert isinstance(retriever, Retriever) and retriever.query_mode == "terms"
    results = retriever.batch_search(["paris", "berlin", "?!", "rome", None], 2)
    assert [h.id for h in results[0]] == ["a", "b"] and results[0][0].title == "Ta" and results[0][0].score == 2.0
    assert isinstance(results[1], QueryFailure) and "400 query_shard_exception" in results[1].reason
    assert results[2] == [] and [h.id for h in results[3]] == ["c"]
    assert results[4] == QueryFailure("TypeError: query must be a string, got NoneType")
    assert len(calls) == 3 and len(calls[1]) == 3 and len(calls[2]) == 1  # the whole request, then one search
    assert calls[1][0]["size"] == 2 and calls[1][0]["sort"] == ["_score", {"id": "asc"}]
    msearch_paths = [p for _, p, _, _ in server.requests if "_msearch" in p]
    assert "max_concurrent_searches=3" in msearch_paths[0]


def test_a_cluster_that_stays_down_stops_with_one_line(stub):
    server = stub(lambda m, p, h, b: (503, {"error": {"type": "unavailable", "reason": "x"}, "status": 503})
                  if "_msearch" in p else (200, index_spec() if p.startswith(f"/{INDEX}") else info("9.0.0")))
    retriever = es_search.ElasticsearchRetriever(cl(server.url, max_retries=2), INDEX)
    with pytest.raises(errors.ClusterUnavailable, match=r"did not complete an msearch of 1 searches after 3 tries \(503"):
        retriever.batch_search(["paris"], 3)


def test_bulk_resends_busy_documents_and_rejects_refused_ones(stub):
    bodies = []

    def respond(method, path, headers, body):
        lines = [json.loads(line) for line in body.decode().splitlines()]
        bodies.append(lines)
        items = []
        for action in lines[0::2]:
            pid = action["index"]["_id"]
            if pid == "busy" and len(bodies) == 1:
                items.append({"index": {"status": 429, "error": {"type": "es_rejected_execution_exception"}}})
            elif pid == "bad":
                items.append({"index": {"status": 400, "error": {"type": "document_parsing_exception",
                                                                 "reason": "failed to parse field [text]"}}})
            else:
                items.append({"index": {"status": 201}})
        return 200, {"errors": True, "items": items}

    server = stub(respond)
    c = cl(server.url)
    passages = [{"id": i, "title": "", "text": "x"} for i in ("ok", "busy", "bad")]
    stats = es_bulk.bulk_index(c.client(), c, INDEX, passages, max_docs=10)
    assert (stats.indexed, stats.requests, stats.retries) == (2, 2, 1)
    assert stats.rejected == [{"id": "bad", "code": "elasticsearch:document_parsing_exception",
                               "reason": "Elasticsearch refused the document (400 document_parsing_exception: "
                                         "failed to parse field [text])",
                               "original": '{"id": "bad", "title": "", "text": "x"}'}]
    assert [a["index"]["_id"] for a in bodies[1][0::2]] == ["busy"]
    assert "/passages/_bulk" in server.requests[0][1]


def test_bulk_stops_when_the_cluster_keeps_refusing(stub):
    server = stub(lambda *a: (200, {"errors": True, "items": [{"index": {"status": 429}}]}))
    c = cl(server.url, max_retries=2)
    with pytest.raises(errors.ClusterUnavailable, match="kept refusing 1 documents.*lower es_writers or es_bulk_docs"):
        es_bulk.bulk_index(c.client(), c, INDEX, [{"id": "a", "title": "", "text": "x"}])
