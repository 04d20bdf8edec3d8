"""Figures: per-direction histograms, log-volume against cutoff, log-volume across checkpoints.

matplotlib is the optional ``plot`` extra (``pip install 'volsk[plot]'``); it is imported when a
function is called, not when this module is. Every function draws on ``ax`` (a new figure when
None) and returns the matplotlib Axes (``plot_samples`` with ``hue``: one per panel). Legends
are capped at ``max_legend`` entries and placed where they cover no data: inside the axes when
a corner or an edge is free, else over room made at the top, else beside the axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .results import aggregate_log_volume
from .sweeps import effective_dimension, label_columns

__all__ = ["plot_samples", "plot_cutoff_sweep", "plot_checkpoints"]

# matplotlib's own "best" order; a legend with more entries than _MAX_INSIDE goes beside the axes
_INSIDE = ("upper right", "upper left", "lower left", "lower right", "center right",
           "center left", "lower center", "upper center", "center")
_MAX_INSIDE = 4


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


def _colors():
    return _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]


def _check_max_legend(max_legend):
    integer = isinstance(max_legend, int | np.integer) and not isinstance(max_legend, bool)
    if not integer or max_legend < 2:
        raise ValueError(f"max_legend must be an integer >= 2, got {max_legend!r}")


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


# -- legends ----------------------------------------------------------------------------------


def _capped(handles, labels, max_legend, hint=""):
    """At most ``max_legend`` entries: the first ones, then "+N more"."""
    if len(labels) <= max_legend:
        return list(handles), list(labels)
    keep = max_legend - 1
    blank = _pyplot().Line2D([], [], linestyle="none")
    return ([*handles[:keep], blank],
            [*labels[:keep], f"+{len(labels) - keep} more{hint}"])


def _renderer(fig):
    get = getattr(fig.canvas, "get_renderer", None)  # Agg and the backends built on it
    if get is None:  # pragma: no cover - depends on the backend
        return None
    fig.draw_without_rendering()  # runs the layout engine: final axes positions and limits
    return get()


def _data_paths(axes):
    """[(display-space path, filled)] of every visible line and patch drawn on ``axes``."""
    from matplotlib.patches import Patch  # optional dependency
    from matplotlib.path import Path

    paths = []
    for a in axes:
        for artist in (*a.lines, *a.patches):
            if not artist.get_visible():
                continue
            path = artist.get_transform().transform_path(artist.get_path())
            finite = np.isfinite(path.vertices).all(axis=1)
            if not finite.all():
                path = Path(path.vertices[finite])
            if len(path.vertices):
                paths.append((path, isinstance(artist, Patch) and artist.get_fill()))
    return paths


def _covers_data(legend, renderer, paths):
    box = legend.get_window_extent(renderer).padded(4 * legend.figure.dpi / 72)  # markers
    return any(path.intersects_bbox(box, filled=filled) for path, filled in paths)


def _make_headroom(ax, legend, renderer, data_axes):
    """Raise the top of each data axes' y range so that its data ends below ``legend``.

    Refused (False) for a legend taller than half the axes or a non-linear y axis.
    """
    box = legend.get_window_extent(renderer)
    free = (box.y0 - ax.bbox.y0) / ax.bbox.height - 0.03  # axes fraction below the legend
    if free < 0.5 or any(a.get_yscale() != "linear" for a in data_axes):
        return False
    for a in data_axes:
        tops = [path.vertices[:, 1].max() for path, _ in _data_paths([a])]
        if not tops:
            continue
        top = (max(tops) - a.bbox.y0) / a.bbox.height  # the data's top, in axes fraction
        if top > free:
            y0, y1 = a.get_ylim()
            a.set_ylim(y0, y0 + top * (y1 - y0) / free)
    return True


def _place_legend(ax, handles, labels, *, data_axes=None, grow=False, renderer=None, **kwargs):
    """``ax.legend`` where it covers no data of ``data_axes`` (default: ``ax`` alone).

    Few entries: the first free position inside the axes, in matplotlib's "best" order, judged
    against the drawn paths of all data axes (a twin's lines included, which ``loc="best"``
    ignores); when none is free, at the top, over room made by raising the y limits.
    Otherwise, or when that would take half the axes: beside the axes on the right, past
    any twin's tick labels; ``grow`` widens the figure by the legend's width so that the axes
    keep theirs (for figures this module created). ``renderer``: of a figure already laid
    out (placing several legends after one layout pass).
    """
    from matplotlib.transforms import offset_copy  # optional dependency

    data_axes = [ax] if data_axes is None else list(data_axes)
    kwargs.setdefault("fontsize", "small")
    fig = ax.figure
    renderer = _renderer(fig) if renderer is None else renderer
    if renderer is None:  # pragma: no cover - depends on the backend
        return ax.legend(handles, labels, loc="best", **kwargs)
    if len(labels) <= _MAX_INSIDE:
        paths = _data_paths(data_axes)
        for loc in _INSIDE:
            legend = ax.legend(handles, labels, loc=loc, **kwargs)
            if not _covers_data(legend, renderer, paths):
                return legend
        legend = ax.legend(handles, labels, loc="upper right", **kwargs)
        if _make_headroom(ax, legend, renderer, data_axes):
            paths = _data_paths(data_axes)
            for loc in ("upper right", "upper left", "upper center"):
                legend = ax.legend(handles, labels, loc=loc, **kwargs)
                if not _covers_data(legend, renderer, paths):
                    return legend
    right = max([0.0] + [a.yaxis.get_tightbbox(renderer).x1 - ax.bbox.x1
                         for a in data_axes if a is not ax])
    anchor = offset_copy(ax.transAxes, fig=fig, x=right * 72 / fig.dpi, units="points")
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                       bbox_transform=anchor, **kwargs)
    if grow:
        width, height = fig.get_size_inches()
        extra = (legend.get_window_extent(renderer).width + right) / fig.dpi + 0.1
        fig.set_size_inches(width + extra, height)
    return legend


# -- per-direction histograms -----------------------------------------------------------------


def _sample_sets(est_or_frame):
    """[(label, per-direction log-volumes)] from an estimator, a dict of them, or a frame."""
    if isinstance(est_or_frame, pd.DataFrame):
        _check_samples_frame(est_or_frame)
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


def _check_samples_frame(frame):
    if "log_volume" not in frame.columns:
        raise ValueError("the samples frame needs a 'log_volume' column")
    if frame.empty:
        raise ValueError("the samples frame is empty: select at least one direction")


def _hue_panels(frame, hue):
    """[(panel label, [(hue label, colour index, log-volumes)])]: a panel per facet."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            "hue= names a column of a samples DataFrame (est.samples_ or the second table of "
            f"sweep(..., return_samples=True)); got {type(frame).__name__}: pass hue=None"
        )
    _check_samples_frame(frame)
    if hue not in frame.columns:
        raise ValueError(f"hue={hue!r} is not a column of the samples frame; label columns: "
                         f"{label_columns(frame)}")
    order = list(dict.fromkeys(frame[hue].astype(str)))  # colours in order of appearance
    facets = label_columns(frame, exclude=(hue,))
    blocks = frame.groupby(facets, sort=False, dropna=False) if facets else [(None, frame)]
    panels = []
    for key, block in blocks:
        sets = [(value, order.index(value), g["log_volume"].to_numpy(float))
                for value, g in block.groupby(block[hue].astype(str), sort=False)]
        panels.append((None if key is None else _group_label(key, facets), sets))
    return panels, facets


