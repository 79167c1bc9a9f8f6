"""Test fixture: the project's built-in tiny chat model: a 1.3M-parameter Llama built locally, offline.

No model can be downloaded here (no hub access), yet the pipeline, the tests and the demo need a
real `transformers` causal LM with a real tokenizer and a Llama-3-style chat template. This module
builds one from nothing in a few seconds: a byte-level BPE tokenizer trained on a fixed English text
generated below, and a randomly initialised `LlamaForCausalLM`, saved in Hugging Face format so
`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(path)` load it like any other checkpoint.
The weights are random: the model exercises the code paths, it does not answer questions.

The config value `"tiny"` (`config.TINY_MODEL`) names it; `models.resolve_model` turns that into the
local path of this build.

The build is deterministic (same tokenizer.json, same weights, bit for bit) because on a cluster
every worker builds its own copy and they must agree, and it is safe to run from several processes
at once (Ray actors on one node share the cache directory).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
import zlib
from pathlib import Path

# Bump when anything below changes what gets built, so old caches are not reused.
_VERSION_DIR = "tiny-llama-v1"
_CACHE_ENV = "INSTRUCTRAG_CACHE"
_DEFAULT_CACHE = Path("~/.cache/instructrag-ray")
# Written last inside the temp dir, so a target dir without it was not built by us.
_COMPLETE_MARKER = "BUILD_COMPLETE"

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

_VOCAB_SIZE = 4096
_SEED = 20250101

# Llama-3-Instruct's layout. The `{% generation %}` markers are transformers' extension that lets
# `apply_chat_template(..., return_assistant_tokens_mask=True)` mark the assistant tokens, which is
# what SFT needs ("loss only on the rationale and its end-of-turn token"); they render as nothing.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Llama-3's pre-tokenizer split (words, 1-3 digit numbers, punctuation runs, whitespace runs).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tiny_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the tiny model lives: under `cache_dir`, else $INSTRUCTRAG_CACHE, else
    ~/.cache/instructrag-ray, in a subdirectory named after the build recipe's version."""
    if cache_dir is None:
        cache_dir = os.environ.get(_CACHE_ENV) or _DEFAULT_CACHE
    return Path(cache_dir).expanduser().resolve() / _VERSION_DIR


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the tiny model's directory, building it first if it is not there yet.

    Several processes may call this at once: each builds into its own temp dir beside the target
    and renames it into place; rename is atomic, so the first one wins and the others use its copy
    (the builds are identical anyway).
    """
    target = tiny_model_path(cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target so the rename stays on one filesystem (and so stays atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"{_VERSION_DIR}\n")
        try:
            os.rename(tmp, target)
        except OSError as e:
            # Lost the race: a non-empty target already exists (EEXIST or ENOTEMPTY by platform).
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / _COMPLETE_MARKER).is_file():
        raise RuntimeError(
            f"{target} exists but is not a complete tiny-model build; delete it and retry"
        )
    return target


def _build(out_dir: Path) -> None:
    """Write tokenizer, model weights, config and generation config into `out_dir`."""
    # Imported here: importing the package must stay fast, and only builders need these.
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    # transformers 5 records its internal class name "TokenizersBackend", which transformers 4
    # (still used by some serving stacks) cannot resolve; "PreTrainedTokenizerFast", what Llama-3
    # ships, loads the same tokenizer.json under both.
    config_file = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")

    bos_id, eos_id, eot_id, pad_id = (
        tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT, PAD)
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        # Like Llama-3-Instruct: a chat turn ends at <|eot_id|>, raw text at <|end_of_text|>.
        eos_token_id=[eot_id, eos_id],
        pad_token_id=pad_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    _init_weights_deterministically(model)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=[eot_id, eos_id],
        pad_token_id=pad_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)


def _init_weights_deterministically(model) -> None:
    """Overwrite every weight with values that are the same on every machine.

    torch's float normal_ on CPU takes a vectorised path chosen by the CPU's instruction set, so
    seeded `normal_` can differ in the last bits between machines. Integers from a seeded generator
    do not, and the scaling below is exact or a single IEEE rounding, so the weights are
    bit-identical everywhere. Uniform with std 0.02 stands in for Llama's normal(0, 0.02).
    """
    import torch

    half_width = 0.02 * 3**0.5
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied embeddings are listed once
            if name.endswith("norm.weight"):
                param.fill_(1.0)  # RMSNorm scales start at one, as in Llama
                continue
            # One seed per parameter name, so the values do not depend on iteration order.
            gen = torch.Generator().manual_seed(_SEED ^ zlib.crc32(name.encode()))
            ints = torch.randint(0, 2**24, param.shape, generator=gen, dtype=torch.int64)
            values = (ints.to(torch.float64) / 2**23 - 1.0) * half_width
            param.copy_(values.to(param.dtype))


def _build_tokenizer():
    """Train a byte-level BPE on the built-in text and wrap it as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Encoding with special tokens prepends <|begin_of_text|> (Llama-3 behaviour); the chat template
    # writes it itself, so rendered chats are tokenized with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


