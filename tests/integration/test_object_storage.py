"""Every path on object storage: a real S3 API over HTTP (moto in server mode on 127.0.0.1, the `s3`
fixture), reached through the standard AWS environment variables as on a cluster. The corpus, index,
QA input, rationales, checkpoints, the exported model, demonstrations and evaluation outputs all live in
the bucket; nothing may land on local disk under a mangled name ('./s3:/...')."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from instructrag_ray.config import BuildIndexConfig, EvaluateConfig, SynthesizeConfig, TrainConfig, load_config
from instructrag_ray.evaluate import run_evaluation
from instructrag_ray.retrieval.build import build_index
from instructrag_ray.sft.job import run_training
from instructrag_ray.storage import StorageError, check_location, location
from instructrag_ray.synthesize import run_synthesis

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENDPOINT = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"}


def s3_rows(uri: str) -> list[dict]:
    return pq.read_table(uri).to_pylist()


@pytest.fixture(scope="module")
def pipeline_on_s3(ray_local, tiny_model, world, s3):
    """Index build, synthesis, training and evaluation, every path in the bucket."""
    corpus = s3.put_file("data/corpus.jsonl", world["corpus"])
    qa = s3.put_file("data/qa.jsonl", world["qa"])
    qa_test = s3.put_file("data/qa_test.jsonl", world["test"])
    built = build_index(load_config(BuildIndexConfig, None, [f"corpus={corpus}", "index=s3://bkt/index"]))
    synth = run_synthesis(load_config(SynthesizeConfig, None, [
        f"input={qa}", "output=s3://bkt/synth", "retrieval.index_path=s3://bkt/index", "limit=24",
        "generation.engine=template-baseline", "generation.batch_size=8", "prompt.num_docs=2", "retrieval.top_k=2",
        "progress_interval_s=0"]))
    trained = run_training(load_config(TrainConfig, None, [
        "input=s3://bkt/synth", "output=s3://bkt/sft", "optim.global_batch_size=4", "optim.micro_batch_size=2",
        "optim.learning_rate=1e-3", "optim.epochs=1", "checkpoint_every=1", "max_steps=3", "data.max_length=256",
        "deepspeed.zero_stage=2"]))
    evaluated = run_evaluation(load_config(EvaluateConfig, None, [
        f"input={qa_test}", "output=s3://bkt/eval", "retrieval.index_path=s3://bkt/index", "limit=4",
        "ft_model=s3://bkt/sft/model", "demos.path=s3://bkt/synth", "methods=instructrag-ft,instructrag-icl",
        "generation.max_new_tokens=4", "prompt.num_docs=2", "retrieval.top_k=2", "progress_interval_s=0",
        "demos.pool=any"]))
    return {"built": built, "synth": synth, "trained": trained, "evaluated": evaluated, "s3": s3}


def test_index_synthesis_training_and_evaluation_keep_every_path_on_s3(pipeline_on_s3):
    s3 = pipeline_on_s3["s3"]
    assert pipeline_on_s3["built"]["index_fingerprint"] and s3.keys("index/meta.json")
    assert pipeline_on_s3["synth"]["totals"]["rationales"] == 24
    # the index's content fingerprint shapes the job fingerprint (a rebuilt index is another kind of row)
    assert pipeline_on_s3["synth"]["config_fingerprint"] == json.loads(
        location("s3://bkt/synth/settings.json").read_text())["fingerprint"]
    assert s3.keys("synth/rationales/") and s3.keys("synth/rejected/") and s3.keys("synth/manifest.json")
    assert not s3.keys("synth/_staging/")  # every staged file was committed, the staging area is gone
    trained = pipeline_on_s3["trained"]
    assert trained["final_step"] == 3 and trained["final_loss"] is not None
    assert s3.keys("sft/model/config.json") and s3.keys("sft/model/model.safetensors")
    assert any("/checkpoints/" in k for k in s3.keys("sft/"))  # Ray Train wrote them to the bucket
    steps = [r["step"] for r in map(json.loads, location("s3://bkt/sft/metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3]
    ev = pipeline_on_s3["evaluated"]
    assert ev["predictions"] == {"instructrag-ft": 4, "instructrag-icl": 4}
    assert s3.keys("eval/report.png") and s3.keys("eval/metrics.json") and s3.keys("eval/predictions/")
    assert not [p for p in Path.cwd().iterdir() if p.name.startswith("s3:")]  # no URI became a local path
    assert not list(REPO.glob("s3:*"))


def test_the_parquet_reads_back_from_s3_with_every_common_reader(pipeline_on_s3):
    import datasets
    import pandas as pd
    import polars as pl

    uri = "s3://bkt/synth/rationales"
    expected = sorted(r["id"] for r in s3_rows(uri))
    assert len(expected) == 24
    assert sorted(pd.read_parquet(uri, storage_options=ENDPOINT)["id"]) == expected
    polars_options = {"aws_endpoint_url": ENDPOINT["endpoint_url"], "aws_access_key_id": "testing",
                      "aws_secret_access_key": "testing", "aws_region": "us-east-1", "aws_allow_http": "true"}
    assert sorted(pl.read_parquet(f"{uri}/*.parquet", storage_options=polars_options)["id"].to_list()) == expected
    ds = datasets.load_dataset("parquet", data_files=f"{uri}/*.parquet", split="train", storage_options=ENDPOINT)
    assert sorted(ds["id"]) == expected


def test_a_synthesis_killed_on_s3_resumes_exactly_once(tiny_model, world, s3, tmp_path):
    qa = s3.put_file("kill/qa.jsonl", world["qa"])
    s3.put_file("kill/corpus.jsonl", world["corpus"])
    build_index(load_config(BuildIndexConfig, None, ["corpus=s3://bkt/kill/corpus.jsonl", "index=s3://bkt/kill/index"]))
    args = [str(REPO / "jobs" / "synthesize.py"), "--input", qa, "--output", "s3://bkt/kill/out", "limit=40",
            "retrieval.index_path=s3://bkt/kill/index", "generation.batch_size=4", "generation.max_new_tokens=16",
            "progress_interval_s=1"]
    job = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=open(tmp_path / "a.log", "w"),
                           stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and not s3.keys("kill/out/rationales/"):
        time.sleep(0.3)
    assert job.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    first = len(s3_rows("s3://bkt/kill/out/rationales"))
    again = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    ids = Counter(r["id"] for r in s3_rows("s3://bkt/kill/out/rationales"))
    ids.update(r["id"] for r in s3_rows("s3://bkt/kill/out/rejected") if r["reason"] != "duplicate_id")
    expected = [json.loads(line)["id"] for line in world["qa"].read_text().splitlines()[:40]]
    assert sorted(ids) == sorted(expected) and set(ids.values()) == {1}  # nothing lost, nothing twice
    assert 0 < first < 40
    assert not s3.keys("kill/out/_staging/")


def test_storage_problems_are_one_line_at_start(s3, tiny_model, world, job_main, capsys, monkeypatch):
    with pytest.raises(StorageError, match=r"output=s3://no-such-bucket/out: the bucket 'no-such-bucket' does not exist"):
        check_location(location("s3://no-such-bucket/out"), "output", write=True)
    with pytest.raises(StorageError, match=r"input s3://bkt/nothing-here.jsonl does not exist; pass --input"):
        check_location(location("s3://bkt/nothing-here.jsonl"), "input", hint="pass --input with a QA file")
    with pytest.raises(StorageError, match=r"no installed filesystem serves foo://"):
        location("foo://bucket/x", "output")

    # the job as a user runs it: one line, exit status 2, before any work
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        job_main("synthesize")(["--input", str(world["qa"]), "--output", "s3://no-such-bucket/out",
                                "generation.engine=template-baseline"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "no-such-bucket" in err[0] and err[0].startswith("error: ")

    # an endpoint that does not answer
    with socket_closed() as dead:
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        with pytest.raises(StorageError, match="the store does not answer"):
            check_location(location("s3://bkt/out"), "output", write=True)


def test_refused_credentials_are_one_line(tmp_path):
    """A second S3 server that checks credentials (moto's IAM enforcement): the wrong keys are refused."""
    boto3 = pytest.importorskip("boto3")
    import requests
    from moto.server import ThreadedMotoServer

    from conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="locked")
        requests.post(f"{endpoint}/moto-api/reset-auth", data="0", headers={"Content-Type": "text/plain"}, timeout=10)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="wrong", secret_key="wrong", region="us-east-1",
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        from instructrag_ray.storage import Location

        with pytest.raises(StorageError, match="access denied"):
            check_location(Location(fs, "locked/out", "s3://locked/out"), "output", write=True)
    finally:
        server.stop()


class socket_closed:
    """An http://127.0.0.1:PORT URL where nothing listens."""

    def __enter__(self):
        from conftest import free_port

        return f"http://127.0.0.1:{free_port()}"

    def __exit__(self, *exc):
        return False
