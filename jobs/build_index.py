"""Build the passage index that synthesis and evaluation retrieve from.

Embedded BM25 (tantivy), local or on the node that will run retrieval:
    python jobs/build_index.py --corpus passages.jsonl --index out/index
Elasticsearch (a Ray Data job with parallel bulk writers; credentials from ES_API_KEY, or ES_USERNAME
and ES_PASSWORD):
    python jobs/build_index.py --corpus psgs_w100.tsv --output out/es-build backend=elasticsearch \
        es_url=https://es.example:9200 es_index=wiki es_ca_certs=/etc/es/http_ca.crt es_writers=8
On a Ray cluster (the corpus, and for tantivy the index directory, must be on storage the nodes read):
    ray job submit --working-dir . -- python jobs/build_index.py --corpus /shared/psgs_w100.tsv \
        --index /shared/index

Passages that cannot be indexed (no text, a repeated id, refused by Elasticsearch) are listed with a
reason in <output>/rejected/*.jsonl, and <output>/manifest.json records the counts (<output> defaults
to <index>.build for tantivy). An Elasticsearch rerun loads into the same index again: documents are
keyed by passage id, so it overwrites and never duplicates. `--help` lists every key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray.cli import parse_job_args  # noqa: E402
from instructrag_ray.config import BuildIndexConfig  # noqa: E402


def main(argv=None) -> None:
    from instructrag_ray.elastic import ClusterError
    from instructrag_ray.index import build_index

    cfg = parse_job_args(BuildIndexConfig, __doc__, {"corpus": "corpus", "index": "index", "output": "output"}, argv)
    try:
        build_index(cfg)
    except (FileExistsError, FileNotFoundError, ValueError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
