"""The openai engine against a real OpenAI-compatible server (`transformers serve` with the project's tiny
model on localhost): the same rationales as the transformers engine, a server that fails some requests
(through a fault-injecting proxy), and a server that dies mid-run."""

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instructrag_ray import schemas
from instructrag_ray.config import SynthesizeConfig, load_config
from instructrag_ray.generation.transformers_engine import TransformersEngine
from instructrag_ray.synthesize import run_synthesis
from instructrag_ray.errors import OutputConflict as ResumeConflict

from faulty_proxy import FaultyProxy
from local_server import LocalServer

pytest.importorskip("fastapi", reason="the openai engine's tests need the `serve` extra: pip install -e '.[test]'")
pytestmark = pytest.mark.integration

KEY = "sk-never-log-me-4242"
ROWS = 12
BAD_ROWS = ['{"id": "bad-1", "question": "Who?"}', '{"id": "bad-5", "question": "zzzqqq xxyyzz", "answers": ["x"]}']


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = LocalServer(tiny_model, tmp_path_factory.mktemp("serve") / "server.log").start()
    yield s
    s.stop()


@pytest.fixture
def qa(world, tmp_path):
    lines = world["qa"].read_text().splitlines()[:ROWS]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines + BAD_ROWS) + "\n")
    return path, [json.loads(line) for line in lines]


def config_args(qa, out, index, *extra):
    return [f"input={qa}", f"output={out}", f"retrieval.index_path={index}", "generation.max_new_tokens=8",
            "generation.batch_size=8", "generation.num_cpus=0.25", "progress_interval_s=0", *extra]


def config(qa, out, index, *extra):
    return load_config(SynthesizeConfig, None, config_args(qa, out, index, *extra))


def openai(url, *extra):
    return ("generation.engine=openai", f"generation.base_url={url}", "generation.concurrency=4",
            "generation.retry_backoff_s=0.05", "generation.max_retries=2", *extra)


def read(path):
    return pq.read_table(path).to_pylist() if any(path.glob("*.parquet")) else []


def test_openai_engine_writes_what_the_transformers_engine_writes(ray_local, index, qa, server, tmp_path, monkeypatch,
                                                                 capfd):
    qa_path, _ = qa
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    proxy = FaultyProxy(server.root)  # no faults: it records the key the server got and the server's usage
    try:
        via_server = run_synthesis(config(qa_path, tmp_path / "openai", index, *openai(proxy.url)))
    finally:
        proxy.stop()

    good, bad = read(tmp_path / "openai" / "rationales"), read(tmp_path / "openai" / "rejected")
    for f in (tmp_path / "openai").rglob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(schemas.load(f.parent.name).remove_metadata())
    assert len(good) == ROWS and {r["id"] for r in bad} == {"bad-1", "bad-5"}
    assert all(r["generator"] == "openai:tiny" for r in good)

    # the server saw exactly our prompt's tokens, and wrote exactly what the transformers engine writes
    assert all(proxy.usage[r["prompt"].removeprefix("<|begin_of_text|>")]["prompt_tokens"] == r["prompt_tokens"]
               for r in good)
    local = TransformersEngine(model="tiny", max_new_tokens=8, micro_batch_size=1).generate(good)  # no padding
    for r, ref in zip(good, local):
        assert (r["rationale"], r["completion_tokens"]) == (ref.text, ref.completion_tokens)
        # a server calls a stop token drawn as the last allowed token 'length'
        assert r["finish_reason"] == ref.finish_reason or r["completion_tokens"] == 8

    # engine, model, server and sampling are in the manifest and the fingerprint: another engine is refused
    manifest = json.loads((tmp_path / "openai" / "manifest.json").read_text())
    g = manifest["config"]["generation"]
    assert (g["engine"], g["model"], g["base_url"], g["temperature"], g["max_new_tokens"]) == (
        "openai", "tiny", proxy.url, 0.0, 8)
    assert via_server["config_fingerprint"] == good[0]["config_fingerprint"] != config(
        qa_path, tmp_path / "openai", index).fingerprint()
    with pytest.raises(ResumeConflict):
        run_synthesis(config(qa_path, tmp_path / "openai", index))

    # the key reached the server and nothing else: not the manifest, the Parquet, the console or Ray's logs
    assert proxy.auth == {f"Bearer {KEY}"}
    assert KEY not in (tmp_path / "openai" / "manifest.json").read_text()
    assert all(KEY.encode() not in f.read_bytes() for f in (tmp_path / "openai").rglob("*.parquet"))
    out, err = capfd.readouterr()
    assert KEY not in out + err
    logs = ray_local._private.worker._global_node.get_logs_dir_path()  # internal, but the only way to Ray's logs
    assert all(KEY.encode() not in p.read_bytes() for p in Path(logs).rglob("*") if p.is_file())


