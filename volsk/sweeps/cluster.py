"""One estimate sharded over workers: contiguous shards of directions, run where the model loads,
merged into the estimate one process gives, bit for bit.

:func:`fit_sharded` splits the directions of one :class:`~volsk.LocalVolumeEstimator` fit into
shards of contiguous indices and runs them as tasks on a dask cluster (``client=``) or under
whatever ``joblib`` backend the caller configured (loky, threading, dask, ray). Every task gets
the model *source* (a :class:`~volsk.sweeps.Checkpoint`, a factory, or a module shipped once)
and X, and prepares the problem in its worker; a worker keeps the last problem it prepared,
so it prepares once for all the shards it runs. The pilots run once, in the first task:

- the pilots that fix the map (the eps and exponent pilot of ``preconditioner_eps="auto"``
  and ``preconditioner_exponent="auto"``, the rounds of a boundary-fitted preconditioner) and
  the search pilot are pure functions of (problem, seed) and could be recomputed in every
  worker, but they cost several shards' worth of work, and shipping their small results (an
  eps, an exponent, the boundary fit's group coefficients, four numbers) makes every shard
  use the same ones even on workers whose arithmetic differs (CPU and GPU workers);
- their outcome, with a summary of the problem, comes back to the caller and is sent on with
  every shard, which binds its own problem to the chosen map (the boundary correction made
  from the coefficients as the fit made it, not fitted again).

Each shard sends back its per-direction records (eight numbers a direction). Direction i is a
pure function of (seed, i, the problem, the pilots' results), so the merged records, and the
estimate the estimator's own finishing code makes of them, are those of one ``fit`` in one
process (on the same kind of device) whatever the number of workers, the shard size and the
order in which shards finish. With ``cache_dir`` the pilot and every shard are stored as
integrity-checked records: a rerun after preemption computes only what is missing, and more
directions later (``partial=True``, or a larger ``n_samples``) reuse the shards already done.
The tasks themselves are in :mod:`volsk.sweeps.shards`, their records in
:mod:`volsk.sweeps.cache`; this module plans, dispatches and merges.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings

import joblib
import numpy as np
from sklearn.base import clone

import volsk._pipeline as pipeline

from .._checks import is_integer
from .._fingerprint import fingerprint
from .._seeding import base_seed
from .._version import __version__
from ..estimator import LocalVolumeEstimator
from ..preconditioners import EPS_GRID
from ..preconditioners.selection import DEFAULT_EXPONENT
from ..results import DirectionRecords
from ._parallel import Tasks
from .cache import CACHE_FORMAT, ShardStore, data_fingerprint, estimator_params, source_fingerprint
from .shards import Question, check_device, clear_prepared, pilot_task, shard_task
from .sources import _CPUModule, _ship, check_source, clear_loaded

__all__ = ["fit_sharded"]

# parameters a shard's numbers do not depend on (n_samples: a shard is an index range; the
# seed is in the key itself; batch_size: results do not depend on it)
_NOT_IN_QUESTION = ("n_samples", "random_state", "batch_size")


def _plan(first, stop, shard_size, cached):
    """Cover ``first … stop − 1`` by cached shards where they start, else by new shards ending
    at multiples of ``shard_size`` (or where a cached shard starts): a list of
    ``(first, stop, cached shard or None)``."""
    starts = sorted(cached)
    plan, i = [], first
    while i < stop:
        fitting = [s for s in cached.get(i, []) if s.stop <= stop]
        if fitting:
            shard = max(fitting, key=lambda s: s.stop)
            plan.append((i, shard.stop, shard))
            i = shard.stop
            continue
        end = min([stop, (i // shard_size + 1) * shard_size] + [a for a in starts if a > i])
        plan.append((i, end, None))
        i = end
    return plan


# ------------------------------------------------------------------------------ engines


class _Joblib:
    """Tasks through ``joblib.Parallel``: the backend is the caller's ``parallel_config``."""

    def __init__(self, n_jobs):
        self.tasks = Tasks(n_jobs)

    def __enter__(self):
        self.tasks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.tasks.__exit__(*exc)

    def place(self, source, X, y, attention_mask):
        return _ship(source), X, y, attention_mask  # the same objects: scatter=[X] applies

    def one(self, fn, *args):
        return self.tasks.one(joblib.delayed(fn)(*args))

    def many(self, fn, argument_lists):
        yield from self.tasks.unordered(joblib.delayed(fn)(*args) for args in argument_lists)