_FIRST_NAMES = (
    "Alma Bruno Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kaia Lorenzo Mira Nils Olga Pavel "
    "Quinn Rosa Stefan Talia Umar Vera Walter Xenia Yusuf Zora Amelia Benedict Cecilia Dorian"
).split()
_SURNAMES = (
    "Ashford Brennan Castillo Dalgaard Eriksen Fairbanks Galloway Holm Iverson Jaramillo Kowalski "
    "Lindqvist Moreau Novak Okafor Petrov Quintero Rasmussen Sato Thornbury Ulrich Varga Whitcombe"
).split()
_TOWNS = (
    "Ashbury Brightwater Coldharbor Dunmore Eastfield Fernvale Glenrock Harrowgate Ironbridge "
    "Juniper Kingsmere Larkspur Millbrook Northhaven Oakridge Pinecrest Redcliff Stonebury "
    "Thornfield Westmarch"
).split()
_COUNTRIES = (
    "Norway France Brazil Canada Japan Kenya Poland Chile Italy Egypt India Spain Sweden Mexico "
    "Ireland Portugal"
).split()
_OCCUPATIONS = (
    "painter;composer;politician;novelist;architect;physicist;footballer;film director;botanist;"
    "journalist;sculptor;historian;singer;chemist;engineer;poet;actor;mathematician;judge;explorer"
).split(";")
_FIELDS = (
    "music;literature;physics;architecture;botany;history;film;chemistry;mathematics;law;"
    "painting;journalism;astronomy;medicine;economics"
).split(";")
_WORKS = (
    "The Silent River;A Winter in the North;Songs of the Harbor;The Glass Garden;Letters from Home;"
    "The Long Road;Evening Light;The Iron Tower;Seven Bridges;The Last Orchard;Northern Lights;"
    "The Paper Crown"
).split(";")
_RELATIONS = (
    ("place of birth", "was born in"),
    ("occupation", "worked as a"),
    ("country", "is a town in"),
    ("genre", "is known for"),
    ("father", "is the son of"),
    ("mother", "is the daughter of"),
    ("producer", "was produced by"),
    ("author", "was written by"),
)

# The instruction wording of InstructRAG's prompts (PAPER.md), so it tokenizes into few tokens.
_PROMPT_TEXT = (
    "Read the following documents relevant to the given question: ",
    "Please identify documents that are useful to answer the given question: ",
    ", and explain how the contents lead to the answer: ",
    "If none of the documents is aligned with the answer, in that case, you have to explain the "
    "answer only based on your own knowledge, without referring to the provided information.",
    "Note that the question may be compositional and require intermediate analysis to deduce the "
    "final answer. Make sure your response is grounded and provides clear reasoning details "
    "followed by a concise conclusion.",
    "Note that the question mainly asks about the object entity that holds a certain relationship "
    "with the given subject entity. There may be multiple correct answers. Make sure your response "
    "includes all correct answers and provides clear reasoning details followed by a concise "
    "conclusion.",
    "Note that the question may be ambiguous and have multiple correct answers. Make sure your "
    "response includes all correct answers and provides clear reasoning details followed by a "
    "concise conclusion.",
    "Based on your knowledge and the provided information, answer the question:\n",
    "Your task is to analyze the provided documents and answer the given question. Please generate "
    "a brief explanation of how the contents of these documents lead to your answer. If the "
    "provided information is not helpful to answer the question, you only need to respond based "
    "on your own knowledge, without referring to the documents.",
    "Below are some examples of how to answer the question:\n\n",
    "###\n\nNow it is your turn to analyze the following documents and answer the given question.",
)


