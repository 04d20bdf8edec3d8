"""Sweeps: many models × many estimator settings → one tidy table, under any joblib backend.

``sweep`` fits one :class:`~volsk.LocalVolumeEstimator` per (model, parameter combination) and
returns a pandas DataFrame with one row per fit. Rows run through ``joblib.Parallel`` without a
hard-coded backend, so ``joblib.parallel_config(backend="dask")`` (or "ray", "threading") set by
the caller decides where they run. Each row's directions are a pure function of its seed, so the
table is the same whatever the backend and ``n_jobs``. Workers load their model themselves (a
zero-argument factory or a :class:`Checkpoint` on disk) and send back a few numbers, never a model.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid
from sklearn.utils import check_random_state

__all__ = ["Checkpoint", "sweep", "effective_dimension"]

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
#: Per-direction columns of the samples table (as in ``LocalVolumeEstimator.samples_``).
SAMPLE_COLUMNS = (
    "direction",
    "log_volume",
    "radius",
    "cost_at_radius",
    "log_weight",
    "log_radial_integral",
    "evaluations",
    "status",
)
_INT_SAMPLE_COLUMNS = ("direction", "evaluations")
_CACHE_FORMAT = 1
# Parameters that cannot change a row's numbers: left out of the cache key.
_NOT_IN_KEY = ("n_jobs", "verbose")


# ------------------------------------------------------------------------------- model sources


@dataclass(frozen=True)
class Checkpoint:
    """A model saved with ``torch.save``, loaded only inside the worker that fits it.

    A sweep over a hundred checkpoints then holds at most one model per worker in memory.
    The file is loaded with ``map_location="cpu"``; the estimator places the model on the
    worker's device (``device="auto"``: its GPU when it has one).

    Parameters
    ----------
    path : str or os.PathLike
        The file; the workers read it (on a multi-machine cluster: a shared filesystem).
    factory : callable, optional
        Zero-argument callable returning a freshly built module, into which the saved state
        dict is loaded. Not needed when the file holds a whole module (then
        ``weights_only=False``).
    key : str, optional
        For a checkpoint dict (``{"model": state_dict, "optimizer": ..., "epoch": ...}``): the
        entry holding the model's state dict. None: the file is the state dict (or module).
    optimizer : callable, optional
        ``optimizer(model) -> torch.optim.Optimizer``. Its state is loaded from the
        ``optimizer_key`` entry of the checkpoint dict and passed to ``fit(..., optimizer=)``
        (for the "adam" preconditioners).
    optimizer_key : str, default="optimizer"
    weights_only : bool, default=True
        Passed to ``torch.load``. False is needed for a whole pickled module; use it only for
        files you trust.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from volsk.sweep import Checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "step_100.pt")
    >>> torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    >>> ckpt = Checkpoint(path, lambda: torch.nn.Linear(3, 2))
    >>> ckpt.load().weight.shape
    torch.Size([2, 3])
    """

    path: str | os.PathLike
    factory: object = None
    key: str | None = None
    optimizer: object = None
    optimizer_key: str = "optimizer"
    weights_only: bool = True

    def load(self):
        """The model (or ``{"model": model, "optimizer": optimizer}``), on the CPU."""
        saved = torch.load(self.path, map_location="cpu", weights_only=self.weights_only)
        state = saved if self.key is None else saved[self.key]
        if isinstance(state, torch.nn.Module):
            model = state
        else:
            if self.factory is None:
                raise ValueError(
                    f"Checkpoint({os.fspath(self.path)!r}) holds a state dict: give a factory, "
                    "a zero-argument callable that builds the module to load it into"
                )
            model = self.factory()
            model.load_state_dict(state)
        if self.optimizer is None:
            return model
        optimizer = self.optimizer(model)
        optimizer.load_state_dict(saved[self.optimizer_key])
        return {"model": model, "optimizer": optimizer}

    def fingerprint(self):
        """(absolute path, size, modification time): a changed file misses the cache."""
        stat = os.stat(self.path)
        return (os.path.abspath(self.path), stat.st_size, stat.st_mtime_ns)


class _CPUModule:
    """An nn.Module travelling to a worker: pickled as a CPU copy, never as CUDA tensors."""

    def __init__(self, module):
        self.module = module

    def __reduce__(self):
        return (_identity, (_cpu_copy(self.module),))


def _identity(obj):
    return obj


def _cpu_copy(module):
    """The module itself when it lives on the CPU, else a copy whose tensors are on the CPU."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    if all(t.device.type == "cpu" for t in tensors):
        return module
    memo = {}  # pre-filled so deepcopy never duplicates the device tensors
    for t in tensors:
        cpu = t.detach().to("cpu")
        if isinstance(t, torch.nn.Parameter):
            cpu = torch.nn.Parameter(cpu, requires_grad=t.requires_grad)
        memo[id(t)] = cpu
    return copy.deepcopy(module, memo)


