"""The errors a job stops with: one line that says what is wrong and how to fix it.

Every job-level failure is a `JobError`. Library code raises them (never `SystemExit`); `cli.run_job`
is the one place that turns any of them, found anywhere in an exception chain (Ray wraps an actor's
exception in its own task errors), into one `error: ...` line and exit status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class JobError(Exception):
    """A job cannot go on; str(error) is one line naming the problem and the fix."""


class ConfigError(JobError, ValueError):
    """A config key or value is wrong; the message names the field and what is allowed."""


class InputError(JobError, ValueError):
    """An input (QA rows, corpus, rationales, demonstrations) is missing or unusable."""


class OutputConflict(JobError):
    """The output directory holds results written with other settings."""


class ModelError(JobError, ValueError):
    """A model cannot be used: it does not load, or its tokenizer has no chat template."""


class ClusterError(JobError):
    """An Elasticsearch cluster cannot be used as configured."""


class ClusterUnavailable(ClusterError):
    """The Elasticsearch cluster stopped answering and the retries are spent (a rerun resumes)."""


class EngineUnavailable(JobError):
    """The generation engine itself is gone (its server stopped answering): not a problem of the rows,
    so none is rejected; the job stops, every row written so far is kept, and a rerun continues."""


class TrainingError(JobError):
    """The training job cannot go on (too few examples, a chat template that cannot mark targets)."""


def job_error_in(exc: BaseException) -> JobError | None:
    """The JobError behind `exc`: itself, a cause or context, or the error a Ray task or actor raised.

    Ray re-raises a remote exception as a `RayTaskError` whose class also derives from the original
    one and keeps the original in `.cause` (Ray Data passes a stage's own exception on instead of
    wrapping it, because `cli.init_ray` sets `DataContext.raise_original_map_exception`). All of
    those are links of the chain walked here; the original, not Ray's wrapper, is returned.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, JobError) and not isinstance(cause, JobError):
            return current
        todo += [cause, current.__cause__, current.__context__]
    return None


def one_line(error: JobError) -> str:
    """The error's message as the job prints it (Ray may append lines about its retries)."""
    return (str(error).splitlines() or [type(error).__name__])[0]
