"""Job configuration: typed defaults in one place, an override file, and key=value overrides.

Precedence: dataclass defaults < `--config FILE` (YAML or JSON, overrides only) < `key=value`
arguments on the command line. Validation runs before any work and names the bad field and what
is allowed. Library functions take plain arguments; only the jobs see these objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tiny_model import TINY_MODEL


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field and what is allowed."""


def choice(default: str, *choices: str, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def opt(default: Any, doc: str = "", *, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "minimum": minimum})


# --- synthesis ------------------------------------------------------------------------------------


@dataclass
class RetrievalConfig:
    backend: str = choice("tantivy", "tantivy", doc="tantivy: the embedded BM25 index at index_path")
    index_path: str = opt("", "directory of the tantivy index (jobs/build_index.py builds it); must be readable on every node")
    top_k: int = opt(5, "documents retrieved per question and stored in ctxs", minimum=1)
    fields: str = opt("title,text", "fields searched with boosts, e.g. 'title^0.5,text'; per-field BM25 scores are added")
    batch_size: int = opt(64, "questions per retrieval batch", minimum=1)
    num_cpus: float = opt(0.5, "CPUs per retrieval actor", minimum=0)
    min_actors: int = opt(1, "retrieval actor pool: minimum size", minimum=1)
    max_actors: int = opt(1, "retrieval actor pool: maximum size (the pool autoscales between the two)", minimum=1)


@dataclass
class PromptConfig:
    num_docs: int = opt(5, "K: documents shown in the prompt (paper: 5; 10 for 2WikiMultiHopQA)", minimum=0)
    num_cpus: float = opt(0.25, "CPUs per prompt-rendering actor (tokenizer on CPU)", minimum=0)
    max_actors: int = opt(1, "prompt-rendering actor pool: maximum size", minimum=1)


@dataclass
class GenerationConfig:
    engine: str = choice(
        "transformers", "transformers", "template-baseline",
        doc="transformers: a causal LM on GPU or CPU; template-baseline: the paper's template-rationale ablation baseline (no model)",
    )
    model: str = opt(TINY_MODEL, f"a local Hugging Face model directory or hub name; '{TINY_MODEL}' builds the project's tiny local model")
    max_new_tokens: int = opt(512, "most tokens generated per rationale", minimum=1)
    max_model_len: int = opt(0, "context budget in tokens (prompt + max_new_tokens); 0 = the model's own limit", minimum=0)
    temperature: float = opt(0.0, "0 = greedy decoding (the paper); > 0 samples", minimum=0)
    top_p: float = opt(1.0, "nucleus sampling when temperature > 0", minimum=0)
    dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16", doc="auto: bfloat16 on GPU, float32 on CPU")
    batch_size: int = opt(32, "rows per batch sent to a generation actor", minimum=1)
    micro_batch_size: int = opt(8, "sequences per generate() call inside a batch", minimum=1)
    sort_by_length: bool = opt(True, "sort a batch's prompts by length before cutting micro-batches (less padding)")
    num_gpus: float = opt(0.0, "GPUs per generation actor (fractions allowed); 0 runs on CPU", minimum=0)
    num_cpus: float = opt(1.0, "CPUs per generation actor", minimum=0)
    min_actors: int = opt(1, "generation actor pool: minimum size", minimum=1)
    max_actors: int = opt(1, "generation actor pool: maximum size", minimum=1)
    seed: int = opt(0, "sampling seed (only used when temperature > 0)")


