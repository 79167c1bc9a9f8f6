"""Shared fixtures: one local Ray per test session with fixed resources, the tiny model, a synthetic world."""

import os

import pytest

# Ray 2.60: avoid token auth on local clusters (see DESIGN.md); keep Ray quiet and on this machine.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 API the tests use: a local moto server (the `s3` fixture starts it). The endpoint and dummy keys
# are set before any Ray starts, so Ray's workers inherit them as they would a cluster's environment, and
# no test can reach a real cloud account with a developer's own credentials.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from instructrag_ray.testing.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 4 logical CPUs so actor pools and tasks fit on 2 cores."""
    import ray

    if not ray.is_initialized():
        # address="local": a new Ray of our own even when `ray start` left one running on this machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from instructrag_ray.testing.synthetic import write_world

    out = tmp_path_factory.mktemp("world")
    return write_world(out, seed=7, n_people=60, n_questions=60)


@pytest.fixture(scope="session")
def index(world, tmp_path_factory):
    from instructrag_ray.retrieval.corpus import read_corpus
    from instructrag_ray.retrieval.tantivy_index import build_tantivy_index

    path = tmp_path_factory.mktemp("index") / "bm25"
    build_tantivy_index(read_corpus(world["corpus"]), path)
    return str(path)


@pytest.fixture(scope="session")
def job_main():
    """job_main('synthesize') is jobs/synthesize.py's main(argv): the command line as a user runs it."""
    import importlib.util
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[1] / "jobs"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"job_{name}", jobs / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    return load


@pytest.fixture(scope="session")
def s3():
    """A real S3 API over HTTP on 127.0.0.1 (moto in server mode) with a bucket `bkt`; yields a small helper."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="bkt")
    yield S3(client)
    server.stop()


class S3:
    """Test helper around the local S3 server's bucket `bkt`."""

    def __init__(self, client):
        self.client = client

    def put_file(self, key: str, path) -> str:
        self.client.upload_file(str(path), "bkt", key)
        return f"s3://bkt/{key}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket="bkt", Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
