"""The Elasticsearch path over real HTTP with the unmodified `elasticsearch` client, against noida-db
(an Elasticsearch-API emulator started by the `noida` fixture): the bulk index job, an idempotent
rebuild, ranking parity with the embedded tantivy backend, retrieval inside the synthesis job, the
start-up errors, credentials and TLS (through `Front`), and a server stopped mid-run.

noida-db scans every document for every term clause, so the corpus here is small (about 180
passages) and so are the question sets."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instructrag_ray import errors, schemas
from instructrag_ray.retrieval.elastic import bulk as es_bulk
from instructrag_ray.retrieval.elastic import client as es_client
from instructrag_ray.retrieval.elastic import index as es_index
from instructrag_ray.retrieval.elastic import search as es_search
from instructrag_ray.retrieval import base as retrieval_base
from instructrag_ray.config import BuildIndexConfig, SynthesizeConfig, load_config
from instructrag_ray.retrieval.build import build_index
from instructrag_ray.retrieval.corpus import read_corpus
from instructrag_ray.retrieval.tantivy_index import TantivyRetriever, build_tantivy_index

pytestmark = pytest.mark.integration

LONG_ID = "L" * 600  # Elasticsearch refuses _id longer than 512 bytes: a per-document failure from the server
INDEX = "world"


@pytest.fixture(scope="session")
def es_world(tmp_path_factory):
    from instructrag_ray.testing.synthetic import write_world

    return write_world(tmp_path_factory.mktemp("es_world"), seed=11, n_people=30, n_questions=40)


@pytest.fixture(scope="session")
def es_corpus(es_world, tmp_path_factory):
    """The world's passages plus four that cannot be indexed: (path, number of good passages)."""
    lines = es_world["corpus"].read_text().splitlines()
    bad = ["{not json", json.dumps({"id": "no-text", "title": "x"}), lines[0],
           json.dumps({"id": LONG_ID, "title": "t", "text": "a passage with a very long id"})]
    path = tmp_path_factory.mktemp("es_corpus") / "corpus.jsonl"
    path.write_text("\n".join(lines + bad) + "\n")
    return path, len(lines)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(es_world, n=None):
    rows = [json.loads(line) for line in es_world["qa"].read_text().splitlines()]
    return [r["question"] for r in rows][:n]


def build_cfg(corpus, output, url, index=INDEX, *extra):
    return load_config(BuildIndexConfig, None, [
        f"corpus={corpus}", f"output={output}", "backend=elasticsearch", f"es_url={url}", f"es_index={index}",
        "es_replicas=0", "es_block_mb=0.02", "es_bulk_docs=40", "progress_interval_s=0", "es_max_retries=2",
        "es_retry_backoff_s=0.1", *extra])


def test_cluster(url, **kwargs):
    return es_client.cluster(url, max_retries=kwargs.pop("max_retries", 2), retry_backoff_s=0.1, environ={}, **kwargs)


test_cluster.__test__ = False  # a helper, not a test


def load_directly(url, corpus, index=INDEX):
    """Load a corpus without Ray (fixtures of the fault tests): the same functions the job uses."""
    cl = test_cluster(url)
    client, _ = es_client.connect(cl)
    es_index.prepare_index(client, cl, index, es_index.index_definition(), overwrite=True)
    from instructrag_ray.retrieval.corpus import checked_passages

    stats = es_bulk.bulk_index(client, cl, index, (p for p in checked_passages(read_corpus(corpus)) if "_reject" not in p),
                               max_docs=50)
    assert es_index.finish_index(client, cl, index, expected=stats.indexed, replicas=0, refresh_interval="1s")["ok"]
    return stats.indexed


@pytest.fixture(scope="session")
def es_built(ray_local, noida, es_corpus, tmp_path_factory):
    corpus, n_good = es_corpus
    output = tmp_path_factory.mktemp("es_build") / "report"
    manifest = build_index(build_cfg(corpus, output, noida.url))
    return {"manifest": manifest, "output": output, "n_good": n_good, "corpus": corpus}