def _histograms(ax, sets, bins, alpha):
    """One filled histogram, outline and dashed aggregate per set: their legend entries."""
    plt = _pyplot()
    colors = _colors()
    pooled = np.concatenate([values for _, _, values in sets])
    pooled = pooled[np.isfinite(pooled)]
    edges = np.histogram_bin_edges(pooled if pooled.size else [0.0, 1.0], bins=bins)
    same_k = len({values.size for _, _, values in sets}) == 1
    # the aggregates' dashed lines reach the tallest bar, not the axes' top: room for a legend
    tallest = max(np.histogram(v[np.isfinite(v)], bins=edges)[0].max() for _, _, v in sets)
    handles, labels = [], []
    for label, color_index, values in sets:
        color = colors[color_index % len(colors)]
        ok = values[np.isfinite(values)]
        _, _, patches = ax.hist(ok, bins=edges, alpha=alpha, color=color, histtype="stepfilled")
        ax.hist(ok, bins=edges, color=color, histtype="step", linewidth=1.2)  # legible overlaps
        aggregate = aggregate_log_volume(values)
        if np.isfinite(aggregate):
            ax.plot([aggregate, aggregate], [0, max(tallest, 1)], color=color, linewidth=2,
                    linestyle="--")
        notes = [] if same_k and len(sets) > 1 else [f"k={values.size}"]
        notes += [f"{int(np.sum(values == s))} at {t}∞" for s, t in ((-np.inf, "−"), (np.inf, "+"))
                  if np.any(values == s)]
        name = "estimate" if label is None else str(label)
        handles.append((patches[0], plt.Line2D([], [], color=color, linewidth=2, linestyle="--")))
        labels.append(f"{name}: log µ̂ = {aggregate:,.1f}"
                      + (f" ({', '.join(notes)})" if notes else ""))
    return handles, labels


