"""`--dry-run`: every check a job runs before work, then what it would run; Ray is never started.

A job's run function takes `dry_run=True` (cli.run_job passes it for `--dry-run`), runs its checks
in the order a real run does (config, input, output resume state, model and chat template, index or
Elasticsearch cluster), and instead of starting Ray prints a `Plan` (rows to do, stages, resources)
and returns it as a dict. The input is parsed in this process, with the pipeline's own parser, so
the row counts are the ones the job would see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


from . import read
from .config import CPUS_PER_PROMPT_ACTOR, MAX_AUTO_PROMPT_ACTORS, PROMPTS_PER_ACTOR, GenerationConfig, PromptConfig, RetrievalConfig

PARSE_ROWS = 2000  # raw rows parsed at a time


def parsed_rows(input_path: str, dataset: str, columns: list[str]) -> list[dict]:
    """`columns` of every input row as the pipeline's parse stage makes it (read.parse_batch), in input
    order, parsed in this process."""
    out: list[dict] = []
    chunk: list[tuple] = []

    def flush() -> None:
        out.extend(read.parse_batch(read.raw_block(chunk), dataset).select(columns).to_pylist())
        chunk.clear()

    for record in read.iter_raw(input_path):
        chunk.append(record)
        if len(chunk) == PARSE_ROWS:
            flush()
    if chunk:
        flush()
    return out


def cpus(amount: float) -> str:
    return f"{amount:g} CPU"


def pool(min_actors: int, max_actors: int, per_actor: str) -> str:
    size = f"{min_actors}" if min_actors == max_actors else f"{min_actors}-{max_actors}"
    return f"{size} actor{'s' if max_actors != 1 else ''} x {per_actor}"


def prompt_pool(p: PromptConfig, address: str, prompts: int) -> str:
    """The prompt actor pool a run would start: its size is decided on the cluster when it is automatic."""
    per_actor = cpus(p.num_cpus)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if p.max_actors or not address:
        return pool(*p.pool(os.cpu_count() or 1, prompts), per_actor) + ("" if p.max_actors else " (auto)")
    return (f"auto: one actor per {PROMPTS_PER_ACTOR} prompts, at most one per {CPUS_PER_PROMPT_ACTOR} cluster CPUs "
            f"and {MAX_AUTO_PROMPT_ACTORS}, x {per_actor}")


def generation_stage(g: GenerationConfig, model: str) -> str:
    """One line: the engine, the model and the actors that generate with it."""
    if g.engine == "vllm":
        gpus = g.tensor_parallel_size * g.pipeline_parallel_size
        return f"vllm, {model}: {pool(g.min_actors, g.max_actors, f'{gpus} GPU')} (ray.data.llm), batches of {g.batch_size}"
    per = cpus(g.num_cpus) + (f" + {g.num_gpus:g} GPU" if g.num_gpus and g.engine == "transformers" else "")
    per += f" + {g.resources}" if g.resources else ""
    where = f" at {g.base_url}" if g.engine == "openai" else ""
    return f"{g.engine}, {model}{where}: {pool(g.min_actors, g.max_actors, per)}, batches of {g.batch_size}"


def retrieval_stage(r: RetrievalConfig, rows: int) -> str:
    what = f"tantivy index {r.index_path}" if r.backend == "tantivy" else f"Elasticsearch {r.es_url} index {r.es_index}"
    per = cpus(r.num_cpus) + (f" + {r.resources}" if r.resources else "")
    return f"{what}, top {r.top_k}, for {rows} rows: {pool(r.min_actors, r.max_actors, per)}"


def ray_target(address: str, cpus_needed: float | None = None) -> str:
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        return f"the Ray cluster at {address}"
    local = os.cpu_count() or 1
    if cpus_needed is not None:
        local = max(local, -(-cpus_needed // 1))
    return f"a new local Ray ({local:g} logical CPUs)"


@dataclass
class Plan:
    """What a job would run: (name, text) lines, printed in order."""

    job: str
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, text: str) -> Plan:
        self.lines.append((name, text))
        return self

    def show(self) -> dict:
        print(f"[{self.job}] dry run: every check passed; nothing was started", flush=True)
        for name, text in self.lines:
            print(f"  {name:<18}  {text}")
        print(f"  {'':<18}  (run the same command without --dry-run to start it)", flush=True)
        return {"dry_run": True, "job": self.job, **{name: text for name, text in self.lines}}
