"""Shared fixtures: one local Ray per test session with fixed resources, the tiny model, a synthetic world."""

import os

import pytest

# Ray 2.60: avoid token auth on local clusters (see DESIGN.md); keep Ray quiet and on this machine.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