_SYLLABLES = (
    "al an ar bel bor cal dan del dor el en er fal fen gar gol hal har is ka kel kor lan len lor "
    "mar mel mor nal nor or os pel ran ren ril sal sen tor tal ul un val ven vik wyn zan"
).split()
_NOUNS = (
    "river;mountain;harbor;library;cathedral;university;railway;market;festival;museum;bridge;"
    "theatre;orchestra;newspaper;hospital;castle;forest;valley;island;factory;vineyard;observatory"
).split(";")
_ADJECTIVES = (
    "old;famous;small;large;northern;southern;historic;modern;quiet;busy;ancient;celebrated;"
    "coastal;royal;national;popular"
).split(";")


def _invented_name(rng: random.Random) -> str:
    """A made-up proper name, so the vocabulary learns many rare words and name pieces."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _training_text() -> list[str]:
    """The fixed English text the tokenizer learns from: invented biographies and places, QA, and
    the prompts' wording.

    `random.Random(seed)` gives the same sequence on every platform and Python 3 version, so the
    text, and with it the trained vocabulary, is the same everywhere.
    """
    rng = random.Random(_SEED)
    texts = list(_PROMPT_TEXT) * 20
    texts += ["system user assistant"] * 20  # chat roles, so they are single tokens
    for i in range(1500):
        first = rng.choice(_FIRST_NAMES)
        last = rng.choice(_SURNAMES) if rng.random() < 0.5 else _invented_name(rng)
        person = f"{first} {last}"
        town = rng.choice(_TOWNS) if rng.random() < 0.5 else _invented_name(rng)
        country = rng.choice(_COUNTRIES)
        job, field, work = rng.choice(_OCCUPATIONS), rng.choice(_FIELDS), rng.choice(_WORKS)
        born = rng.randint(1820, 1995)
        died = born + rng.randint(30, 90)
        article = "an" if job[0] in "aeiou" else "a"
        bio = (
            f"{person} ({born} - {died}) was {article} {job} from {town}, {country}. "
            f"{first} studied {field} in {rng.choice(_TOWNS)} and published \"{work}\" in "
            f"{born + rng.randint(20, 29)}. In {born + rng.randint(30, 45)}, {last} moved to "
            f"{rng.choice(_COUNTRIES)}, where {first} won the {_invented_name(rng)} Prize for "
            f"{field}."
        )
        place = (
            f"{town} is a {rng.choice(_ADJECTIVES)} town in {country}, known for its "
            f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} and its {rng.choice(_NOUNS)}. "
            f"The {rng.choice(_NOUNS)} of {town} was built in {rng.randint(1100, 1990)} by "
            f"{rng.choice(_FIRST_NAMES)} {_invented_name(rng)}."
        )
        relation, phrase = rng.choice(_RELATIONS)
        question = rng.choice(
            (
                f"What is {person}'s occupation?",
                f"Where was {person} born?",
                f"In what year was {person} born?",
                f"Who wrote {work}?",
                f"What is the {relation} of {person}?",
                f"Which country is {town} in?",
                f"Who built the {rng.choice(_NOUNS)} of {town}?",
            )
        )
        docs = "\n\n".join(
            f"Document {k} (Title: {rng.choice(_FIRST_NAMES)} {_invented_name(rng)}) "
            + rng.choice((bio, place))
            for k in range(1, rng.randint(2, 6))
        )
        rationale = (
            f"Document 1 states that {person} {phrase} {rng.choice((town, job, field))}, which "
            f"directly answers the question. The other documents do not mention {last}, so they "
            f"are not useful. Therefore, the answer is {rng.choice((town, job, str(born)))}."
        )
        qa = f"Question: {question}\n\nAnswer: {rationale}"
        texts += [bio, place, question, docs, rationale, qa, str(i)]
    return texts