def _check_models(models):
    if not isinstance(models, Mapping):
        raise TypeError(
            "models must be a mapping name -> model, e.g. {'step_100': net} or "
            "{'step_100': Checkpoint(path, factory)}; got " + type(models).__name__
        )
    if len(models) == 0:
        raise ValueError("models is empty: give at least one model")
    for name, source in models.items():
        if isinstance(source, str | os.PathLike):
            raise TypeError(
                f"models[{name!r}] is a path; wrap it: Checkpoint(path, factory) (a state dict "
                "loaded into factory()), or Checkpoint(path, weights_only=False) (a whole module)"
            )
        if not (
            isinstance(source, Checkpoint | torch.nn.Module)
            or callable(source)
            or hasattr(source, "module_")
            or hasattr(source, "steps")
        ):
            raise TypeError(
                f"models[{name!r}] must be an nn.Module, a fitted skorch net or Pipeline, a "
                "zero-argument callable returning one, or a Checkpoint; got "
                f"{type(source).__name__}"
            )
    return dict(models)


def _load(source):
    """Turn a model source into (model, fit keyword arguments), inside the worker."""
    if isinstance(source, _CPUModule):
        source = source.module
    if isinstance(source, Checkpoint):
        loaded = source.load()
    elif isinstance(source, torch.nn.Module) or hasattr(source, "fit"):
        loaded = source  # a module, skorch net or Pipeline: fit accepts it as it is
    else:
        loaded = source()
    if isinstance(loaded, Mapping):
        if "model" not in loaded:
            raise ValueError(
                "a model factory returned a dict without a 'model' entry; return the model, or "
                "{'model': model, 'optimizer': optimizer}"
            )
        kwargs = {k: v for k, v in loaded.items() if k != "model"}
        unknown = set(kwargs) - {"optimizer", "attention_mask"}
        if unknown:
            raise ValueError(f"unknown fit arguments from a model factory: {sorted(unknown)}")
        return loaded["model"], kwargs
    return loaded, {}


def _ship(source):
    return _CPUModule(source) if isinstance(source, torch.nn.Module) else source


# ---------------------------------------------------------------------------------- the worker


def _fit_row(position, source, X, y, estimator, parent_pid):
    """Fit one row; return a small dict of numbers (never the model)."""
    foreign = os.getpid() != parent_pid  # a worker process: one torch thread, as loky does
    threads = torch.get_num_threads()
    if foreign:
        torch.set_num_threads(1)
    try:
        model, fit_kwargs = _load(source)
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
    samples = {c: (frame[c].astype(str) if c == "status" else frame[c]).tolist()
               for c in SAMPLE_COLUMNS}
    return {"position": position, "result": result, "samples": samples}


# ------------------------------------------------------------------------------------- seeding


