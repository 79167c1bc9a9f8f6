"""Retrieval: BM25 passages for each question, from the embedded tantivy index or Elasticsearch.

    base           the Retriever interface (search, batch_search -> Hit), fields, the query's analysis
    corpus         passage corpora in every common layout, and what makes a passage unusable
    tantivy_index  the embedded backend: build and search a tantivy (Lucene BM25) index
    elastic/       the Elasticsearch backend: client, index, bulk load, msearch
    stage          the Ray Data stage `retrieve` and the driver's checks before it
    build          jobs/build_index.py: a corpus into either backend
"""
