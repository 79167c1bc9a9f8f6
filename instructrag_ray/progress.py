"""Driving a job's Ray Data pipeline to its end while its progress display (console.Progress) runs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from .console import Progress


def follow(stats, counters: tuple[str, ...], display: Progress, counts: Callable[[dict], tuple[int, int, str]],
           commit=None) -> dict:
    """Drive a job's pipeline to its end. Its last stage returns one row per batch with the `counters`,
    a `reasons` JSON of reject counts and the `staged` files, which `commit` (output.Committer) commits
    as they arrive; after each batch, `counts(run)` gives the display its (done, rejected, note) from the
    sums so far, and the display's own timer draws them. Returns the sums and `reject_reasons`."""
    run = dict.fromkeys(counters, 0)
    reasons: Counter = Counter()
    with display:
        for batch in stats.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                if commit is not None:
                    commit(json.loads(row["staged"]))
                for key in run:
                    run[key] += row[key]
                reasons.update(json.loads(row["reasons"]))
            display.update(*counts(run))
    run["reject_reasons"] = dict(sorted(reasons.items()))
    return run
