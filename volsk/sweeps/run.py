"""The sweep: many models × many estimator settings → one tidy table, under any joblib backend.

``sweep`` fits one :class:`~volsk.LocalVolumeEstimator` per (model, parameter combination) and
returns a pandas DataFrame with one row per fit. Rows run through ``joblib.Parallel`` without a
hard-coded backend, so ``joblib.parallel_config(backend="dask")`` (or "ray", "threading") set by
the caller decides where they run. Each row's directions are a pure function of its seed, so the
table is the same whatever the backend and ``n_jobs``. Workers load their model themselves (a
zero-argument factory or a :class:`~volsk.sweeps.Checkpoint` on disk) and send back a few
numbers, never a model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid

from .._seeding import row_seeds
from ..estimator import LocalVolumeEstimator
from ..results import SAMPLE_COLUMNS, STATUS, DirectionRecords, samples_frame
from ._parallel import Tasks
from .cache import (
    CACHE_FORMAT,
    DamagedRecord,
    cache_key,
    check_result,
    data_fingerprint,
    field,
    read_record,
    records_from_columns,
    say,
    write_record,
)
from .sources import _check_models, _ship, clear_loaded, load_model

__all__ = ["sweep", "RESULT_COLUMNS"]

#: Columns of the sweep table that are results, not row labels.
RESULT_COLUMNS = (
    "seed",
    "log_volume",
    "log10_volume",
    "bits",
    "lower_bound",
    "ess",
    "n_parameters",
    "n_evaluations",
    "seconds",
)
_STATUS_CODES = {label: code for code, label in STATUS.items()}


# ---------------------------------------------------------------------------------- the worker


def _fit_row(position, source, X, y, estimator, parent_pid):
    """Fit one row; return a small dict of numbers (never the model)."""
    foreign = os.getpid() != parent_pid  # a worker process: one torch thread, as loky does
    threads = torch.get_num_threads()
    if foreign:
        torch.set_num_threads(1)
    try:
        model, fit_kwargs = load_model(source)  # a Checkpoint: loaded once per worker
        start = time.perf_counter()
        est = clone(estimator).fit(model, X, y, **fit_kwargs)  # the caller's copy stays unfitted
        seconds = time.perf_counter() - start
    finally:
        if foreign and threads != 1:
            torch.set_num_threads(threads)
    bits = getattr(est, "bits_", None)
    result = {
        "seed": int(est.seed_),
        "log_volume": float(est.log_volume_),
        "log10_volume": float(est.log10_volume_),
        "bits": float("nan") if bits is None else float(bits),
        "lower_bound": float(est.log_volume_lower_bound()),
        "ess": float(est.effective_sample_size_),
        "n_parameters": int(est.n_parameters_),
        "n_evaluations": int(est.n_evaluations_),
        "seconds": float(seconds),
    }
    frame = est.samples_
    records = DirectionRecords(**{
        c: [_STATUS_CODES[s] for s in frame[c].astype(str)] if c == "status" else frame[c]
        for c in SAMPLE_COLUMNS
    })
    # plain lists: the record goes to the JSON cache as it is
    samples = {c: getattr(records, c).tolist() for c in SAMPLE_COLUMNS}
    return {"position": position, "result": result, "samples": samples}


# ----------------------------------------------------------------------------------- labels


def _param_label(value):
    """What a grid value looks like in the table: scalars as they are, objects by a short name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"{type(value).__name__}{tuple(value.shape)}"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__}({len(value)})"
    if callable(value) and hasattr(value, "__qualname__"):
        return value.__qualname__
    text = repr(value)
    return text if len(text) <= 60 else type(value).__name__


def _is_plain(value):
    return value is None or isinstance(value, bool | int | float | str | np.generic)


