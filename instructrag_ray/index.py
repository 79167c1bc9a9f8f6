"""Index building: a passage corpus into the retrieval backend (`jobs/build_index.py`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import BuildIndexConfig, to_dict


def build_index(cfg: BuildIndexConfig) -> dict:
    """Build the embedded tantivy index; write rejected passages and a manifest beside it."""
    from .retrieve import build_tantivy_index, read_corpus

    started = time.time()
    index = Path(cfg.index)
    print(f"[build_index] indexing {cfg.corpus} into {index} (tantivy BM25)", flush=True)
    stats = build_tantivy_index(read_corpus(cfg.corpus), index, heap_mb=cfg.heap_mb, overwrite=cfg.overwrite)
    wall = time.time() - started
    rejected_path = index.parent / f"{index.name}.rejected.jsonl"
    with open(rejected_path, "w") as fh:
        for row in stats["rejected"]:
            fh.write(json.dumps(row) + "\n")
    manifest = {
        "job": "build_index", "backend": cfg.backend, "config": to_dict(cfg),
        "indexed": stats["indexed"], "rejected": len(stats["rejected"]),
        "wall_time_s": round(wall, 2), "docs_per_s": round(stats["indexed"] / wall, 1) if wall else None,
    }
    (index.parent / f"{index.name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[build_index] indexed {stats['indexed']} passages, rejected {len(stats['rejected'])} "
          f"({rejected_path}) in {wall:.1f}s", flush=True)
    return manifest