def _row_seeds(random_state, paired, n_models, n_params):
    """Base seed of every (model, parameter combination): an (n_models, n_params) int array.

    paired: one seed for all rows (common random numbers; an int random_state is used as it
    is, so a row equals ``LocalVolumeEstimator(random_state=random_state, **params).fit``).
    Unpaired: row (i, j) gets the child of ``SeedSequence(random_state)`` with spawn key (i, j),
    so adding models or grid values at the end keeps the existing rows' seeds.
    """
    if isinstance(random_state, Integral) and not isinstance(random_state, bool):
        entropy = int(random_state)
        if entropy < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}")
    elif random_state is None:
        entropy = int(np.random.SeedSequence().generate_state(1)[0])
    else:
        entropy = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    if paired:
        return np.full((n_models, n_params), entropy, dtype=object)
    seeds = np.empty((n_models, n_params), dtype=object)
    for i, model_seq in enumerate(np.random.SeedSequence(entropy).spawn(n_models)):
        for j, row_seq in enumerate(model_seq.spawn(n_params)):
            seeds[i, j] = int(row_seq.generate_state(1)[0])
    return seeds


# ------------------------------------------------------------------------------------- caching


def _fingerprint_data(value):
    """A hash of X or y (tensors, arrays, dicts or tuples of them)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return ("tensor", str(t.dtype), joblib.hash(t.float().numpy() if t.dtype ==
                                                      torch.bfloat16 else t.numpy()))
    if isinstance(value, Mapping):
        return {k: _fingerprint_data(v) for k, v in sorted(value.items())}
    if isinstance(value, tuple | list):
        return [_fingerprint_data(v) for v in value]
    return joblib.hash(value)


def _fingerprint_param(value):
    """A hash of an estimator parameter; lambdas and closures are hashed by their code."""
    if isinstance(value, torch.Tensor):
        return _fingerprint_data(value)
    try:
        return joblib.hash(value)
    except Exception:  # noqa: BLE001 - plain pickle refuses lambdas and local functions
        try:  # a dependency of joblib >= 1.5; vendored before
            import cloudpickle
        except ImportError:  # pragma: no cover
            from joblib.externals import cloudpickle

        return joblib.hash(cloudpickle.dumps(value))


def _fingerprint_source(source):
    if isinstance(source, Checkpoint):
        return ("checkpoint", source.fingerprint(), source.key, source.optimizer_key)
    if isinstance(source, torch.nn.Module):
        return ("module", {k: _fingerprint_data(v) for k, v in source.state_dict().items()})
    return None  # a factory: its name is its identity


def _cache_key(name, source, estimator, data):
    params = {k: _fingerprint_param(v) for k, v in estimator.get_params(deep=False).items()
              if k not in _NOT_IN_KEY}
    from . import __version__

    return joblib.hash(
        {
            "format": _CACHE_FORMAT,
            "volsk": __version__,
            "estimator": type(estimator).__qualname__,
            "model": name,
            "source": _fingerprint_source(source),
            "params": params,
            "data": data,
        }
    )


def _read_cache(path):
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if record.get("format") != _CACHE_FORMAT:
        return None
    return record


def _write_cache(path, record):
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)  # atomic: an interrupted write never leaves half a row


# ----------------------------------------------------------------------------------- the sweep


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
                label = "naive"  # DESIGN: None is the naive estimator; NaN would vanish in groupby
            if c in params and not _is_plain(value):
                label = described.setdefault(id(value), label)
            row_labels[j][c] = label
        if len(set(described.values())) < len(described):
            numbered = {i: f"{label} [{n}]" for n, (i, label) in enumerate(described.items())}
            for j, params in enumerate(grid):
                if c in params and id(params[c]) in numbered:
                    row_labels[j][c] = numbered[id(params[c])]
    return columns, row_labels


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
        - a :class:`Checkpoint` ``(path, factory)``: a file written by ``torch.save``.

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
        the same for any ``n_jobs`` and backend (except ``seconds``).
    paired : bool, default=True
        True: every row uses the same seed (an int ``random_state`` itself): common random
        numbers, so models with the same parameter count (and preconditioner) are probed along
        the same directions and their differences have low variance. False: row (i, j) gets
        its own seed, the child (i, j) of ``numpy.random.SeedSequence(random_state)``.
    cache_dir : str or os.PathLike, optional
        Finished rows are stored here, one JSON file per row named by a hash of (model name,
        model file or weights when known, estimator parameters including the seed, X, y). A
        re-run after an interruption fits only the missing rows. A factory's model is known
        by its name only: change the name (or the directory) when the factory changes.
        Caching needs reproducible seeds (an int or RandomState ``random_state``).
    verbose : int, default=0
        > 0: a progress bar over rows (tqdm).
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
    effective_dimension : twice the slope of log-volume against log cutoff.
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
    >>> from volsk.sweep import sweep
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> def net():
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                                torch.nn.Linear(8, 3))
    >>> models = {"a": net(), "b": net()}
    >>> X = torch.randn(32, 4)
    >>> base = volsk.LocalVolumeEstimator(sigma=1.0, n_samples=8)
    >>> frame = sweep(models, X, {"cutoff": [1e-3, 1e-2]}, estimator=base)
    >>> frame[["model", "cutoff", "seed"]]
      model  cutoff  seed
    0     a   0.001     0
    1     a   0.010     0
    2     b   0.001     0
    3     b   0.010     0
    >>> bool((frame.log_volume < 0).all())
    True
    """
    from .estimator import LocalVolumeEstimator

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
        configured.append(est)
    seeds = _row_seeds(random_state, paired, len(sources), len(grid))
    rows = []  # (model name, grid position, estimator for this row)
    for i, name in enumerate(sources):
        for j, params in enumerate(grid):
            est = clone(configured[j])
            if "random_state" not in params:
                est.set_params(random_state=seeds[i, j])
            rows.append((name, j, est))

    results = [None] * len(rows)
    paths = [None] * len(rows)
    if cache_dir is not None:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        data = {"X": _fingerprint_data(X), "y": None if y is None else _fingerprint_data(y)}
        for pos, (name, _j, est) in enumerate(rows):
            seed = est.get_params()["random_state"]
            if isinstance(seed, Integral):
                paths[pos] = cache / f"{_cache_key(name, sources[name], est, data)}.json"
                results[pos] = _read_cache(paths[pos])

    todo = [pos for pos, record in enumerate(results) if record is None]
    progress = _progress(verbose, len(rows), len(rows) - len(todo))
    parent_pid = os.getpid()
    tasks = (
        joblib.delayed(_fit_row)(
            pos, _ship(sources[rows[pos][0]]), X, y, rows[pos][2], parent_pid
        )
        for pos in todo
    )
    try:
        if todo:
            parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")
            for out in parallel(tasks):
                pos = out["position"]
                name, j, _est = rows[pos]
                record = {
                    "format": _CACHE_FORMAT,
                    "model": str(name),
                    "params": {k: repr(v) for k, v in grid[j].items()},
                    "result": out["result"],
                    "samples": out["samples"],
                }
                if paths[pos] is not None:
                    _write_cache(paths[pos], record)
                results[pos] = record
                if progress is not None:
                    progress.update(1)
    finally:
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
    return frame, _samples_frame(rows, results, columns, row_labels)


