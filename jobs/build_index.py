r"""Build the passage index that synthesis and evaluation retrieve from.

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

# `python jobs/x.py` puts jobs/ on sys.path, not the repo root that holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instructrag_ray.cli import job_main  # noqa: E402


def main(argv=None):
    return job_main("build_index", argv, __doc__)


if __name__ == "__main__":
    main()
