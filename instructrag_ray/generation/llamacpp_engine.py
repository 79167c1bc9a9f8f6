"""The `llamacpp` engine: a GGUF model on CPU, llama.cpp's server run in-process by `xllamacpp` (no
HTTP, no separate server to start; pip install 'instructrag-ray[llamacpp]').

- The model: `generation.model` is a .gguf file, or a named model (`smollm2-135m`: the GGUF file kept
  beside its converted directory, `models.gguf_path`). The prompt stage still renders prompts with the
  Hugging Face tokenizer and chat template (`generation.tokenizer`, else the named model's directory).
- Prompts are sent as raw completion prompts, exactly as rendered: llama.cpp's server tokenizes them
  with special tokens parsed (`<|im_start|>` is one token) and adds a BOS only when the GGUF asks for
  one, as the Hugging Face tokenizer does (smollm2-135m: llama.cpp's prompt_tokens equals ours). It stops
  at the model's end-of-generation tokens from the GGUF metadata (`<|im_end|>`), which it leaves out
  of the text.
- Concurrency: `micro_batch_size` requests in flight from a thread pool onto as many llama.cpp slots
  (n_parallel, continuous batching); `num_cpus` threads; each slot holds the context of
  `max_model_len` (else the tokenizer model's own limit), the budget the prompt stage cut prompts to.
- Decoding: greedy (top_k 1) when temperature is 0, else temperature, top_p and `seed`, with
  llama.cpp's own top_k and min_p turned off (as the transformers engine samples). repetition_penalty
  is llama.cpp's `repeat_penalty` over the last 64 tokens, prompt tokens included (the transformers
  engine penalizes generated tokens only).
- A request llama.cpp answers with an error (a prompt over the slot's context, ...) or that raises
  rejects only its row (`request_rejected`, `generation_error`); a GGUF file that does not load fails
  the actor at start in one line (the driver checked the file before any Ray work: `check_gguf`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import InputError, ModelError
from ..models import gguf_path, resolve_max_model_len, resolve_model
from .base import Completion, Failure

REPEAT_LAST_N = 64
_STOP_REASONS = {"stop", "eos", "stop_sequence"}


@dataclass
class LlamaCppEngine:
    model: str  # a .gguf path or a named model
    tokenizer: str = ""  # the model whose tokenizer rendered the prompts (its context limit); '' = model
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    max_model_len: int = 0
    parallel: int = 8  # generation.micro_batch_size
    threads: int = 1  # generation.num_cpus

    def __post_init__(self):
        xlc = import_xllamacpp()
        self.path = gguf_path(self.model)
        self.context = resolve_max_model_len(resolve_model(self.tokenizer or self.model), self.max_model_len)
        params = server_params(xlc.CommonParams(), self.path, parallel=self.parallel, threads=self.threads,
                               context=self.context)
        try:
            self.server = xlc.Server(params)
        except Exception as e:  # noqa: BLE001 - llama.cpp says only "Failed to init server"
            raise ModelError(f"generation.model={self.model!r}: llama.cpp could not load {self.path} "
                             f"({type(e).__name__}: {e}); is it a GGUF model file llama.cpp supports?") from None
        self.label = f"llamacpp:{self.model}"
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="llamacpp-request")

    def generate(self, rows: Sequence[dict]) -> list[Completion | Failure]:
        return list(self._pool.map(self._complete, [row["prompt"] for row in rows]))

    def _complete(self, prompt: str) -> Completion | Failure:
        try:
            response = self.server.handle_completions(self.request(prompt))
        except Exception as e:  # noqa: BLE001 - only this row fails
            return Failure("generation_error", f"{type(e).__name__}: {e}"[:500])
        return parse_response(response)

    def request(self, prompt: str) -> dict:
        return request_body(prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_p=self.top_p, seed=self.seed, repetition_penalty=self.repetition_penalty)


def import_xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise InputError("generation.engine=llamacpp needs xllamacpp on the nodes that generate: "
                         "pip install 'instructrag-ray[llamacpp]'") from None
    return xllamacpp


def server_params(params, path: str, *, parallel: int, threads: int, context: int):
    """llama.cpp's server settings (`xllamacpp.CommonParams`): `parallel` slots of `context` tokens
    each, `threads` CPU threads, no HTTP listener, no warm-up run, its log off."""
    params.model.path = path
    params.n_parallel = parallel
    params.n_ctx = context * parallel  # llama.cpp splits n_ctx over the slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = 1
    params.warmup = False
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.verbosity = -1  # errors reach the rows' rejects, not the actor's log
    return params


def request_body(prompt: str, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 repetition_penalty: float) -> dict:
    """llama.cpp's /completion request for one rendered prompt."""
    body = {"prompt": prompt, "max_tokens": max_new_tokens, "cache_prompt": False}
    if temperature > 0:
        body.update(temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, seed=seed)
    else:
        body.update(temperature=0.0, top_k=1)
    if repetition_penalty != 1.0:
        body.update(repeat_penalty=repetition_penalty, repeat_last_n=REPEAT_LAST_N)
    else:
        body["repeat_penalty"] = 1.0
    return body


def parse_response(response) -> Completion | Failure:
    """A Completion from llama.cpp's OpenAI-style answer, or the row's Failure (an error answer)."""
    if not isinstance(response, dict):
        return Failure("bad_response", f"not a completion: {str(response)[:300]}")
    if "error" in response:
        error = response["error"]
        if isinstance(error, dict):
            error = f"{error.get('type', 'error')} ({error.get('code', '?')}): {error.get('message', '')}"
        return Failure("request_rejected", str(error)[:500])
    try:
        choice = response["choices"][0]
        text, finish = choice["text"], choice.get("finish_reason")
        tokens = int(response["usage"]["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        return Failure("bad_response", f"not a completion: {str(response)[:300]}")
    if finish == "length":
        return Completion(text.strip(), tokens, "length")
    if finish in _STOP_REASONS:
        return Completion(text.strip(), tokens, "stop")
    return Failure("bad_response", f"finish_reason {finish!r}")