def _samples_frame(rows, results, columns, row_labels):
    from ._radius import STATUS

    table = {c: [] for c in ("model", *columns, "seed", *SAMPLE_COLUMNS)}
    for pos, (name, j, _est) in enumerate(rows):
        samples = results[pos]["samples"]
        k = len(samples["direction"])
        for c, value in {"model": name, **row_labels[j]}.items():
            table[c].extend([value] * k)
        table["seed"].extend([results[pos]["result"]["seed"]] * k)
        for c in SAMPLE_COLUMNS:
            table[c].extend(samples[c])
    frame = pd.DataFrame(table)
    frame = frame.astype({"seed": np.int64, **{c: np.int64 for c in _INT_SAMPLE_COLUMNS}})
    floats = [c for c in SAMPLE_COLUMNS if c not in _INT_SAMPLE_COLUMNS and c != "status"]
    frame[floats] = frame[floats].astype(np.float64)
    frame["status"] = pd.Categorical(frame["status"], categories=list(STATUS.values()))
    frame.attrs["volsk_param_columns"] = list(columns)
    return frame


def _progress(verbose, total, done):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="sweep", unit="row")


# ------------------------------------------------------------------------------- analysis


def label_columns(frame, exclude=()):
    """The columns of a sweep (or samples) table that label rows: model and grid parameters.

    Taken from ``frame.attrs["volsk_param_columns"]`` when pandas kept it (``merge`` drops
    it), else every column that is neither a result nor a per-direction column and is not
    per-model information added to the table (a column with one value per model, such as an
    epoch or an accuracy). Only columns that take more than one value are returned.
    """
    known = frame.attrs.get("volsk_param_columns")
    if known is not None:
        candidates = ["model", *known]
    else:
        candidates = [c for c in frame.columns
                      if c not in RESULT_COLUMNS and c not in SAMPLE_COLUMNS]
        if "model" in frame.columns:
            per_model = frame.astype({c: str for c in candidates}).groupby("model", sort=False)
            candidates = [c for c in candidates
                          if c == "model" or (per_model[c].nunique() > 1).any()]
    return [c for c in candidates if c in frame.columns and c not in exclude
            and frame[c].astype(str).nunique() > 1]