def _grid_labels(grid_dicts, grid):
    """Grid parameter names (in the order the user wrote them) and each row's labels.

    Plain values are their own labels; objects (arrays, measures, preconditioners) are shown
    by a short description, numbered when distinct objects would print alike.
    """
    columns = list(dict.fromkeys(k for d in grid_dicts for k in d))
    row_labels = [{} for _ in grid]
    for c in columns:
        described = {}  # id(object) -> label
        for j, params in enumerate(grid):
            value = params.get(c)
            label = _param_label(value)
            if c == "preconditioner" and c in params and value is None:
                label = "naive"  # None is the naive estimator; NaN would vanish in groupby
            if c in params and not _is_plain(value):
                label = described.setdefault(id(value), label)
            row_labels[j][c] = label
        if len(set(described.values())) < len(described):
            numbered = {i: f"{label} [{n}]" for n, (i, label) in enumerate(described.items())}
            for j, params in enumerate(grid):
                if c in params and id(params[c]) in numbered:
                    row_labels[j][c] = numbered[id(params[c])]
    return columns, row_labels


# ----------------------------------------------------------------------------------- the sweep


def sweep(
    models,
    X,
    param_grid=None,
    *,
    estimator=None,
    n_jobs=None,
    random_state=0,
    paired=True,
    cache_dir=None,
    verbose=0,
    y=None,
    return_samples=False,
):
    """Estimate the local volume of every model under every parameter combination.

    Parameters
    ----------
    models : mapping of name -> model source
        Each source is one of

        - an ``nn.Module`` (or a fitted skorch net, or a Pipeline ending in one); a module on a
          GPU travels to worker processes as a CPU copy;
        - a zero-argument callable that builds or loads the model inside the worker (a
          sweep over many checkpoints then never holds them all in memory); it may return
          ``{"model": model, "optimizer": optimizer}`` to pass optimizer state to ``fit``;
        - a :class:`~volsk.sweeps.Checkpoint` ``(path, factory)``: a file written by
          ``torch.save`` or a ``save_pretrained`` directory, loaded by the worker (once for
          all the rows it fits of that checkpoint).

        Names become the ``model`` column (strings or numbers, e.g. training steps).
    X : array-like, tensor, or dict/tuple of them
        Inputs on which every neighbourhood is defined (sent to every worker; under dask use
        ``parallel_config(backend="dask", scatter=[X])`` to send a large X once).
    param_grid : dict or list of dicts, optional
        :class:`sklearn.model_selection.ParameterGrid` over ``LocalVolumeEstimator``
        parameters. Each key becomes a column. None: one row per model with ``estimator``'s
        parameters. A ``random_state`` key sets the rows' seeds itself (e.g. repeats).
    estimator : LocalVolumeEstimator, optional
        Its parameters are the defaults each row starts from (``clone`` + ``set_params``).
        Default ``LocalVolumeEstimator()``.
    n_jobs : int, optional
        Rows fitted in parallel, by ``joblib.Parallel(n_jobs=n_jobs)``. The backend is never
        chosen here: ``joblib.parallel_config(backend=...)`` set by the caller wins (loky by
        default; "threading", "dask" with a live ``distributed.Client``, "ray"). None: 1, or
        the ``parallel_config`` value.
    random_state : int, RandomState instance or None, default=0
        Base seed. Directions are a pure function of (seed, direction index), so the table is
        the same for any ``n_jobs`` and backend (except ``seconds``). An int is used as it is;
        a RandomState instance, or None (NumPy's global RandomState, as in scikit-learn, so
        ``np.random.seed`` makes the sweep repeatable), is drawn from once.
    paired : bool, default=True
        True: every row uses the same seed (an int ``random_state`` itself): common random
        numbers, so models with the same parameter count (and preconditioner) are probed along
        the same directions and their differences have low variance. False: row (i, j) gets
        its own seed, the child (i, j) of ``numpy.random.SeedSequence`` of the base seed.
    cache_dir : str or os.PathLike, optional
        Finished rows are stored here, one JSON file per row named by a SHA-256 fingerprint of
        (model name, model file or weights when known, estimator parameters including the
        seed, X, y). A re-run after an interruption fits only the missing rows. A factory's
        model is known by its name only: change the name (or the directory) when the factory
        changes. Caching needs reproducible seeds: an int ``random_state``, or a seeded
        RandomState. Each file carries its row's fingerprint and is checked when read: a
        file that is damaged (truncated, garbled, incomplete) or answers another row (copied
        or renamed) is recomputed and rewritten, never used.
    verbose : int, default=0
        > 0: a progress bar over rows (tqdm), and a line on stderr naming each cache file
        that could not be used and why.
    y : array-like, optional
        Labels, for ``cost="cross_entropy"``.
    return_samples : bool, default=False
        Also return the per-direction results, one row per (model, parameters, direction).

    Returns
    -------
    frame : pandas.DataFrame
        One row per (model, parameter combination), in the order models × grid: ``model``,
        one column per grid parameter, ``seed``, ``log_volume`` (nats), ``log10_volume``,
        ``bits`` (NaN for the Lebesgue measure), ``lower_bound`` (95% lower confidence bound
        on the log-volume), ``ess``, ``n_parameters``, ``n_evaluations`` and ``seconds`` (fit
        time in the worker; from the cache when a row was cached).
    samples : pandas.DataFrame
        Only with ``return_samples=True``: ``model``, the grid columns, ``seed`` and the
        columns of ``LocalVolumeEstimator.samples_``.

    See Also
    --------
    volsk.sweeps.effective_dimension : twice the slope of log-volume against log cutoff.
    volsk.plot.plot_cutoff_sweep, volsk.plot.plot_checkpoints, volsk.plot.plot_samples

    Notes
    -----
    Worker processes (loky, dask, ray) run with one torch thread; the threading backend
    shares the caller's process and its thread setting. Workers send back floats and the
    per-direction table, never a model. Scripts that start process workers need an
    ``if __name__ == "__main__":`` guard.

    Examples
    --------
    >>> import torch
    >>> import volsk
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> def net():
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                                torch.nn.Linear(8, 3))
    >>> models = {"a": net(), "b": net()}
    >>> X = torch.randn(32, 4)
    >>> base = volsk.LocalVolumeEstimator(sigma=1.0, n_samples=8)
    >>> frame = volsk.sweep(models, X, {"cutoff": [1e-3, 1e-2]}, estimator=base)
    >>> frame[["model", "cutoff", "seed"]]
      model  cutoff  seed
    0     a   0.001     0
    1     a   0.010     0
    2     b   0.001     0
    3     b   0.010     0
    >>> bool((frame.log_volume < 0).all())
    True
    """
    sources = _check_models(models)
    base = LocalVolumeEstimator() if estimator is None else estimator
    if not (hasattr(base, "get_params") and hasattr(base, "fit")):
        raise TypeError(f"estimator must be a LocalVolumeEstimator, got {type(base).__name__}")
    grid_dicts = [] if param_grid is None else (
        [param_grid] if isinstance(param_grid, Mapping) else list(param_grid))
    grid = list(ParameterGrid(grid_dicts if grid_dicts else {}))
    columns, row_labels = _grid_labels(grid_dicts, grid)
    if "model" in columns or any(c in RESULT_COLUMNS for c in columns):
        raise ValueError(f"param_grid keys may not be named like a result column: {columns}")

    configured = []  # (n_params,) estimators; parameters checked here, before any worker runs
    for params in grid:
        est = clone(base).set_params(**params)
        if hasattr(est, "_validate_params"):
            est._validate_params()
        if hasattr(est, "_generator"):  # resolved here, as the cache key is: rows on workers
            est.set_params(generator=est._generator())  # with other devices draw the same
        configured.append(est)
    seeds = row_seeds(random_state, paired, len(sources), len(grid))
    rows = []  # (model name, grid position, estimator for this row)
    for i, name in enumerate(sources):
        for j, params in enumerate(grid):
            est = clone(configured[j])
            if "random_state" not in params:
                est.set_params(random_state=seeds[i, j])
            rows.append((name, j, est))

    results = [None] * len(rows)
    paths = [None] * len(rows)
    keys = [None] * len(rows)
    if cache_dir is not None:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        data = data_fingerprint(X, y)
        for pos, (name, _j, est) in enumerate(rows):
            params = est.get_params()
            if isinstance(params["random_state"], Integral):
                keys[pos] = cache_key(name, sources[name], est, data)
                paths[pos] = cache / f"{keys[pos]}.json"
                results[pos] = _cached_row(paths[pos], keys[pos], params["n_samples"], verbose)

    todo = [pos for pos, record in enumerate(results) if record is None]
    progress = _progress(verbose, len(rows), len(rows) - len(todo))
    parent_pid = os.getpid()
    shipped = {name: _ship(source) for name, source in sources.items()}  # one object a model
    tasks = (
        joblib.delayed(_fit_row)(pos, shipped[rows[pos][0]], X, y, rows[pos][2], parent_pid)
        for pos in todo
    )
    try:
        if todo:
            with Tasks(n_jobs) as workers:
                for out in workers.unordered(tasks):
                    pos = out["position"]
                    name, j, _est = rows[pos]
                    record = {
                        "format": CACHE_FORMAT,
                        "key": keys[pos],  # checked on read: a record answers only its own row
                        "model": str(name),
                        "params": {k: repr(v) for k, v in grid[j].items()},
                        "result": out["result"],
                        "samples": out["samples"],
                    }
                    if paths[pos] is not None:
                        write_record(paths[pos], record)
                    results[pos] = record
                    if progress is not None:
                        progress.update(1)
    finally:
        clear_loaded()  # models this process loaded for its rows are not kept after the sweep
        if progress is not None:
            progress.close()

    table = {c: [] for c in ("model", *columns, *RESULT_COLUMNS)}
    for pos, (name, j, _est) in enumerate(rows):  # column-wise, like the samples table
        for c, value in {"model": name, **row_labels[j], **results[pos]["result"]}.items():
            table[c].append(value)
    frame = pd.DataFrame(table)
    frame = frame.astype({"seed": np.int64, "n_parameters": np.int64, "n_evaluations": np.int64})
    frame.attrs["volsk_param_columns"] = list(columns)
    if not return_samples:
        return frame
    return frame, _samples_table(rows, results, columns, row_labels)


