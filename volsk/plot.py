"""Figures: per-direction histograms, log-volume against cutoff, log-volume across checkpoints.

matplotlib is the optional ``plot`` extra (``pip install 'volsk[plot]'``); it is imported when a
function is called, not when this module is. Every function draws on ``ax`` (a new figure when
None) and returns the matplotlib Axes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .results import aggregate_log_volume
from .sweep import effective_dimension, label_columns

__all__ = ["plot_samples", "plot_cutoff_sweep", "plot_checkpoints"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "volsk.plot needs matplotlib, the optional 'plot' extra: "
            "pip install 'volsk[plot]' (or pip install matplotlib)"
        ) from exc
    return plt


def _axes(ax, figsize=(6.4, 4.0)):
    if ax is not None:
        return ax
    _fig, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
    return ax


def _group_label(key, columns):
    key = key if isinstance(key, tuple) else (key,)
    if len(columns) == 1:
        return str(key[0])
    return ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True))


def _groups(frame, exclude=()):
    """(label, sub-frame) per combination of the label columns that vary."""
    by = label_columns(frame, exclude=exclude)
    if not by:
        return [(None, frame)]
    return [(_group_label(key, by), g) for key, g in frame.groupby(by, sort=False, dropna=False)]


def _sample_sets(est_or_frame):
    """[(label, per-direction log-volumes)] from an estimator, a dict of them, or a frame."""
    if isinstance(est_or_frame, pd.DataFrame):
        if "log_volume" not in est_or_frame.columns:
            raise ValueError("the samples frame needs a 'log_volume' column")
        return [(label, g["log_volume"].to_numpy(float)) for label, g in _groups(est_or_frame)]
    if isinstance(est_or_frame, Mapping):
        sets = []
        for name, value in est_or_frame.items():
            sets.extend((name if label is None else f"{name}: {label}", values)
                        for label, values in _sample_sets(value))
        return sets
    if hasattr(est_or_frame, "sample_log_volumes_"):
        return [(None, np.asarray(est_or_frame.sample_log_volumes_, dtype=float))]
    if hasattr(est_or_frame, "get_params"):
        raise ValueError("the estimator is not fitted: call fit(model, X) first")
    raise TypeError(
        "plot_samples takes a fitted LocalVolumeEstimator, a dict name -> estimator, or a "
        f"samples DataFrame (sweep(..., return_samples=True)); got {type(est_or_frame).__name__}"
    )


def plot_samples(est_or_frame, ax=None, *, bins=30, alpha=0.45):
    """Histogram of per-direction log-volume estimates with the aggregate marked.

    The estimate log µ̂ = logsumexp(ℓ) − log k is dominated by the largest ℓ_i, so it sits at
    the right edge of the histogram; a preconditioner that moves the whole histogram right
    gives a larger, hence more accurate, estimate (Scherlis & Belrose, Figure 1).

    Parameters
    ----------
    est_or_frame : LocalVolumeEstimator, dict of name -> estimator, or pandas.DataFrame
        A fitted estimator; several, overlaid; or a samples frame (``est.samples_``, or the
        long frame of ``sweep(..., return_samples=True)``, one histogram per model and
        parameter combination).
    ax : matplotlib Axes, optional
    bins : int, default=30
        Number of bins, shared by all histograms.
    alpha : float, default=0.45

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.plot import plot_samples
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(32, 4)
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=20, random_state=0).fit(net, X)
    >>> ax = plot_samples({"naive": est})
    >>> len(ax.lines)  # the aggregate
    1
    """
    sets = _sample_sets(est_or_frame)
    ax = _axes(ax)
    finite = [v[np.isfinite(v)] for _, v in sets]
    pooled = np.concatenate(finite) if finite else np.zeros(0)
    edges = np.histogram_bin_edges(pooled if pooled.size else [0.0, 1.0], bins=bins)
    colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for n, ((label, values), ok) in enumerate(zip(sets, finite, strict=True)):
        color = colors[n % len(colors)]
        name = "estimate" if label is None else str(label)
        skipped = values.size - ok.size
        note = f", {skipped} at −∞" if skipped else ""
        ax.hist(ok, bins=edges, alpha=alpha, color=color, histtype="stepfilled",
                label=f"{name} (k={values.size}{note})")
        ax.hist(ok, bins=edges, color=color, histtype="step", linewidth=1.2)  # legible overlaps
        aggregate = aggregate_log_volume(values)
        ax.axvline(aggregate, color=color, linewidth=2, linestyle="--",
                   label=f"{name}: log µ̂ = {aggregate:,.1f}")
    ax.set_xlabel("per-direction log-volume estimate ℓᵢ (nats)")
    ax.set_ylabel("directions")
    ax.set_title("Per-direction estimates; dashed: aggregate log µ̂")
    ax.legend(fontsize="small")
    return ax


def plot_cutoff_sweep(frame, ax=None, *, reference=True):
    """Log-volume against cutoff (log scale), with the fitted slope and the n/2 reference.

    For a small cutoff the neighbourhood is an ellipsoid and µ ∝ ε^(d/2), d the number of
    directions the data constrains: the slope d log µ / d log ε is at most n/2 (dashed line,
    n parameters); ``2 × slope`` is :func:`volsk.sweep.effective_dimension`.

    Parameters
    ----------
    frame : pandas.DataFrame
        A sweep table with ``cutoff`` and ``log_volume`` (and ``n_parameters`` for the
        reference) columns; one line per model and other parameter combination.
    ax : matplotlib Axes, optional
    reference : bool, default=True
        Draw a line of slope n/2 through each line's smallest-cutoff point.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np, pandas as pd
    >>> from volsk.plot import plot_cutoff_sweep
    >>> eps = np.array([1e-3, 1e-2, 1e-1])
    >>> frame = pd.DataFrame({"model": "a", "cutoff": eps, "n_parameters": 10,
    ...                       "log_volume": -50 + 4.0 * np.log(eps)})
    >>> ax = plot_cutoff_sweep(frame)
    >>> len(ax.lines)  # the sweep and its reference
    2
    """
    if "cutoff" not in frame.columns or "log_volume" not in frame.columns:
        raise ValueError("frame needs 'cutoff' and 'log_volume' columns (a sweep over cutoffs)")
    ax = _axes(ax)
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    half_n = None
    for n, (label, group) in enumerate(_groups(frame, exclude=("cutoff",))):
        group = group.sort_values("cutoff")
        color = colors[n % len(colors)]
        d_eff = effective_dimension(group, by=[])
        name = "log-volume" if label is None else str(label)
        ax.plot(group["cutoff"], group["log_volume"], marker="o", color=color,
                label=f"{name}: slope {d_eff / 2:,.1f} (d_eff = {d_eff:,.0f})")
        if reference and "n_parameters" in group.columns:
            finite = group[np.isfinite(group["log_volume"])]
            if len(finite):
                half_n = float(finite["n_parameters"].iloc[0]) / 2
                eps0, mu0 = finite["cutoff"].iloc[0], finite["log_volume"].iloc[0]
                eps = group["cutoff"].to_numpy(float)
                ax.plot(eps, mu0 + half_n * np.log(eps / eps0), color=color, linestyle=":",
                        linewidth=1.2, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("cutoff ε")
    ax.set_ylabel("log-volume log µ̂ (nats)")
    ax.set_title("Log-volume against cutoff (slope = d log µ / d log ε)")
    handles, labels = ax.get_legend_handles_labels()
    if half_n is not None:  # one neutral legend entry for the per-line dotted references
        handles.append(plt.Line2D([], [], color="0.4", linestyle=":", linewidth=1.2))
        labels.append(f"dotted: reference slope n/2 = {half_n:,.1f}")
    ax.legend(handles, labels, fontsize="small")
    return ax


def plot_checkpoints(frame, ax=None, *, x="model", accuracy_columns=None):
    """Log-volume across training checkpoints, optionally with accuracies on a twin axis.

    Parameters
    ----------
    frame : pandas.DataFrame
        A sweep table (``log_volume`` column); one line per combination of the other
        parameters that vary (cutoff, preconditioner, ...).
    ax : matplotlib Axes, optional
    x : str, default="model"
        "model": the models in table order, by name; or a numeric column such as a training
        step or epoch (merge it into the table first).
    accuracy_columns : list of str, optional
        Columns (one value per model, e.g. train and test accuracy) drawn on a twin y axis.

    Returns
    -------
    matplotlib.axes.Axes
        The log-volume axes; the twin is ``ax.figure.axes[-1]``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from volsk.plot import plot_checkpoints
    >>> frame = pd.DataFrame({"model": ["e1", "e2", "e3"], "log_volume": [-80.0, -95.0, -99.0],
    ...                       "test_accuracy": [0.7, 0.9, 0.95]})
    >>> ax = plot_checkpoints(frame, accuracy_columns=["test_accuracy"])
    >>> len(ax.lines), len(ax.figure.axes)
    (1, 2)
    """
    if "log_volume" not in frame.columns:
        raise ValueError("frame needs a 'log_volume' column")
    if x not in frame.columns:
        raise ValueError(f"x={x!r} is not a column of frame; columns: {list(frame.columns)}")
    accuracy_columns = list(accuracy_columns or [])
    for column in accuracy_columns:
        if column not in frame.columns:
            raise ValueError(f"accuracy column {column!r} is not in frame")
    ax = _axes(ax)
    categorical = not pd.api.types.is_numeric_dtype(frame[x])
    order = list(dict.fromkeys(frame[x]))  # table order

    def positions(values):
        if categorical:
            return np.array([order.index(v) for v in values], dtype=float)
        return np.asarray(values, dtype=float)

    exclude = {x, "model", *accuracy_columns}
    for label, group in _groups(frame, exclude=tuple(exclude)):
        group = group if categorical else group.sort_values(x)
        ax.plot(positions(group[x]), group["log_volume"], marker="o",
                label="log-volume" if label is None else str(label))
    ax.set_ylabel("log-volume log µ̂ (nats)")
    ax.set_xlabel("checkpoint" if x == "model" else x)
    if categorical:
        ax.set_xticks(range(len(order)), [str(v) for v in order],
                      rotation=45 if len(order) > 6 else 0,
                      ha="right" if len(order) > 6 else "center")
    handles, labels = ax.get_legend_handles_labels()
    if accuracy_columns:
        twin = ax.twinx()
        per_x = frame.drop_duplicates(subset=[x])
        per_x = per_x if categorical else per_x.sort_values(x)
        greys = ("0.4", "0.65", "0.2", "0.8")  # the colour cycle stays with the log-volumes
        for n, column in enumerate(accuracy_columns):
            twin.plot(positions(per_x[x]), per_x[column], linestyle="--", marker="sD^v"[n % 4],
                      markersize=4, color=greys[n % len(greys)], label=column)
        twin.set_ylabel("accuracy")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small", loc="best")
    ax.set_title("Log-volume across checkpoints")
    return ax
