"""Elasticsearch: connect and check a cluster, define and bulk-load the passage index, search it in batches.

Only this package talks to the `elasticsearch` client (the optional extra `es`:
`pip install 'instructrag-ray[es]'`), and it imports the client inside functions, so importing the
project (or running the embedded tantivy backend) never loads it. Modules: `client` (connection
settings, checks, retries), `index` (the index definition, create/inspect/finish), `bulk` (the bulk
writers of jobs/build_index.py), `search` (the `Retriever` over msearch).

- `cluster(...)` builds the connection settings (`Cluster`); credentials come from the arguments, else
  from the environment (ES_API_KEY, or ES_USERNAME and ES_PASSWORD). An API key wins over basic auth.
  Secrets never appear in a repr, a message, a log line or a manifest written by this project.
- `connect` makes the checks that must pass before any work starts and turns each failure into one
  line that says what to fix (`ClusterError`): unreachable, TLS not verified, credentials refused, a
  server that does not pair with the installed client. `inspect_index` adds: the index exists, it has
  the fields the retriever needs, and no build is half done.
- `index_definition`, `prepare_index`, `BulkWriter`, `finish_index`: the bulk load run by
  `jobs/build_index.py backend=elasticsearch` (the Ray Data chain is in retrieval/build.py).
- `ElasticsearchRetriever`: the `Retriever` interface of retrieval/base.py over one `msearch` per batch.

Every request is retried with exponential backoff (and jitter) on connection errors, timeouts, 429
and 502/503/504; when the retries are spent, `ClusterUnavailable` stops the job with one line (a
rerun resumes). Other errors are not retried.

Supported client/server pairs (elasticsearch-py's own compatibility matrix):

    Elasticsearch 9.x   <-  elasticsearch-py 9.x, or 8.x (8.15 or later)
    Elasticsearch 8.x   <-  elasticsearch-py 8.x only (8.15 or later); Elasticsearch 8 refuses the
                            9.x client's requests (media_type_header_exception)

Ranking parity with the embedded backend: the index defines the analyzer `ANALYZER` (tantivy's
"default": split on every character that is neither alphabetic nor numeric, drop long tokens,
lower-case) and BM25 with k1=1.2, b=0.75, and the retriever sends retrieve.py's query, built from
`retrieve.analyze` as `term` clauses. Residual differences, all outside plain ASCII text:
- tantivy drops tokens of 40 or more UTF-8 bytes, Elasticsearch's `length` filter counts UTF-16
  characters (so it keeps some long non-ASCII tokens; they never match a query, but they count in the
  field length);
- lower-casing is per character in both, but Rust and Java differ on a few characters whose lower
  case is two characters (e.g. U+0130);
- Rust and Java may implement different Unicode versions of "alphabetic" and "numeric".
An index whose fields use another analyzer (`es_analyzer=standard`, or an index built by other tools)
is searched with one `match` query per field instead (same structure, the index analyses the
question); its rankings are not comparable with tantivy's.
"""

