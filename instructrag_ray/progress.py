"""Driving a job's Ray Data pipeline to its end while reporting progress."""

from __future__ import annotations

import json
import time
from collections import Counter


def follow(stats, counters: tuple[str, ...], interval: float, progress, commit=None) -> dict:
    """Drive a job's pipeline to its end. Its last stage returns one row per batch with the `counters`,
    a `reasons` JSON of reject counts and the `staged` files, which `commit` (output.Committer) commits
    as they arrive; `progress(run, elapsed_s)` is called every `interval` seconds with the sums so far.
    Returns the sums and `reject_reasons`."""
    run = dict.fromkeys(counters, 0)
    reasons: Counter = Counter()
    start = last = time.time()
    for batch in stats.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if commit is not None:
                commit(json.loads(row["staged"]))
            for key in run:
                run[key] += row[key]
            reasons.update(json.loads(row["reasons"]))
        now = time.time()
        if now - last >= interval:
            last = now
            progress(run, now - start)
    run["reject_reasons"] = dict(sorted(reasons.items()))
    return run
