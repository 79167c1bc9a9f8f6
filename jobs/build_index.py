"""Build the passage index that synthesis and evaluation retrieve from.

Embedded BM25 (tantivy), local or on the node that will run retrieval:
    python jobs/build_index.py --corpus passages.jsonl --index out/index
On a Ray cluster (the index directory must then be on storage every retrieval node reads):
    ray job submit --working-dir . -- python jobs/build_index.py --corpus /shared/psgs_w100.tsv \
        --index /shared/index

Passages that cannot be indexed (no text, a repeated id) are listed in <index>.rejected.jsonl with a
reason; a manifest <index>.manifest.json records the counts. `--help` lists every key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray.cli import parse_job_args  # noqa: E402
from instructrag_ray.config import BuildIndexConfig  # noqa: E402


def main(argv=None) -> None:
    from instructrag_ray.index import build_index

    cfg = parse_job_args(BuildIndexConfig, __doc__, {"corpus": "corpus", "index": "index"}, argv)
    try:
        build_index(cfg)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