@pytest.fixture(scope="session")
def tantivy_world(es_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("tantivy_world") / "index"
    build_tantivy_index(read_corpus(es_world["corpus"]), path)
    return TantivyRetriever(path)


# --- the bulk index job --------------------------------------------------------------------------


def test_build_loads_in_parallel_rejects_with_reasons_and_checks_the_count(es_built, noida):
    m, n_good, output = es_built["manifest"], es_built["n_good"], es_built["output"]
    assert m["input"] == n_good + 4 and m["indexed"] == n_good and m["rejected"] == 4
    assert m["reject_codes"] == {"duplicate_id": 1, "elasticsearch:action_request_validation_exception": 1,
                                 "invalid_passage": 2}
    assert m["count_check"] == {"count": n_good, "expected": n_good, "ok": True, "input_minus_rejected": n_good}
    assert m["bulk"]["requests"] >= 4 and m["elasticsearch"]["index_was"] == "created"
    assert json.loads((output / "manifest.json").read_text()) == m

    rejected = read_rows(output / "rejected")  # the rejected table of every job (schemas/rejected.json)
    assert pq.read_schema(next((output / "rejected").glob("*.parquet"))).names == schemas.columns("rejected")
    by_code = {r["reason"]: r for r in rejected}
    assert {r["stage"] for r in rejected} == {"index"}
    assert by_code["duplicate_id"]["detail"].endswith("duplicate id (the first one is indexed)")
    assert json.loads(by_code["duplicate_id"]["original"])["id"] == "p000000"  # the passage as read
    assert by_code["elasticsearch:action_request_validation_exception"]["id"] == LONG_ID
    assert "512 bytes" in by_code["elasticsearch:action_request_validation_exception"]["detail"]
    assert {r["detail"].split(": ", 1)[1] for r in rejected if r["reason"] == "invalid_passage"} >= {"no text"}
    assert "{not json" in {r["original"] for r in rejected}
    assert len(list((output / "rejected").glob("*.parquet"))) == 1  # only blocks with rejects write a file

    client = test_cluster(noida.url).client()
    spec = client.indices.get(index=INDEX)[INDEX]
    settings, mappings = spec["settings"]["index"], spec["mappings"]
    assert settings["refresh_interval"] == "1s" and settings["number_of_replicas"] == "0"  # restored after the load
    assert mappings["_meta"]["instructrag_ray"]["state"] == "complete"
    assert mappings["properties"]["id"] == {"type": "keyword"}
    assert mappings["properties"]["text"]["analyzer"] == es_index.ANALYZER
    assert settings["analysis"]["tokenizer"][es_index._TOKENIZER]["pattern"] == r"[^\p{IsAlphabetic}\p{N}]+"
    assert client.count(index=INDEX)["count"] == n_good
    assert client.get(index=INDEX, id="p000000")["_source"]["id"] == "p000000"


def test_rebuild_is_idempotent_and_a_stale_index_is_caught(ray_local, noida, es_corpus, tmp_path):
    corpus, n_good = es_corpus
    first = build_index(build_cfg(corpus, tmp_path / "r1", noida.url, "rebuild"))
    again = build_index(build_cfg(corpus, tmp_path / "r1", noida.url, "rebuild"))  # same command: a rerun
    assert again["elasticsearch"]["index_was"] == "reused"
    assert again["indexed"] == first["indexed"] == n_good and again["count_check"]["count"] == n_good
    assert len(read_rows(tmp_path / "r1" / "rejected")) == 4  # the report describes the rerun, not both runs

    # a smaller corpus into the same index: the documents of the first corpus are still there
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(corpus.read_text().splitlines()[:20]) + "\n")
    with pytest.raises(errors.ClusterError, match="holds .* documents but this run indexed 20.*overwrite=true"):
        build_index(build_cfg(small, tmp_path / "r2", noida.url, "rebuild"))
    with pytest.raises(errors.ClusterError, match="being loaded"):  # the retriever refuses it meanwhile
        es_index.check_search_index(test_cluster(noida.url), "rebuild", "title,text")
    replaced = build_index(build_cfg(small, tmp_path / "r3", noida.url, "rebuild", "overwrite=true"))
    assert replaced["elasticsearch"]["index_was"] == "replaced" and replaced["count_check"]["count"] == 20
    es_index.check_search_index(test_cluster(noida.url), "rebuild", "title,text")


