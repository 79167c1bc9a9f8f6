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


def test_prompt_pool_is_sized_from_the_work_and_the_cluster_unless_set():
    from instructrag_ray.config import PromptConfig

    auto = PromptConfig()
    assert auto.pool(2, 50_000) == (1, 1)       # 2 CPUs: one actor (its tokenizer uses both cores)
    assert auto.pool(64, 500) == (1, 1)         # little work: one actor (each takes seconds to start)
    assert auto.pool(64, 35_000) == (4, 4)      # one per 10k prompts
    assert auto.pool(1000, 10**9) == (8, 8)     # at most 8
    assert PromptConfig(max_actors=3).pool(2, 10) == (3, 3)
    assert PromptConfig(min_actors=1, max_actors=3).pool(2, 10) == (1, 3)
    with pytest.raises(ConfigError, match=r"prompt.max_actors \(2\) must be >= prompt.min_actors \(3\)"):
        load_config(SynthesizeConfig, None, BASE + ["prompt.min_actors=3", "prompt.max_actors=2"])


def test_blocks_are_large_but_spread_and_never_below_a_generation_batch():
    from instructrag_ray.synthesize import block_rows

    assert block_rows(10_000, 128) == 512   # capped: a block is also what is committed at once
    assert block_rows(3_000, 128) == 188    # 16 blocks to spread over the actor pools
    assert block_rows(30, 8) == 8           # small runs: one generation batch a block
