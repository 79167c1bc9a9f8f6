"""generation.engine=llamacpp: the real synthesis job writes rationales with smollm2-135m's GGUF file run by
llama.cpp in-process (xllamacpp), and a rerun resumes. The prompt stage renders with the converted
Hugging Face directory's chat template; llama.cpp must read those special tokens as special tokens."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from instructrag_ray.config import SMOLLM2_MODEL
from instructrag_ray.errors import ModelError

pytestmark = pytest.mark.integration
pytest.importorskip("xllamacpp")


@pytest.fixture(scope="module")
def engine():
    from instructrag_ray.generation.llamacpp_engine import LlamaCppEngine
    from instructrag_ray.models import load_chat_tokenizer

    load_chat_tokenizer("generation.model", SMOLLM2_MODEL)  # the driver's step: fetch + convert once
    return LlamaCppEngine(model=SMOLLM2_MODEL, max_new_tokens=24, parallel=2, threads=1)


def test_prompt_tokens_match_the_hf_tokenizer_and_stops_at_end_of_turn(engine):
    from transformers import AutoTokenizer

    from instructrag_ray.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2_MODEL))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with a number only."}], tokenize=False,
                                           add_generation_prompt=True)
    response = engine.server.handle_completions(engine.request(prompt))
    # no second BOS, `<|im_start|>` etc. parsed as single special tokens
    assert response["usage"]["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert response["choices"][0]["finish_reason"] == "stop"  # llama.cpp's end-of-generation: <|im_end|>
    [done] = engine.generate([{"prompt": prompt}])
    assert done.finish_reason == "stop" and done.text and "<|im_" not in done.text and done.completion_tokens > 0


def test_a_failing_request_rejects_only_its_row(engine):
    too_long = "<|im_start|>user\n" + "word " * 9000 + "<|im_end|>\n<|im_start|>assistant\n"
    bad, good = engine.generate([{"prompt": too_long}, {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"}])
    assert bad.reason == "request_rejected" and "context" in bad.detail
    assert good.text


def test_a_bad_gguf_file_fails_in_one_line(tmp_path):
    from instructrag_ray.models import check_gguf

    with pytest.raises(ModelError, match="no GGUF file"):
        check_gguf("generation.model", str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a GGUF file"):
        check_gguf("generation.model", str(fake))


def test_synthesis_with_llamacpp_writes_real_rationales_and_resumes(ray_local, job_main, world, index, tmp_path):
    out = tmp_path / "out"
    argv = ["--input", str(world["qa"]), "--output", str(out), f"retrieval.index_path={index}", "limit=4",
            "generation.engine=llamacpp", f"generation.model={SMOLLM2_MODEL}", "generation.repetition_penalty=1.2",
            "generation.max_new_tokens=32", "generation.batch_size=4", "generation.micro_batch_size=4",
            "progress_interval_s=0"]
    job_main("synthesize")(argv)
    rows = pq.read_table(out / "rationales").to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row["generator"] == f"llamacpp:{SMOLLM2_MODEL}"
        assert "<|im_" not in row["rationale"] and "<|endoftext|>" not in row["rationale"]
        words = re.findall(r"[A-Za-z]+", row["rationale"])
        assert len(words) >= 5, row["rationale"]  # real text, not noise
        assert 0 < row["completion_tokens"] <= 32 and row["finish_reason"] in ("stop", "length")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["generation"]["engine"] == "llamacpp" and manifest["this_run"]["written"] == 4
    job_main("synthesize")(argv)  # the same command again: everything is there
    assert json.loads((out / "manifest.json").read_text())["this_run"]["written"] == 0