def test_server_errors_reject_only_their_rows(ray_local, index, qa, server, tmp_path):
    qa_path, rows = qa
    # the prompt shows a question lower-cased at its start, with "?" appended (PAPER.md's normalisation)
    broken, invalid = rows[2]["question"][1:].rstrip("?"), rows[5]["question"][1:].rstrip("?")

    healed = []

    def fault(prompt, attempt):
        if healed:
            return None
        if broken in prompt:
            return 500, {"error": {"message": "injected: model worker crashed"}}, {}
        if invalid in prompt:
            return 400, {"error": {"message": "injected: prompt rejected"}}, {}
        if attempt == 1 and hash(prompt) % 2:  # every other prompt fails once, then succeeds
            return (429, {"error": "injected: slow down"}, {"Retry-After": "0"}) if hash(prompt) % 4 == 1 else (
                503, {"error": "injected: busy"}, {})
        return None

    proxy = FaultyProxy(server.root, fault)
    try:
        manifest = run_synthesis(config(qa_path, tmp_path / "out", index, *openai(proxy.url)))
        first = (read(tmp_path / "out" / "rationales"), read(tmp_path / "out" / "rejected"))
        attempts = dict(proxy.attempts)
        healed.append(True)  # the model worker is back: a rerun tries the 5xx row again, not the 400 one
        again = run_synthesis(config(qa_path, tmp_path / "out", index, *openai(proxy.url)))
    finally:
        proxy.stop()

    good, bad = first
    by_id = {r["id"]: r for r in bad}
    assert by_id[rows[2]["id"]]["stage"] == "generate" and by_id[rows[2]["id"]]["reason"] == "server_error"
    assert "HTTP 500" in by_id[rows[2]["id"]]["detail"] and "model worker crashed" in by_id[rows[2]["id"]]["detail"]
    assert by_id[rows[5]["id"]]["reason"] == "request_rejected" and "HTTP 400" in by_id[rows[5]["id"]]["detail"]
    assert len(good) == ROWS - 2 and len(bad) == 4  # + the two rows rejected before generation
    retried = [p for p, statuses in proxy.faults.items() if broken not in p and invalid not in p]
    assert retried and all(attempts[p] == 2 for p in retried)  # failed once, then written
    assert attempts[next(p for p in attempts if broken in p)] == 3  # 1 + max_retries
    assert manifest["totals"]["reject_reasons"]["generate:server_error"] == 1
    assert manifest["totals"]["reject_reasons"]["generate:request_rejected"] == 1

    good, bad = read(tmp_path / "out" / "rationales"), read(tmp_path / "out" / "rejected")
    assert again["this_run"]["written"] == 1 and rows[2]["id"] in {r["id"] for r in good}
    assert sorted(r["id"] for r in good + bad) == sorted({r["id"] for r in good + bad})  # each row once
    assert {r["id"] for r in bad} == {r["id"] for r in first[1]} - {rows[2]["id"]}
    assert "generate:server_error" not in again["totals"]["reject_reasons"]
    assert again["totals"]["reject_reasons"]["generate:request_rejected"] == 1


def test_a_server_that_dies_mid_run_stops_the_job_and_a_rerun_finishes(ray_local, tiny_model, index, qa, tmp_path,
                                                                        job_main, capsys):
    qa_path, rows = qa
    server = LocalServer(tiny_model, tmp_path / "server.log").start()
    # blocks of 4 rows all the way (retrieval would bundle them into one), so batches are written as they finish
    args = config_args(qa_path, tmp_path / "out", index, *openai(server.url, "generation.max_retries=1"),
                       "generation.batch_size=4", "retrieval.batch_size=4", "generation.concurrency=2")
    cfg = load_config(SynthesizeConfig, None, args)

    def kill_mid_run():
        # Kill once a batch is on disk. If the server gets close to the end first, freeze it: with 10 of 12
        # rows served in batches of 4, some batch is complete and gets written while the others wait.
        written = tmp_path / "out" / "rationales"
        frozen_at = None
        while server.proc.poll() is None:
            if any(written.glob("*.parquet")) or (frozen_at and time.monotonic() - frozen_at > 120):
                server.kill()
            elif frozen_at is None and server.completions_served() >= ROWS - 2:
                server.freeze()
                frozen_at = time.monotonic()
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    killer.start()
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:  # the job as a user runs it: one line, exit status 2
            job_main("synthesize")(args)
        assert exit_.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "did not answer" in errors[0] and "rerun the same command" in errors[0], errors
        killer.join(timeout=5)
        first_good, first_bad = read(tmp_path / "out" / "rationales"), read(tmp_path / "out" / "rejected")
        assert not (tmp_path / "out" / "manifest.json").exists()
        assert all(r["stage"] != "generate" for r in first_bad)  # an outage rejects no row
        assert 0 < len(first_good) < ROWS

        server = LocalServer(tiny_model, tmp_path / "server2.log", port=server.port).start()  # back, same URL
        again = run_synthesis(cfg)
    finally:
        server.stop()
    good, bad = read(tmp_path / "out" / "rationales"), read(tmp_path / "out" / "rejected")
    assert sorted(r["id"] for r in good) == sorted(r["id"] for r in rows)  # every row exactly once
    assert {r["id"] for r in bad} == {"bad-1", "bad-5"}
    assert again["this_run"]["written"] == ROWS - len(first_good)  # what was written before is not redone
    assert again["this_run"]["resumed_rows_skipped"] == len(first_good) + len(first_bad)