class _Dask:
    """Tasks as ``distributed`` futures: X (and a module source) scattered to every worker once;
    a task whose worker dies is run again elsewhere by the scheduler."""

    def __init__(self, client):
        self.client = client

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def place(self, source, X, y, attention_mask):
        shipped = _ship(source)
        if isinstance(shipped, _CPUModule):  # the weights travel once per worker, not per task
            shipped = self._scatter(shipped)
        return (shipped, self._scatter(X), None if y is None else self._scatter(y),
                None if attention_mask is None else self._scatter(attention_mask))

    def _scatter(self, value):
        # wrapped in a list: a dict or list X is one object, not many to scatter
        return self.client.scatter([value], broadcast=True, hash=False)[0]

    def one(self, fn, *args):
        return self.client.submit(fn, *args, pure=False).result()

    def many(self, fn, argument_lists):
        from distributed import as_completed  # optional dependency

        futures = [self.client.submit(fn, *args, pure=False) for args in argument_lists]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            self.client.cancel([f for f in futures if not f.done()])


# ------------------------------------------------------------------------------- the fit


def fit_sharded(estimator, source, X, y=None, *, n_samples=None, partial=False, shard_size=64,
                client=None, n_jobs=None, cache_dir=None, attention_mask=None, verbose=0):
    """Fit ``estimator`` with its directions split into shards run on workers.

    The result is the estimator ``estimator.fit(model, X, y)`` gives in one process — the same
    ``log_volume_``, ``samples_`` and pilots, bit for bit on the same kind of device — however
    many workers run the shards, whatever ``shard_size`` and in whatever order they finish.
    Each task receives the model *source* and X (sent to each worker once on dask) and
    prepares the problem in its worker, once per worker; the first task also runs the pilots
    (the eps and exponent pilot of "auto", a boundary-fitted preconditioner's rounds and the
    search pilot) and their results travel to the shards. Workers send back eight numbers
    per direction.

    Parameters
    ----------
    estimator : LocalVolumeEstimator
        Its parameters define the question; it is fitted in place (like ``fit``) and
        returned. ``device="auto"`` puts each worker's shards on its GPU when it has one.
    source : nn.Module, Checkpoint, callable, skorch net or Pipeline
        The model, as for :func:`~volsk.sweeps.sweep`: a
        :class:`~volsk.sweeps.Checkpoint` (a ``torch.save`` file or a ``save_pretrained``
        directory, read by the workers: on several machines, a shared filesystem), a
        zero-argument factory (which may return ``{"model": m, "optimizer": opt}``), or a
        module (sent to each worker as a CPU copy, once per worker with ``client``).
    X : array-like, tensor, or dict/tuple of them
        The inputs on which the neighbourhood is defined.
    y : array-like, optional
        Labels, for ``cost="cross_entropy"``.
    n_samples : int, optional
        Directions to run (default: the estimator's ``n_samples``).
    partial : bool, default=False
        True: add ``n_samples`` directions to the estimator's fitted estimate, as
        ``partial_fit`` does (the same question only: a changed parameter, model, X or y
        raises ValueError); on an unfitted estimator, a fit.
    shard_size : int, default=64
        Directions per task. New shards end at multiples of ``shard_size`` (so reruns and
        extensions find the same shards in the cache).
    client : distributed.Client, optional
        Run on this dask cluster: X (and a module source) is scattered to every worker once,
        shards are submitted as futures and merged as they finish; a shard whose worker dies
        is run again elsewhere (the scheduler's retries). None: tasks run through
        ``joblib.Parallel(n_jobs=n_jobs)`` under the caller's ``joblib.parallel_config``
        (loky processes, threads, ``"dask"``, ``"ray"``).
    n_jobs : int, optional
        joblib workers when ``client`` is None (None: 1, or the ``parallel_config`` value).
    cache_dir : str or os.PathLike, optional
        Store the pilot and every finished shard here (JSON files named by fingerprints of
        the question: model file or weights, parameters, seed, data; and, for shards, of
        the anchor and data the worker prepared, the pilots' results and the index range).
        A rerun after an interruption computes only the missing shards (and no pilot when
        the source is a Checkpoint or a module); a later fit with more directions reuses
        the shards it contains. Files are checked when read: a damaged file, or one that
        answers another question, is recomputed, never used. Needs an int ``random_state``
        (or a seeded RandomState) to find the same question again.
    attention_mask : array-like, optional
        As in ``fit``.
    verbose : int, default=0
        > 0: a progress bar over shards, and a line naming each cache file that could not
        be used.

    Returns
    -------
    estimator : LocalVolumeEstimator
        Fitted: every fitted attribute of ``fit``. No model is kept in the caller, so
        ``score(X)`` with new X needs a ``fit``; ``partial_fit`` works where the model is.

    See Also
    --------
    volsk.sweeps.sweep : many models × settings, one fit per task.

    Notes
    -----
    Bit-for-bit equality holds among runs whose shards ran on the same kind of device (a CPU
    and a GPU round differently): if the shards of one estimate ran on several kinds, a
    warning says so (every direction is still an unbiased sample of the same question).
    The direction generator (``generator``) is resolved once, in the caller, from the
    estimator's ``device``, and every shard draws with it; with ``"device"`` (what "auto"
    means on CUDA) each kind of device draws other directions, so every shard must run on the
    kind of device the pilot ran on, else ValueError.
    Warnings raised in worker processes are raised again in the caller. Scripts that start
    process workers need an ``if __name__ == "__main__":`` guard.

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.sweeps import fit_sharded
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(32, 4)
    >>> est = fit_sharded(LocalVolumeEstimator(sigma=1.0, n_samples=10, random_state=0),
    ...                   net, X, shard_size=4)
    >>> one = LocalVolumeEstimator(sigma=1.0, n_samples=10, random_state=0).fit(net, X)
    >>> est.log_volume_ == one.log_volume_
    True
    """
    if not isinstance(estimator, LocalVolumeEstimator):
        raise TypeError(f"estimator must be a LocalVolumeEstimator, got {type(estimator).__name__}")
    estimator._validate_params()
    estimator._check_values()
    check_source(source)
    k = estimator.n_samples if n_samples is None else n_samples
    for name, value in (("n_samples", k), ("shard_size", shard_size)):
        if not is_integer(value, 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if client is not None and not hasattr(client, "submit"):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
    extend = bool(partial) and hasattr(estimator, "log_volume_")
    if extend:
        estimator._check_extension()  # the parameters now, the model and data after the pilot
        seed, first = int(estimator.seed_), len(estimator._records)
        eps = EPS_GRID[0] if estimator.preconditioner_eps_ is None else (
            estimator.preconditioner_eps_)
    else:
        seed, first = base_seed(estimator.random_state), 0
        eps = estimator.preconditioner_eps
    exponent = estimator.preconditioner_exponent
    if extend and isinstance(exponent, str):  # as partial_fit: "auto" keeps the fit's choice
        exponent = getattr(estimator, "preconditioner_exponent_", None)
        exponent = DEFAULT_EXPONENT if exponent is None else exponent
    stop = first + int(k)
    generator = estimator._generator()  # once for the whole run: every shard draws with it

    params = estimator_params(estimator, leave_out=_NOT_IN_QUESTION)
    common = {"format": CACHE_FORMAT, "volsk": __version__, "params": params, "seed": seed}
    identity = source_fingerprint(source)
    question_key = fingerprint({
        **common,
        "source": identity if identity is not None else ("factory", uuid.uuid4().hex),
        "data": data_fingerprint(X, y, attention_mask),
    })
    # the eps and exponent pilot runs min(EPS_PILOT_DIRECTIONS, k) directions: k is not in
    # the question's parameters, so it enters the pilot's key when that pilot runs
    searched = isinstance(eps, str) or isinstance(exponent, str)
    eps_directions = min(pipeline.EPS_PILOT_DIRECTIONS, int(k)) if searched else 0
    chosen = () if not isinstance(estimator.preconditioner_exponent, str) else (
        "exponent", exponent)  # an extension binds the exponent its fit chose
    pilot_key = None if identity is None else fingerprint(
        question_key, "pilot", eps, eps_directions, *chosen)
    question = Question(clone(estimator).set_params(preconditioner_exponent=exponent), seed,
                        question_key, int(k), os.getpid(), generator)

    store = ShardStore(cache_dir, verbose)
    engine = _Dask(client) if client is not None else _Joblib(n_jobs)
    placed = []  # the source and data where the tasks run, once they are needed
    progress = None
    with contextlib.ExitStack() as stack:

        def arguments():
            if not placed:  # workers start only when some task is not in the cache
                stack.enter_context(engine)
                placed.extend(engine.place(source, X, y, attention_mask))
            return placed

        try:
            pilot = store.pilot(pilot_key)
            if pilot is None:
                pilot, caught = engine.one(pilot_task, *arguments(), question, eps)
                _warn_again(caught)
                store.save_pilot(pilot_key, pilot)
            if extend:
                estimator._check_extension(pilot.data_fingerprint)
            start, choice = pilot.start, pilot.choice
            question_of_shards = {**common, "content": pilot.content, "eps": choice.bind_eps,
                                  "start": (start.radius, start.slope, start.bend)}
            # The pilot's choice of the map is a pure function of the question (parameters
            # with the seed, the content of model and data) and, through the eps pilot's
            # min(8, k) directions, of k, which ``common`` leaves out: so what was chosen
            # enters the key (eps above), and runs whose pilots chose other maps never share
            # a shard. An "auto" exponent enters as the one bound (a fit's and its
            # extension's shards share keys); a fit that chooses neither an exponent nor a
            # boundary correction keeps the key it had before these could be sharded.
            if isinstance(estimator.preconditioner_exponent, str):
                bound = choice.bind_exponent if choice.bind_exponent is not None else (
                    DEFAULT_EXPONENT if isinstance(exponent, str) else exponent)
                question_of_shards["exponent"] = float(bound)
            if choice.boundary is not None:
                question_of_shards["boundary"] = choice.boundary
            shard_key = fingerprint(question_of_shards)
            plan = _plan(first, stop, shard_size, store.shards(shard_key, first, stop))
            done = {a: shard for a, _b, shard in plan if shard is not None}
            todo = [(*arguments(), question, pilot, a, b) for a, b, shard in plan
                    if shard is None]
            progress = _progress(verbose, len(plan), len(done))
            for shard, caught in engine.many(shard_task, todo) if todo else ():
                _warn_again(caught)
                store.save_shard(shard_key, shard)
                done[shard.first] = shard
                if progress is not None:
                    progress.update(1)
        finally:
            if progress is not None:
                progress.close()
            clear_prepared()  # the caller's process keeps no model (threads, sequential runs)
            clear_loaded()

    shards = [done[a] for a, _b, _shard in plan]
    records = DirectionRecords.concatenate([s.records for s in shards])
    if not np.array_equal(records.direction, np.arange(first, stop)):  # pragma: no cover
        raise RuntimeError("sharded fit: the shards do not cover the directions asked for")
    devices = sorted({s.device for s in shards})
    for device in devices:  # shards read from the cache were not checked by a worker
        check_device(generator, device, pilot.device)
    if len(devices) > 1:
        warnings.warn(
            f"the shards of this estimate ran on {' and '.join(devices)} devices: each "
            "direction is a valid sample, but the estimate is not bit-identical to a run on "
            "one kind of device",
            RuntimeWarning,
            stacklevel=2,
        )
    if extend:
        records = DirectionRecords.concatenate([estimator._records, records])
    return estimator._from_records(
        pilot.summary, records, seed=seed, eps=choice.eps, eps_table=choice.eps_table,
        pilot_evaluations=pilot.start.evaluations + choice.boundary_evaluations,
        data_fingerprint=pilot.data_fingerprint, extend=extend, generator=generator,
        exponent=choice.exponent, boundary_table=choice.boundary_table)


def _warn_again(caught):
    for category, message in dict.fromkeys(caught):  # once each, in order
        warnings.warn(message, category, stacklevel=3)


def _progress(verbose, total, done):
    if not verbose:
        return None
    from tqdm.auto import tqdm  # import time: only for progress bars

    return tqdm(total=total, initial=done, desc="shards", unit="shard")
