"""Shared fixtures: one local Ray per test session with fixed resources, the tiny model, a synthetic world."""

import os

import pytest

# Ray 2.60: avoid token auth on local clusters (see DESIGN.md); keep Ray quiet and on this machine.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from instructrag_ray.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 4 logical CPUs so actor pools and tasks fit on 2 cores."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from instructrag_ray.synthetic import write_world

    out = tmp_path_factory.mktemp("world")
    return write_world(out, seed=7, n_people=60, n_questions=60)


@pytest.fixture(scope="session")
def index(world, tmp_path_factory):
    from instructrag_ray.retrieve import build_tantivy_index, read_corpus

    path = tmp_path_factory.mktemp("index") / "bm25"
    build_tantivy_index(read_corpus(world["corpus"]), path)
    return str(path)