# --- retrieval -------------------------------------------------------------------------------------


def test_parity_with_tantivy(es_built, noida, tantivy_world, es_world):
    retriever = es_search.ElasticsearchRetriever(test_cluster(noida.url), INDEX, "title,text")
    assert retriever.query_mode == "terms"
    qs = questions(es_world, 30)
    got = retriever.batch_search(qs, 10)
    ratios = []
    for q, hits in zip(qs, got):
        expected = tantivy_world.search(q, 10)
        assert [h.id for h in hits] == [h.id for h in expected], q
        assert [(h.title, h.text) for h in hits] == [(h.title, h.text) for h in expected]
        ratios += [t.score / e.score for e, t in zip(hits, expected)]
    # the same BM25 statistics: tantivy's scores are one constant times Elasticsearch's (2.2 = k1 + 1
    # for Lucene >= 8; noida-db keeps the factor, so the constant is 1 there)
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-4)
    assert retriever.search(qs[0], 10) == got[0]
    assert retriever.batch_search(["?!", qs[1]], 3)[0] == []


def test_a_failed_search_rejects_only_its_row(es_built, noida, es_world):
    retriever = es_search.ElasticsearchRetriever(test_cluster(noida.url), INDEX, "title,text")
    qs = questions(es_world, 3)
    normal = retriever.query
    retriever.query = lambda q: {"no_such_query": {}} if q == qs[1] else normal(q)  # the server refuses it
    results = retriever.batch_search(qs, 3)
    assert isinstance(results[1], retrieval_base.QueryFailure) and "parsing_exception" in results[1].reason
    assert all(isinstance(r, list) and r for r in (results[0], results[2]))


def synth_cfg(qa, out, url, *extra):
    return load_config(SynthesizeConfig, None, [
        f"input={qa}", f"output={out}", "retrieval.backend=elasticsearch", f"retrieval.es_url={url}",
        f"retrieval.es_index={INDEX}", "retrieval.batch_size=8", "retrieval.es_max_retries=2",
        "retrieval.es_retry_backoff_s=0.1", "generation.engine=template-baseline", "generation.batch_size=8",
        "progress_interval_s=0", *extra])


def read_rows(path):
    return pq.read_table(path).to_pylist() if any(path.glob("*.parquet")) else []


def test_synthesis_retrieves_from_elasticsearch(ray_local, tiny_model, es_built, noida, es_world, tantivy_world, tmp_path):
    out = tmp_path / "out"
    manifest = run_synthesis(synth_cfg(es_world["qa"], out, noida.url, "limit=16"))
    good, bad = read_rows(out / "rationales"), read_rows(out / "rejected")
    assert len(good) + len(bad) == 16 and manifest["config"]["retrieval"]["backend"] == "elasticsearch"
    assert not [r for r in bad if r["stage"] == "retrieve" and r["reason"] == "search_failed"]
    for row in good:
        assert row["ctxs_source"] == "retrieved"
        assert [c["id"] for c in row["ctxs"]] == [h.id for h in tantivy_world.search(row["question"], 5)]


def run_synthesis(cfg):
    from instructrag_ray.synthesize import run_synthesis as run

    return run(cfg)


# --- errors at start -------------------------------------------------------------------------------


