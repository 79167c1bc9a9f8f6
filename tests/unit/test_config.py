import pytest

from instructrag_ray.config import ConfigError, SynthesizeConfig, describe, load_config

BASE = ["input=in.jsonl", "output=out"]


def test_defaults_need_only_input_and_output():
    cfg = load_config(SynthesizeConfig, None, BASE)
    assert cfg.generation.model == "tiny" and cfg.retrieval.top_k == 5 and cfg.prompt.num_docs == 5
    assert cfg.generation.temperature == 0.0


def test_file_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("generation:\n  max_new_tokens: 64\n  batch_size: 4\nlimit: 10\n")
    cfg = load_config(SynthesizeConfig, str(f), BASE + ["generation.batch_size=2"])
    assert cfg.generation.max_new_tokens == 64 and cfg.generation.batch_size == 2 and cfg.limit == 10


@pytest.mark.parametrize("override,message", [
    ("generation.modle=x", "did you mean 'generation.model'"),
    ("generation.max_new_tokens=lots", "must be int"),
    ("generation.engine=vllm2", "allowed: transformers, template-baseline"),
    ("retrieval.top_k=0", "must be >= 1"),
    ("overwrite=maybe", "must be bool"),
    ("generation=3", "generation is a section"),
    ("novalue", "is not key=value"),
    ("generation.resources=gpu_worker:zero", "name:amount"),
])
def test_bad_keys_and_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SynthesizeConfig, None, BASE + [override])


def test_bad_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("retrieval:\n  topk: 3\n")
    with pytest.raises(ConfigError, match=r"retrieval.topk.*c.yaml.*retrieval.top_k"):
        load_config(SynthesizeConfig, str(f), BASE)


def test_missing_input_and_cross_field_checks():
    with pytest.raises(ConfigError, match="--input"):
        load_config(SynthesizeConfig, None, ["output=o"])
    with pytest.raises(ConfigError, match="prompt.num_docs"):
        load_config(SynthesizeConfig, None, BASE + ["prompt.num_docs=10"])


def test_fingerprint_tracks_shaping_settings_only():
    a = load_config(SynthesizeConfig, None, BASE)
    assert a.fingerprint() == load_config(SynthesizeConfig, None, BASE + ["generation.batch_size=3"]).fingerprint()
    assert a.fingerprint() != load_config(SynthesizeConfig, None, BASE + ["generation.max_new_tokens=7"]).fingerprint()
    assert a.fingerprint() != load_config(SynthesizeConfig, None, BASE + ["generation.model=/m"]).fingerprint()


def test_describe_lists_every_key():
    keys = [k for k, _, _ in describe(SynthesizeConfig)]
    assert "generation.model" in keys and "retrieval.index_path" in keys and len(keys) == len(set(keys))


def test_parse_resources():
    from instructrag_ray.config import parse_resources

    assert parse_resources("") == {}
    assert parse_resources("gpu_worker:1, disk:0.5,x") == {"gpu_worker": 1.0, "disk": 0.5, "x": 1.0}
