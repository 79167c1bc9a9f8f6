"""Faults a kill -9 and fuzzing campaign found (issue 13): duplicates on a quick restart, data lost with
overwrite=true, crashes on bad bytes, wrong or lost rows, unclear failures. Each has its test here; the
synthesis job runs on the session's local Ray with the template baseline (no model time), or as a
subprocess where the driver must be killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrag_ray.config import SynthesizeConfig, load_config
from instructrag_ray.errors import ConfigError, InputError
from instructrag_ray.storage import StorageError
from instructrag_ray.synthesize import run_synthesis

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CTXS = [{"id": "d1", "title": "Paris", "text": "Paris is the capital of France.", "score": 2.0},
        {"id": "d2", "title": "Lyon", "text": "Lyon is a city in France.", "score": 1.0}]


def good(i: int, **extra) -> dict:
    return {"id": f"g{i}", "question": f"What is the capital of France ({i})?", "answers": ["Paris"],
            "ctxs": CTXS, **extra}


def cfg(inp, out, *extra):
    return load_config(SynthesizeConfig, None, [f"input={inp}", f"output={out}", "generation.engine=template-baseline",
                                                "generation.batch_size=8", "progress_interval_s=0", *extra])


def rows_of(out: Path, table: str) -> list[dict]:
    d = out / table
    return pq.read_table(d).to_pylist() if d.is_dir() and any(d.glob("*.parquet")) else []


def outcome(out: Path) -> tuple[Counter, list[dict]]:
    """How often each id ended up in the output (a rationale or a reject, duplicate_id copies apart), and
    the rejects."""
    rejected = rows_of(out, "rejected")
    ids = Counter(r["id"] for r in rows_of(out, "rationales"))
    ids.update(r["id"] for r in rejected if r["reason"] != "duplicate_id")
    return ids, rejected


# --- 3 and 4: one bad row is one reject, never a crash; nothing wrong or lost ----------------------------


def test_bad_bytes_and_odd_rows_are_rejected_each_with_a_reason(ray_local, tiny_model, tmp_path):
    lines = [json.dumps(good(0)).encode(),
             b'{"id": "latin1", "question": "caf\xe9?", "answers": ["x"]}',  # not UTF-8
             ("[" * 2000 + "]" * 2000).encode(),  # JSON nested 2,000 levels
             b'{"id": "deep", "question": "q?", "answers": ["x"], "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
             b'{"id": "\\ud800", "question": "surrogate id?", "answers": ["x"]}',
             json.dumps({"id": "nul", "question": "a\u0000b?", "answers": ["x"]}).encode(),
             json.dumps({**good(1), "id": "inf", "ctxs": [{"title": "t", "text": "x", "score": float("inf")}]}).encode(),
             json.dumps(good(2)).encode()]
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # and a UTF-8 BOM before the first row
    manifest = run_synthesis(cfg(path, tmp_path / "out"))
    ids, rejected = outcome(tmp_path / "out")
    assert {r["id"] for r in rows_of(tmp_path / "out", "rationales")} == {"g0", "g2"}  # the BOM row is good
    reasons = {r["reason"] for r in rejected}
    assert {"invalid_utf8", "invalid_json", "invalid_text", "bad_ctxs", "not_an_object"} <= reasons, reasons
    latin = next(r for r in rejected if r["reason"] == "invalid_utf8")
    assert "not valid UTF-8" in latin["detail"] and "byte offset" in latin["detail"] and "caf\\xe9" in latin["original"]
    assert sum(ids.values()) == len(lines) and set(ids.values()) == {1}
    assert manifest["input_rows"] == len(lines)


def test_binary_parquet_text_is_read_as_text_and_a_json_array_in_a_jsonl_file_as_an_array(ray_local, tiny_model,
                                                                                           tmp_path):
    table = pa.table({"id": ["b1", "b2"], "question": [b"Who was born in Paris?", b"\xff\xfe"],
                      "answers": [["x"], ["y"]], "ctxs": [CTXS, CTXS]})
    pq.write_table(table, tmp_path / "qa.parquet")
    run_synthesis(cfg(tmp_path / "qa.parquet", tmp_path / "p"))
    assert [r["question"] for r in rows_of(tmp_path / "p", "rationales")] == ["Who was born in Paris?"]
    assert [(r["id"], r["reason"]) for r in rows_of(tmp_path / "p", "rejected")] == [("b2", "bad_question")]

    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps([good(5), good(6)], indent=2))  # one pretty-printed array, named .jsonl
    run_synthesis(cfg(pretty, tmp_path / "a"))
    assert sorted(r["id"] for r in rows_of(tmp_path / "a", "rationales")) == ["g5", "g6"]
    assert not rows_of(tmp_path / "a", "rejected")


def test_every_copy_of_a_duplicated_id_ends_up_once_across_a_resume(ray_local, tiny_model, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(good(0)) for _ in range(3)) + "\n" + json.dumps(good(1)) + "\n")
    one_run = tmp_path / "one"
    run_synthesis(cfg(path, one_run))
    expected = Counter((r["id"], r["reason"]) for r in rows_of(one_run, "rejected"))
    assert expected == {("g0", "duplicate_id"): 2}

    two_runs = tmp_path / "two"
    run_synthesis(cfg(path, two_runs, "limit=2"))  # the first two copies
    run_synthesis(cfg(path, two_runs))  # then everything: the third copy must not be lost
    assert Counter((r["id"], r["reason"]) for r in rows_of(two_runs, "rejected")) == expected
    assert sorted(r["id"] for r in rows_of(two_runs, "rationales")) == ["g0", "g1"]


def test_an_input_without_rows_is_one_clear_error(ray_local, tiny_model, tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match="holds no rows"):
            run_synthesis(cfg(tmp_path / name, tmp_path / f"out-{name}"))
    with pytest.raises(ConfigError, match="prompt.num_docs"):
        cfg(tmp_path / "x.jsonl", tmp_path / "o", "prompt.num_docs=0")


# --- 2: overwrite=true deletes nothing until every check passed -------------------------------------------


def test_overwrite_with_a_bad_input_or_model_keeps_the_old_output(ray_local, tiny_model, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(good(i)) for i in range(4)) + "\n")
    out = tmp_path / "out"
    run_synthesis(cfg(path, out))
    before = sorted(r["id"] for r in rows_of(out, "rationales"))
    with pytest.raises(StorageError, match="does not exist"):
        run_synthesis(cfg(tmp_path / "mistyped.jsonl", out, "overwrite=true"))
    with pytest.raises(Exception, match="could not be loaded"):
        run_synthesis(cfg(path, out, "overwrite=true", "generation.model=/no/such/model"))
    with pytest.raises(InputError, match="no tantivy index"):
        run_synthesis(cfg(path, out, "overwrite=true", "retrieval.index_path=/no/index"))
    assert sorted(r["id"] for r in rows_of(out, "rationales")) == before == ["g0", "g1", "g2", "g3"]


# --- 5: an output that cannot be written is one line before any work ---------------------------------------


def test_unwritable_outputs_fail_at_start_in_one_line(ray_local, tiny_model, tmp_path, job_main, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    (tmp_path / "a-file").write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    cases = [(tmp_path / "a-file", "is a file"), ("/proc/instructrag-out", "output=/proc/instructrag-out")]
    if os.geteuid() != 0:  # root writes anywhere: the read-only case needs an ordinary user
        cases.append((read_only / "out", "not writable"))
    for out, message in cases:
        capsys.readouterr()
        started = time.time()
        with pytest.raises(SystemExit) as exit_:
            job_main("synthesize")(["--input", str(path), "--output", str(out), "generation.engine=template-baseline"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert time.time() - started < 30  # at start, not after the first batch


# --- the fuzz test: whatever the rows, rows in = rationales + rejects, each id once -----------------------


def fuzz_lines(seed: int, n: int) -> list[bytes]:
    """Seeded malformed rows of many kinds, mixed with good ones and exact duplicates."""
    rng = random.Random(seed)
    kinds = [
        lambda i: json.dumps(good(i)).encode(),
        lambda i: json.dumps({**good(i), "answers": []}).encode(),
        lambda i: json.dumps({**good(i), "answers": "Paris"}).encode(),
        lambda i: json.dumps({**good(i), "answers": [1, 2]}).encode(),
        lambda i: json.dumps({"id": f"f{i}", "answers": ["x"]}).encode(),
        lambda i: json.dumps({**good(i), "question": 7}).encode(),
        lambda i: json.dumps({**good(i), "ctxs": "not a list"}).encode(),
        lambda i: json.dumps({**good(i), "ctxs": [{"title": "t"}]}).encode(),
        lambda i: json.dumps({**good(i), "ctxs": [{"title": "t", "text": "x", "score": "high"}]}).encode(),
        lambda i: json.dumps({**good(i), "id": [i]}).encode(),
        lambda i: json.dumps({**good(i), "id": True}).encode(),
        lambda i: json.dumps({**good(i), "qa_pairs": [{"question": 1}]}).encode(),
        lambda i: json.dumps(good(i))[: rng.randint(1, 40)].encode(),  # cut short
        lambda i: b"\xff\xfe" + json.dumps(good(i)).encode(),
        lambda i: json.dumps({**good(i), "question": "\u0000"}).encode(),
        lambda i: f"question {i}\t['Paris']".encode(),  # a DPR-topics line: good
        lambda i: f"question {i}\tnot a list".encode(),
        lambda i: b"[" + json.dumps(good(i)).encode() + b"]",
        lambda i: b"12345",
        lambda i: ('{"id": "s%d", "question": "\\udc80?", "answers": ["x"]}' % i).encode(),
    ]
    lines = [rng.choice(kinds)(i) for i in range(n)]
    lines += [rng.choice(lines) for _ in range(n // 10)]  # exact duplicates
    rng.shuffle(lines)
    return lines


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_rows_each_end_up_once(ray_local, tiny_model, index, tmp_path, seed):
    path = tmp_path / "fuzz.jsonl"
    lines = fuzz_lines(seed, 120)
    path.write_bytes(b"\n".join(lines) + b"\n")
    manifest = run_synthesis(cfg(path, tmp_path / "out", f"retrieval.index_path={index}"))
    rationales, rejected = rows_of(tmp_path / "out", "rationales"), rows_of(tmp_path / "out", "rejected")
    assert len(rationales) + len(rejected) == len(lines) == manifest["input_rows"]  # rows in = rows out
    ids, _ = outcome(tmp_path / "out")
    assert set(ids.values()) == {1}  # each id once (its extra copies are duplicate_id rejects)
    assert all(r["reason"] and r["detail"] and r["original"] is not None for r in rejected)
    assert len(rationales) > 5 and len({r["reason"] for r in rejected}) >= 8


# --- 1: a quick restart after kill -9 of the driver duplicates nothing -------------------------------------


def start_job(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "synthesize.py"), *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_a_quick_restart_after_kill_9_is_exactly_once(tiny_model, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(good(i)) for i in range(120)) + "\n")
    out = tmp_path / "out"
    # the tiny model writes slowly enough that the driver dies with batches in flight
    args = ["--input", str(path), "--output", str(out), "generation.batch_size=4", "generation.max_new_tokens=24",
            "progress_interval_s=1", "rows_per_file=0"]
    for attempt in range(2):
        committed = len(list((out / "rationales").glob("*.parquet")))
        job = start_job(args, tmp_path / f"run{attempt}.log")
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None:
            if len(list((out / "rationales").glob("*.parquet"))) > committed:  # this run's files are landing
                break
            time.sleep(0.1)
        assert job.poll() is None, (tmp_path / f"run{attempt}.log").read_text()[-2000:]
        os.kill(job.pid, signal.SIGKILL)  # the driver only: its workers may still finish their writes
        job.wait()
        ids, _ = outcome(out)
        assert set(ids.values()) <= {1}, f"attempt {attempt}: duplicates after the kill"
    final = start_job(args, tmp_path / "final.log")  # restarted at once, as a scheduler would
    assert final.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    ids, _ = outcome(out)
    assert sorted(ids) == sorted(f"g{i}" for i in range(120)) and set(ids.values()) == {1}
    assert not (out / "_staging").exists()
