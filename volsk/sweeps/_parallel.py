"""Tasks through ``joblib.Parallel`` under the caller's backend, results as they finish.

The backend is never chosen here: ``joblib.parallel_config`` set by the caller (loky, threading,
dask, ray) decides where tasks run. One :class:`Tasks` block keeps one set of workers for all
its calls (Ray's joblib backend starts new worker processes for every ``Parallel`` call
otherwise). Results come back as each task finishes where the backend can stream them; a
backend that cannot (Ray's) gets the tasks in rounds of one per worker, so a caller that
stores each result (a cache) still loses at most one round to an interruption.
"""

from __future__ import annotations

import itertools

import joblib
from joblib.parallel import get_active_backend

__all__ = ["Tasks"]


class Tasks:
    """``with Tasks(n_jobs) as tasks:`` then ``tasks.one(call)`` and ``tasks.unordered(calls)``,
    with ``joblib.delayed`` calls."""

    def __init__(self, n_jobs):
        self.n_jobs = n_jobs

    def __enter__(self):
        backend, _ = get_active_backend()
        self.streams = bool(getattr(backend, "supports_return_generator", False))
        mode = "generator_unordered" if self.streams else "list"
        self.parallel = joblib.Parallel(n_jobs=self.n_jobs, return_as=mode)
        self.parallel.__enter__()
        return self

    def __exit__(self, *exc):
        return self.parallel.__exit__(*exc)

    def one(self, call):
        """The result of one ``joblib.delayed`` call, run on a worker."""
        return list(self.parallel([call]))[0]

    def unordered(self, calls):
        """Yield the results of ``calls`` in the order they finish."""
        if self.streams:
            yield from self.parallel(calls)
            return
        calls = iter(calls)
        size = max(1, joblib.effective_n_jobs(self.n_jobs))
        while batch := list(itertools.islice(calls, size)):
            yield from self.parallel(batch)