def plot_samples(est_or_frame, ax=None, *, hue=None, bins=30, alpha=0.45, max_legend=8):
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
        Where to draw; with ``hue``, only when the frame makes a single panel.
    hue : str, optional
        A column of the samples frame (e.g. ``"preconditioner"``): one colour and legend
        entry per value, and one panel per combination of the other label columns that vary
        (model, cutoff, ...), on a new figure. Without it, every combination is one histogram
        on one axes.
    bins : int, default=30
        Number of bins, shared by the histograms of one axes (each panel has its own).
    alpha : float, default=0.45
    max_legend : int, default=8
        Legend entries shown per axes; beyond that the last entry reads "+N more".

    Returns
    -------
    matplotlib.axes.Axes, or numpy.ndarray of Axes
        The axes; with ``hue`` and several panels, an array of them, one per panel.

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

    One panel per cutoff, one colour per preconditioner, from a sweep's samples:

    >>> from volsk.sweeps import sweep
    >>> _, samples = sweep({"net": net}, X, {"cutoff": [1e-2, 1e-1],
    ...                                      "preconditioner": [None, "diag_hessian"]},
    ...                    estimator=LocalVolumeEstimator(sigma=1.0, n_samples=10),
    ...                    return_samples=True)
    >>> axes = plot_samples(samples, hue="preconditioner")
    >>> [a.get_title() for a in axes]
    ['0.01', '0.1']
    """
    _check_max_legend(max_legend)
    if hue is None:
        sets = [(label, n, values)
                for n, (label, values) in enumerate(_sample_sets(est_or_frame))]
        panels, facets = [(None, sets)], []
    else:
        panels, facets = _hue_panels(est_or_frame, hue)
    xlabel, ylabel = "per-direction log-volume estimate ℓᵢ (nats)", "directions"
    if len(panels) == 1:
        owned = ax is None
        ax = _axes(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("Per-direction estimates ℓᵢ; dashed: aggregate log µ̂")
        handles, labels = _histograms(ax, panels[0][1], bins, alpha)
        hint = "" if hue is not None else " (hue= groups them)"
        _place_legend(ax, *_capped(handles, labels, max_legend, hint), grow=owned)
        return ax
    from matplotlib.ticker import MaxNLocator  # optional dependency

    if ax is not None:
        raise ValueError(
            f"hue={hue!r} leaves {len(panels)} panels, one per {' × '.join(facets)}: "
            "pass ax=None to draw them on a new figure, or select one first"
        )
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, grid = _pyplot().subplots(nrows, ncols, figsize=(4.4 * ncols, 3.2 * nrows),
                                   layout="constrained", squeeze=False)
    axes = grid.ravel()
    for a in axes[len(panels):]:
        a.remove()
    axes = axes[:len(panels)]
    fig.suptitle(f"Per-direction estimates ℓᵢ by {hue}; dashed: aggregate log µ̂")
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    entries = []
    for a, (label, sets) in zip(axes, panels, strict=True):
        a.set_title(label, fontsize="medium")
        a.xaxis.set_major_locator(MaxNLocator(nbins=4))  # narrow panels: fewer, legible ticks
        entries.append(_histograms(a, sets, bins, alpha))
    renderer = _renderer(fig)  # one layout pass for all the panels' legends
    for a, (handles, labels) in zip(axes, entries, strict=True):
        _place_legend(a, *_capped(handles, labels, max_legend), renderer=renderer)
    return axes


# -- log-volume against cutoff ----------------------------------------------------------------


def plot_cutoff_sweep(frame, ax=None, *, reference=True, max_legend=8):
    """Log-volume against cutoff (log scale), with the fitted slope and the n/2 reference.

    For a small cutoff the neighbourhood is an ellipsoid and µ ∝ ε^(d/2), d the number of
    directions the data constrains: the slope d log µ / d log ε is at most n/2 (dotted line,
    n parameters); ``2 × slope`` is :func:`volsk.sweeps.effective_dimension`.

    Parameters
    ----------
    frame : pandas.DataFrame
        A sweep table with ``cutoff`` and ``log_volume`` (and ``n_parameters`` for the
        reference) columns; one line per model and other parameter combination.
    ax : matplotlib Axes, optional
    reference : bool, default=True
        Draw a line of slope n/2 from each line's smallest-cutoff estimate, up to the top of
        the data: the y limits are the data's (with matplotlib's margin), so a steep reference
        never squashes the lines.
    max_legend : int, default=8
        Legend entries shown; beyond that the last entry reads "+N more".

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
    _check_max_legend(max_legend)
    owned = ax is None
    ax = _axes(ax)
    plt = _pyplot()
    colors = _colors()
    lines = []  # (colour, group) per drawn sweep
    for n, (label, group) in enumerate(_groups(frame, exclude=("cutoff",))):
        group = group.sort_values("cutoff")
        color = colors[n % len(colors)]
        d_eff = effective_dimension(group, by=[])
        name = "log-volume" if label is None else str(label)
        ax.plot(group["cutoff"], group["log_volume"], marker="o", color=color,
                label=f"{name}: slope {d_eff / 2:,.1f} (d_eff = {d_eff:,.0f})")
        lines.append((color, group))
    ax.set_xscale("log")
    half_ns = set()
    if reference and "n_parameters" in frame.columns:
        values = frame["log_volume"].to_numpy(float)
        values = values[np.isfinite(values)]
        top = values.max() if values.size else np.nan
        for color, group in lines:
            finite = group[np.isfinite(group["log_volume"])]
            if not len(finite):
                continue
            half_n = float(finite["n_parameters"].iloc[0]) / 2
            half_ns.add(half_n)
            eps0, mu0 = float(finite["cutoff"].iloc[0]), float(finite["log_volume"].iloc[0])
            # from the anchor to where the reference leaves the data (or the largest cutoff)
            eps1 = min(float(group["cutoff"].max()), eps0 * math.exp((top - mu0) / half_n))
            eps = np.array([eps0, max(eps1, eps0)])
            ax.plot(eps, mu0 + half_n * np.log(eps / eps0), color=color, linestyle=":",
                    linewidth=1.5, alpha=0.9, scalex=False, scaley=False)
    ax.set_xlabel("cutoff ε")
    ax.set_ylabel("log-volume log µ̂ (nats)")
    ax.set_title("Log-volume against cutoff (slope = d log µ / d log ε)")
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = _capped(handles, labels, max_legend - 1 if half_ns else max_legend)
    if half_ns:  # one neutral legend entry for the per-line dotted references
        handles.append(plt.Line2D([], [], color="0.4", linestyle=":", linewidth=1.5))
        labels.append(f"dotted: slope n/2 = {half_ns.pop():,.1f}" if len(half_ns) == 1
                      else "dotted: slope n/2 (n parameters)")
    _place_legend(ax, handles, labels, grow=owned)
    return ax