def test_start_errors_say_what_to_fix(es_built, noida, make_front, tls_files):
    client = test_cluster(noida.url).client()
    client.indices.create(index="no_title", mappings={"properties": {"id": {"type": "keyword"}, "body": {"type": "text"}}})
    client.indices.create(index="text_id", mappings={"properties": {"id": {"type": "text"}, "title": {"type": "text"},
                                                                     "text": {"type": "text"}}})
    locked = make_front(noida, api_key="right-key")
    tls = make_front(noida, tls=tls_files[1:])
    cases = [
        (test_cluster(f"http://127.0.0.1:{free_port()}"), INDEX, "cannot reach Elasticsearch at .*check es_url"),
        (test_cluster(noida.url), "missing", "index 'missing' does not exist.*jobs/build_index.py"),
        (test_cluster(noida.url), "no_title", "has no field 'title'.*rebuild the index"),
        (test_cluster(noida.url), "text_id", "id of type text.*keyword field 'id'"),
        (test_cluster(locked.url), INDEX, "wants credentials.*ES_API_KEY"),
        (test_cluster(locked.url, api_key="wrong-key"), INDEX, "refused the credentials.*check the API key"),
        (test_cluster(tls.url), INDEX, "TLS certificate verification failed.*es_ca_certs"),
    ]
    for cl, index, message in cases:
        with pytest.raises(errors.ClusterError, match=message) as err:
            es_index.check_search_index(cl, index, "title,text")
        assert "\n" not in str(err.value) and "wrong-key" not in str(err.value)
    assert es_index.check_search_index(test_cluster(tls.url, ca_certs=tls_files[0]), INDEX, "title,text")


def test_the_jobs_stop_at_start_with_one_line(ray_local, tiny_model, es_built, noida, es_world, tmp_path, capsys,
                                              job_main):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(errors.ClusterError, match=r"^cannot reach Elasticsearch at http://127.0.0.1:\d+ .*retrieval.es_url"):
        run_synthesis(synth_cfg(es_world["qa"], tmp_path / "s", dead, "limit=4"))
    assert not (tmp_path / "s" / "rationales").exists()
    with pytest.raises(errors.ClusterError, match="retrieval.es_index is not set"):
        run_synthesis(synth_cfg(es_world["qa"], tmp_path / "s", noida.url, "limit=4", "retrieval.es_index="))

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        job_main("build_index")(["--corpus", str(es_world["corpus"]), "--output", str(tmp_path / "b"),
                                 "backend=elasticsearch", f"es_url={dead}", "es_index=x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach Elasticsearch") and "check es_url" in err[0]


# --- credentials and TLS -----------------------------------------------------------------------------


def test_api_key_and_tls_end_to_end_and_no_secret_is_written(ray_local, tiny_model, es_built, noida, es_world,
                                                             make_front, tls_files, tmp_path, monkeypatch, capfd):
    key, password = "c2VjcmV0LWFwaS1rZXk6MTIz", "pa55-w0rd-xyz"
    front = make_front(noida, tls=tls_files[1:], api_key=key)
    monkeypatch.setenv("ES_API_KEY", key)
    out = tmp_path / "out"
    manifest = run_synthesis(synth_cfg(es_world["qa"], out, front.url, "limit=6", f"retrieval.es_ca_certs={tls_files[0]}"))
    assert manifest["totals"]["rationales"] + manifest["totals"]["rejected"] == 6
    assert read_rows(out / "rationales") and {auth for _, _, auth in front.requests} == {f"ApiKey {key}"}

    basic = make_front(noida, basic=("builder", password))
    monkeypatch.delenv("ES_API_KEY")
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(es_world["corpus"].read_text().splitlines()[:10]) + "\n")
    built = build_index(build_cfg(small, tmp_path / "b", basic.url, "basic_auth", "es_username=builder",
                                  f"es_password={password}"))
    assert built["config"]["es_password"] == "***" and built["elasticsearch"]["auth"] == "basic"

    import ray

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    logs_dir = ray._private.worker._global_node.get_logs_dir_path()  # this session's Ray logs (actors included)
    logs = [p for p in Path(logs_dir).rglob("*") if p.is_file()]
    captured = capfd.readouterr()
    for secret in (key, password):
        assert secret not in captured.out and secret not in captured.err
        for path in written + logs:
            assert secret.encode() not in path.read_bytes(), path