def _cached_row(path, key, n_samples, verbose):
    """The cached record of a row, or None: missing, or damaged (then said under verbose)."""
    record, reason = read_record(path, key)
    if record is not None:
        try:
            check_result(field(record, "result", dict), RESULT_COLUMNS)
            records_from_columns(field(record, "samples", dict), 0, n_samples)
            return record
        except DamagedRecord as exc:
            reason = str(exc)
    if reason is not None:
        say(verbose, f"cache file {path} {reason}; recomputing its row")
    return None


def _samples_table(rows, results, columns, row_labels):
    """One row per (model, parameters, direction): the labels, the seed, the sample columns."""
    labels = {c: [] for c in ("model", *columns, "seed")}
    samples = {c: [] for c in SAMPLE_COLUMNS}
    for pos, (name, j, _est) in enumerate(rows):
        row = results[pos]["samples"]
        k = len(row["direction"])
        for c, value in {"model": name, **row_labels[j]}.items():
            labels[c].extend([value] * k)
        labels["seed"].extend([results[pos]["result"]["seed"]] * k)
        for c in SAMPLE_COLUMNS:
            samples[c].extend(row[c])
    frame = pd.DataFrame(labels).astype({"seed": np.int64})
    frame = pd.concat([frame, samples_frame(samples)], axis=1)
    frame.attrs["volsk_param_columns"] = list(columns)
    return frame


def _progress(verbose, total, done):
    if not verbose:
        return None
    from tqdm.auto import tqdm  # import time: only for progress bars

    return tqdm(total=total, initial=done, desc="sweep", unit="row")