def effective_dimension(frame, by=None):
    """Twice the least-squares slope of log-volume against log cutoff: 2 d log µ / d log ε.

    For a small cutoff the neighbourhood is an ellipsoid of the directions the data pins
    down, and its measure scales as ε^(d/2), d their number; flat directions do not count.
    So this is the number of parameters the cutoff's level of fit actually constrains
    (≤ ``n_parameters``).

    Parameters
    ----------
    frame : pandas.DataFrame
        A sweep table with ``cutoff`` and ``log_volume`` columns, at least two cutoffs per
        group. Non-finite log-volumes are left out.
    by : list of str, optional
        Columns that define groups (one slope each). Default: the label columns (model and
        grid parameters other than ``cutoff``) that take more than one value.

    Returns
    -------
    float or pandas.Series
        A float when there is a single group, else a Series indexed by the groups.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from volsk.sweep import effective_dimension
    >>> cutoffs = np.array([1e-3, 1e-2, 1e-1])
    >>> frame = pd.DataFrame({"model": "a", "cutoff": cutoffs,
    ...                       "log_volume": -100 + 3.0 * np.log(cutoffs)})
    >>> round(effective_dimension(frame), 6)
    6.0
    """
    for column in ("cutoff", "log_volume"):
        if column not in frame.columns:
            raise ValueError(f"frame needs a {column!r} column (a sweep over cutoffs)")
    by = label_columns(frame, exclude=("cutoff",)) if by is None else list(by)

    def slope(group):
        ok = np.isfinite(group["log_volume"].to_numpy(float)) & (group["cutoff"] > 0).to_numpy()
        x = np.log(group["cutoff"].to_numpy(float)[ok])
        if np.unique(x).size < 2:
            return float("nan")
        return float(2.0 * np.polyfit(x, group["log_volume"].to_numpy(float)[ok], 1)[0])

    if not by:
        return slope(frame)
    keys, values = [], []
    for key, group in frame.groupby(by, sort=False, dropna=False):
        keys.append(key)
        values.append(slope(group))
    if len(by) == 1:
        index = pd.Index([k[0] if isinstance(k, tuple) else k for k in keys], name=by[0])
    else:
        index = pd.MultiIndex.from_tuples(keys, names=by)
    return pd.Series(values, index=index, name="effective_dimension")


# ``volsk.sweep.Checkpoint`` also works when ``volsk.sweep`` is the function (exported from
# the package), so both spellings in the docs are right.
sweep.Checkpoint = Checkpoint