@dataclass
class SynthesizeConfig:
    input: str = opt("", "QA rows: .jsonl, .json (array), .parquet, a directory of them, or a Hugging Face dataset saved with save_to_disk")
    dataset: str = opt("", "dataset name for rows that carry none (it picks the prompt's dataset note); default: guessed from the file name (popqa, asqa, trivia, 2wiki, nq), else the file name")
    output: str = opt("", "output directory: rationales/, rejected/, manifest.json")
    limit: int = opt(0, "process at most this many input rows (0 = all)", minimum=0)
    overwrite: bool = opt(False, "delete an existing output written with other settings instead of refusing to resume")
    ray_address: str = opt("", "Ray cluster address; empty = RAY_ADDRESS or a new local Ray")
    progress_interval_s: float = opt(10.0, "seconds between progress lines", minimum=0)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input is required: pass --input PATH (a .jsonl/.json/.parquet file or directory)")
        if not self.output:
            raise ConfigError("output is required: pass --output DIR")
        if self.generation.max_actors < self.generation.min_actors:
            raise ConfigError("generation.max_actors must be >= generation.min_actors")
        if self.retrieval.max_actors < self.retrieval.min_actors:
            raise ConfigError("retrieval.max_actors must be >= retrieval.min_actors")
        if self.prompt.num_docs > self.retrieval.top_k:
            raise ConfigError(
                f"prompt.num_docs ({self.prompt.num_docs}) is larger than retrieval.top_k ({self.retrieval.top_k}); "
                "raise retrieval.top_k or lower prompt.num_docs"
            )

    def fingerprint(self) -> str:
        """Hash of every setting that shapes a rationale; batch sizes and actor counts are left out."""
        g, r = self.generation, self.retrieval
        shaping = {
            "prompt": {"num_docs": self.prompt.num_docs},
            "retrieval": {"backend": r.backend, "index_path": r.index_path, "top_k": r.top_k, "fields": r.fields},
            "generation": {
                "engine": g.engine, "model": g.model, "max_new_tokens": g.max_new_tokens,
                "max_model_len": g.max_model_len, "temperature": g.temperature, "top_p": g.top_p,
                "seed": g.seed if g.temperature > 0 else None,
            },
            "dataset": self.dataset,
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


# --- index building --------------------------------------------------------------------------------


@dataclass
class BuildIndexConfig:
    corpus: str = opt("", "passages: .jsonl/.parquet with id, title, text; DPR psgs_w100.tsv; FlashRAG {id, contents}; or a directory")
    backend: str = choice("tantivy", "tantivy", doc="tantivy: an embedded index directory at `index`")
    index: str = opt("", "tantivy: the index directory to create")
    overwrite: bool = opt(False, "replace an existing index")
    heap_mb: int = opt(256, "tantivy writer memory in MB", minimum=16)

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("corpus is required: pass --corpus PATH")
        if not self.index:
            raise ConfigError("index is required: pass --index DIR")


# --- evaluation ------------------------------------------------------------------------------------

# The methods jobs/evaluate.py compares (instructrag_ray/evaluate.py builds their prompts).
EVAL_METHODS = ("instructrag-ft", "instructrag-icl", "vanilla-rag", "icl-qa", "no-retrieval")
ICL_METHODS = ("instructrag-icl", "icl-qa")


@dataclass
class DemosConfig:
    path: str = opt("", "ICL demonstrations (instructrag-icl, icl-qa): a synthesis output directory or its rationales/, a rationale .parquet, or a JSON/JSONL file of {question, rationale[, answers]}")
    num: int = opt(2, "N: demonstrations per prompt (paper: 2)", minimum=1)
    seed: int = opt(0, "seed of the reproducible draw of demonstrations (consistent rationales only, test ids excluded)")
    pool: str = choice("same", "same", "any", doc="same: demonstrations from the test row's own dataset (rows without a dataset, as in a JSON file, serve every dataset); any: from every dataset in the file")


@dataclass
class MetricsConfig:
    resamples: int = opt(1000, "bootstrap resamples for the confidence intervals", minimum=10)
    confidence: float = opt(0.95, "confidence level of the intervals (between 0 and 1)", minimum=0)
    seed: int = opt(0, "bootstrap seed")


@dataclass
class EvaluateConfig:
    input: str = opt("", "test QA rows: .jsonl, .json, .parquet, a directory of them, or a Hugging Face dataset saved with save_to_disk; every row needs gold answers")
    dataset: str = opt("", "dataset name for rows that carry none; default: guessed from the file name, else the file name")
    output: str = opt("", "output directory: predictions/, rejected/, metrics.json, report.md, report.png, manifest.json")
    methods: str = opt(",".join(EVAL_METHODS), f"comma-separated methods to run (any of: {', '.join(EVAL_METHODS)})")
    ft_model: str = opt("", "the fine-tuned model directory (jobs/train.py's <output>/model) that instructrag-ft uses; every other method uses generation.model")
    limit: int = opt(0, "evaluate at most this many input rows (0 = all)", minimum=0)
    overwrite: bool = opt(False, "delete an existing output written with other settings instead of refusing to resume")
    ray_address: str = opt("", "Ray cluster address; empty = RAY_ADDRESS or a new local Ray")
    progress_interval_s: float = opt(10.0, "seconds between progress lines", minimum=0)
    demos: DemosConfig = field(default_factory=DemosConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def method_list(self) -> list[str]:
        """The chosen methods, in the order given, without repeats."""
        return list(dict.fromkeys(m.strip() for m in self.methods.split(",") if m.strip()))

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input is required: pass --input PATH (test QA rows with gold answers)")
        if not self.output:
            raise ConfigError("output is required: pass --output DIR")
        methods = self.method_list()
        if not methods:
            raise ConfigError(f"methods is empty; choose from: {', '.join(EVAL_METHODS)}")
        for m in methods:
            if m not in EVAL_METHODS:
                near = difflib.get_close_matches(m, EVAL_METHODS, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"config key 'methods' names unknown method {m!r}{hint}; allowed: {', '.join(EVAL_METHODS)}")
        if "instructrag-ft" in methods and not self.ft_model:
            raise ConfigError("methods includes instructrag-ft but ft_model is empty; pass ft_model=DIR (the fine-tuned "
                              "model, jobs/train.py's <output>/model) or leave instructrag-ft out of methods")
        if any(m in ICL_METHODS for m in methods) and not self.demos.path:
            raise ConfigError("methods includes instructrag-icl or icl-qa but demos.path is empty; pass demos.path= a "
                              "synthesis output directory (its rationales/) or a demos JSON file")
        if self.generation.engine != "transformers":
            raise ConfigError(f"config key 'generation.engine' is {self.generation.engine!r}; evaluation allows only "
                              "transformers (the template baseline reads the gold answers)")
        if not 0 < self.metrics.confidence < 1:
            raise ConfigError(f"config key 'metrics.confidence' is {self.metrics.confidence!r}; it must be between 0 and 1")
        if self.generation.max_actors < self.generation.min_actors:
            raise ConfigError("generation.max_actors must be >= generation.min_actors")
        if self.retrieval.max_actors < self.retrieval.min_actors:
            raise ConfigError("retrieval.max_actors must be >= retrieval.min_actors")
        if self.prompt.num_docs > self.retrieval.top_k:
            raise ConfigError(
                f"prompt.num_docs ({self.prompt.num_docs}) is larger than retrieval.top_k ({self.retrieval.top_k}); "
                "raise retrieval.top_k or lower prompt.num_docs"
            )


# --- loading -----------------------------------------------------------------------------------


def load_config(cls: type, config_file: str | None = None, overrides: list[str] | None = None):
    """Build a config: defaults, then the file's overrides, then `key=value` overrides; validate."""
    cfg = cls()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of keys to values")
        for key, value in _flatten(data):
            set_value(cfg, key, value, source=config_file)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. generation.max_new_tokens=64)")
        set_value(cfg, key.strip(), value, source="command line")
    _check_values(cfg, "")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def set_value(cfg: Any, key: str, value: Any, source: str = "") -> None:
    """Set a dotted key, converting the value to the field's type; unknown keys name the nearest match."""
    target, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields or (i < len(parts) - 1) != dataclasses.is_dataclass(getattr(target, part)):
            keys = all_keys(cfg)
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(keys)}"
            where = f" (from {source})" if source else ""
            raise ConfigError(f"unknown config key '{key}'{where}{hint}")
        if i < len(parts) - 1:
            target = getattr(target, part)
    f = fields[parts[-1]]
    setattr(target, f.name, _convert(key, value, typing.get_type_hints(type(target))[f.name]))


def _convert(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"config key '{key}' has unsupported type {kind}")


def _check_values(cfg: Any, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_values(value, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(choices)}")
        minimum = f.metadata.get("minimum")
        if minimum is not None and value < minimum:
            raise ConfigError(f"config key '{key}' is {value!r}; it must be >= {minimum}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every field: the README's config reference is generated from this."""
    rows = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                doc = f.metadata.get("doc", "")
                if f.metadata.get("choices"):
                    doc += f" (one of: {', '.join(f.metadata['choices'])})"
                rows.append((prefix + f.name, value, doc))

    walk(cls(), "")
    return rows


def markdown_reference(cls: type) -> str:
    """The config reference table in the README (`python -m instructrag_ray.config`)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe(cls):
        lines.append(f"| `{key}` | `{default!r}` | {doc} |")
    return "\n".join(lines)


# Every job's config, in README order (the README's reference tables are generated from these).
JOB_CONFIGS = {"jobs/synthesize.py": SynthesizeConfig, "jobs/build_index.py": BuildIndexConfig,
               "jobs/evaluate.py": EvaluateConfig}

if __name__ == "__main__":
    for job, job_cls in JOB_CONFIGS.items():
        print(f"\n### `{job}`\n")
        print(markdown_reference(job_cls))