# --- a server stopped mid-run ----------------------------------------------------------------------


def stop_at(server, path_part, n, restart_after=None):
    """A Front hook: stop `server` when the n-th request whose path contains `path_part` arrives, and
    start it again `restart_after` seconds later (never, if None)."""
    seen = {"n": 0}

    def hook(method, path):
        if path_part in path:
            seen["n"] += 1
            if seen["n"] == n:
                server.stop()
                if restart_after is not None:
                    threading.Timer(restart_after, server.start).start()
    return hook


def test_retriever_recovers_when_the_server_comes_back(fresh_noida, make_front, es_world, es_corpus):
    load_directly(fresh_noida.url, es_corpus[0])
    qs = questions(es_world, 12)
    undisturbed = es_search.ElasticsearchRetriever(test_cluster(fresh_noida.url), INDEX).batch_search(qs, 5)
    front = make_front(fresh_noida, on_request=stop_at(fresh_noida, "_msearch", 2, restart_after=1.0))
    retriever = es_search.ElasticsearchRetriever(test_cluster(front.url, max_retries=8), INDEX)
    results = [r for i in range(0, len(qs), 4) for r in retriever.batch_search(qs[i:i + 4], 5)]
    assert results == undisturbed
    assert sum("_msearch" in p for _, p, _ in front.requests) > 3  # the second batch was retried


def test_synthesis_fails_clearly_then_resumes_without_loss_or_duplicates(ray_local, tiny_model, fresh_noida, make_front,
                                                                         es_world, es_corpus, tmp_path):
    load_directly(fresh_noida.url, es_corpus[0])
    front = make_front(fresh_noida, on_request=stop_at(fresh_noida, "_msearch", 2))
    out = tmp_path / "out"
    cfg = synth_cfg(es_world["qa"], out, front.url, "limit=24", "retrieval.batch_size=6")
    with pytest.raises(Exception) as err:
        run_synthesis(cfg)
    message = str(errors.job_error_in(err.value))
    assert "did not complete an msearch" in message and "rerun the same command" in message
    before = [r["id"] for r in read_rows(out / "rationales") + read_rows(out / "rejected")]
    assert len(before) < 24

    fresh_noida.start()
    front.on_request = None
    manifest = run_synthesis(cfg)
    rows = read_rows(out / "rationales") + read_rows(out / "rejected")
    ids = [r["id"] for r in rows]
    expected = [json.loads(line)["id"] for line in es_world["qa"].read_text().splitlines()[:24]]
    assert sorted(ids) == sorted(expected)  # nothing lost, nothing twice
    assert manifest["this_run"]["resumed_rows_skipped"] == len(before)
    assert not [r for r in read_rows(out / "rejected") if r["stage"] == "retrieve" and r["reason"] == "search_failed"]


def test_build_fails_clearly_then_a_rerun_completes(ray_local, fresh_noida, make_front, es_corpus, tmp_path):
    corpus, n_good = es_corpus
    front = make_front(fresh_noida, on_request=stop_at(fresh_noida, "_bulk", 2))
    cfg = build_cfg(corpus, tmp_path / "report", front.url)
    with pytest.raises(errors.ClusterError, match="did not complete a bulk request.*rerun the same command"):
        build_index(cfg)
    fresh_noida.start()
    front.on_request = None
    with pytest.raises(errors.ClusterError, match="being loaded"):
        es_index.check_search_index(test_cluster(front.url), INDEX, "title,text")
    manifest = build_index(cfg)
    assert manifest["elasticsearch"]["index_was"] == "reused"
    assert manifest["count_check"]["ok"] and manifest["count_check"]["count"] == n_good