# -- log-volume across checkpoints ------------------------------------------------------------


def plot_checkpoints(frame, ax=None, *, x="model", accuracy_columns=None, max_legend=8):
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
        One legend covers both axes and is placed where it hides neither's lines.
    max_legend : int, default=8
        Legend entries shown; beyond that the last entry reads "+N more".

    Returns
    -------
    matplotlib.axes.Axes
        The log-volume axes (it carries the legend); the twin is ``ax.figure.axes[-1]``.

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
    _check_max_legend(max_legend)
    owned = ax is None
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
        names = [str(v) for v in order]
        crowded = len(names) > 8 or sum(map(len, names)) > 60
        ax.set_xticks(range(len(names)), names, rotation=45 if crowded else 0,
                      ha="right" if crowded else "center")
    handles, labels = ax.get_legend_handles_labels()
    data_axes = [ax]
    if accuracy_columns:
        twin = ax.twinx()
        # the log-volume axes (and its legend) on top of the twin's lines, its background off
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        twin.patch.set_visible(True)
        per_x = frame.drop_duplicates(subset=[x])
        per_x = per_x if categorical else per_x.sort_values(x)
        greys = ("0.4", "0.65", "0.2", "0.8")  # the colour cycle stays with the log-volumes
        for n, column in enumerate(accuracy_columns):
            twin.plot(positions(per_x[x]), per_x[column], linestyle="--", marker="sD^v"[n % 4],
                      markersize=4, color=greys[n % len(greys)], label=column)
        twin.set_ylabel("accuracy")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
        data_axes.append(twin)
    ax.set_title("Log-volume across checkpoints")
    _place_legend(ax, *_capped(handles, labels, max_legend), data_axes=data_axes, grow=owned)
    return ax
