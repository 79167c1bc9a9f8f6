"""The published Parquet contract: loads `schemas/*.json` into pyarrow schemas.

The JSON files are the single source of truth; this module only parses their type strings
(`string`, `int32`, `double`, `bool`, `list<T>`, `struct<name: T, ...>`) into Arrow types. An installed
wheel carries them as package data (`instructrag_ray/schema_files/`, mapped from `schemas/` in
pyproject.toml); a checkout, or a `ray job submit --working-dir .` upload of one, reads `schemas/`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

_PACKAGED = Path(__file__).resolve().parent / "schema_files"
SCHEMA_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "schemas"

_PRIMITIVES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "double": pa.float64(),
    "float": pa.float32(),
    "bool": pa.bool_(),
}


def _split_top_level(text: str) -> list[str]:
    """Split 'a: T, b: list<U>' on commas that are not inside <...>."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_type(text: str) -> pa.DataType:
    """Parse one type string from a schema file into an Arrow type."""
    text = text.strip()
    if text in _PRIMITIVES:
        return _PRIMITIVES[text]
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(parse_type(text[5:-1]))
    if text.startswith("struct<") and text.endswith(">"):
        fields = []
        for part in _split_top_level(text[7:-1]):
            name, _, sub = part.partition(":")
            fields.append(pa.field(name.strip(), parse_type(sub)))
        return pa.struct(fields)
    raise ValueError(f"unknown type {text!r} in a schema file; use one of {sorted(_PRIMITIVES)}, list<T>, struct<...>")


@lru_cache(maxsize=None)
def load(name: str) -> pa.Schema:
    """The Arrow schema of table `name` (qa, rationales, rejected, predictions), with its version in metadata."""
    spec = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    fields = [
        pa.field(c["name"], parse_type(c["type"]), nullable=c["nullable"], metadata={"doc": c["doc"]})
        for c in spec["columns"]
    ]
    meta = {"schema_name": spec["name"], "schema_version": str(spec["version"])}
    return pa.schema(fields, metadata=meta)


def columns(name: str) -> list[str]:
    return load(name).names


def field(name: str, column: str) -> pa.Field:
    return load(name).field(column)
