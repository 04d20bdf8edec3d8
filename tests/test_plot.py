"""volsk.plot: each figure renders to a PNG with the expected artists."""

import numpy as np
import pandas as pd
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk.plot import plot_checkpoints, plot_cutoff_sweep, plot_samples  # noqa: E402
from volsk.sweeps import sweep  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def save_png(ax, path):
    ax.figure.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
    return data


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X = torch.randn(32, 4)
    h = np.linspace(0.2, 3.0, 67)
    naive = LocalVolumeEstimator(sigma=1.0, n_samples=24, random_state=0).fit(net, X)
    diag = LocalVolumeEstimator(sigma=1.0, n_samples=24, random_state=0,
                                preconditioner=h).fit(net, X)
    return net, X, {"naive": naive, "diagonal": diag}


def test_plot_samples_overlays_one_histogram_and_aggregate_per_estimator(fitted, tmp_path):
    _net, _X, estimators = fitted
    ax = plot_samples(estimators, bins=12)
    assert len(ax.lines) == 2  # one aggregate marker each
    assert len(ax.patches) == 2 * 2  # a filled histogram and its outline each
    assert ax.lines[0].get_xdata()[0] == pytest.approx(estimators["naive"].log_volume_)
    save_png(ax, tmp_path / "samples.png")


def test_plot_samples_accepts_one_estimator_and_a_long_samples_frame(fitted, tmp_path):
    net, X, estimators = fitted
    ax = plot_samples(estimators["naive"])
    assert len(ax.lines) == 1
    _frame, samples = sweep({"a": net}, X, {"cutoff": [1e-3, 1e-2]},
                            estimator=LocalVolumeEstimator(sigma=1.0, n_samples=10),
                            return_samples=True)
    ax = plot_samples(samples)
    assert len(ax.lines) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()][0].startswith("0.001")
    save_png(ax, tmp_path / "frame.png")


def test_plot_samples_rejects_unfitted_estimators():
    with pytest.raises(ValueError, match="not fitted"):
        plot_samples(LocalVolumeEstimator())
    with pytest.raises(TypeError, match="samples DataFrame"):
        plot_samples(3.0)


def test_plot_cutoff_sweep_draws_lines_references_and_fitted_slopes(tmp_path):
    eps = np.array([1e-3, 1e-2, 1e-1])
    frame = pd.DataFrame({
        "model": ["a"] * 3 + ["b"] * 3,
        "cutoff": np.tile(eps, 2),
        "n_parameters": 10,
        "log_volume": np.concatenate([-9 + 2.0 * np.log(eps), -20 + 4.5 * np.log(eps)]),
    })
    ax = plot_cutoff_sweep(frame)
    assert len(ax.lines) == 4  # two sweeps, two references
    assert ax.get_xscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "slope 2.0 (d_eff = 4)" in legend[0]
    assert any("n/2 = 5.0" in text for text in legend)
    reference = [line for line in ax.lines if line.get_linestyle() == ":"][0]
    slope = np.diff(reference.get_ydata()) / np.diff(np.log(reference.get_xdata()))
    np.testing.assert_allclose(slope, 5.0)
    save_png(ax, tmp_path / "cutoff.png")


def test_plot_checkpoints_by_name_or_step_with_accuracies(tmp_path):
    frame = pd.DataFrame({
        "model": ["e1", "e2", "e3"] * 2,
        "preconditioner": ["naive"] * 3 + ["diag"] * 3,
        "log_volume": [-80.0, -95.0, -99.0, -60.0, -70.0, -74.0],
        "epoch": [1, 2, 3] * 2,
        "train_accuracy": [0.8, 0.95, 1.0] * 2,
        "test_accuracy": [0.7, 0.9, 0.93] * 2,
    })
    ax = plot_checkpoints(frame, accuracy_columns=["train_accuracy", "test_accuracy"])
    assert len(ax.lines) == 2
    twin = ax.figure.axes[-1]
    assert twin is not ax and len(twin.lines) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["e1", "e2", "e3"]
    save_png(ax, tmp_path / "checkpoints.png")
    ax = plot_checkpoints(frame, x="epoch")
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3])
    with pytest.raises(ValueError, match="step"):
        plot_checkpoints(frame, x="step")


# -- readable figures: capped legends, references within the data, legends off the data ------


def samples_table(models=("a", "b"), cutoffs=(1e-3, 1e-2, 1e-1),
                  preconditioners=("naive", "diag_hessian"), k=20, seed=0):
    """A long samples table as sweep(..., return_samples=True) returns it, without fitting."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, model in enumerate(models):
        for j, cutoff in enumerate(cutoffs):
            for m, preconditioner in enumerate(preconditioners):
                centre = -12_000 + 3_000 * j + 2_500 * m + 300 * i
                rows.append(pd.DataFrame({
                    "model": model, "cutoff": cutoff, "preconditioner": preconditioner,
                    "direction": np.arange(k), "log_volume": centre + 900 * rng.standard_normal(k),
                }))
    return pd.concat(rows, ignore_index=True)


def display_points(artist, per_segment=40):
    """Points along an artist's drawn path, in display coordinates (segments interpolated)."""
    path = artist.get_transform().transform_path(artist.get_path())
    xy = path.vertices[np.isfinite(path.vertices).all(axis=1)]
    if len(xy) < 2:
        return xy
    t = np.linspace(0.0, 1.0, per_segment)[:, None, None]
    return (xy[:-1] + t * (xy[1:] - xy[:-1])).reshape(-1, 2)


def legend_covers_data(ax):
    """Whether ax's legend box contains any drawn data point of any axes of the figure."""
    from matplotlib.patches import Patch

    fig = ax.figure
    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    for a in fig.axes:
        for artist in [*a.lines, *a.patches]:
            points = display_points(artist)
            inside = ((points[:, 0] >= box.x0) & (points[:, 0] <= box.x1)
                      & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1))
            if inside.any():
                return True
            if isinstance(artist, Patch) and artist.get_fill():  # the box inside a filled area
                path = artist.get_transform().transform_path(artist.get_path())
                corners = [(box.x0, box.y0), (box.x1, box.y0), (box.x0, box.y1), (box.x1, box.y1)]
                if path.contains_points(corners).any():
                    return True
    return False


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_samples_caps_the_legend_of_a_sweep_with_twelve_histograms():
    samples = samples_table()  # 2 models x 3 cutoffs x 2 preconditioners: 12 histograms
    ax = plot_samples(samples)
    assert len(ax.lines) == 12  # every aggregate is drawn ...
    texts = legend_texts(ax)
    assert len(texts) == 8  # ... but the legend stops at max_legend entries
    assert texts[-1].startswith("+5 more")
    assert texts[0].startswith("model=a, cutoff=0.001, preconditioner=naive: log µ̂ = ")
    assert not legend_covers_data(ax)  # a legend that long goes beside the axes
    assert len(legend_texts(plot_samples(samples, max_legend=3))) == 3
    with pytest.raises(ValueError, match="max_legend"):
        plot_samples(samples, max_legend=1)


def test_plot_samples_hue_colours_one_column_and_facets_the_others():
    samples = samples_table()
    axes = plot_samples(samples, hue="preconditioner")
    assert len(axes) == 6 and len({a.figure for a in axes}) == 1  # one panel per model x cutoff
    assert [a.get_title() for a in axes[:3]] == [
        "model=a, cutoff=0.001", "model=a, cutoff=0.01", "model=a, cutoff=0.1"]
    for a in axes:
        assert len(a.lines) == 2  # naive and diag_hessian, each with its aggregate
        texts = legend_texts(a)
        assert [t.split(":")[0] for t in texts] == ["naive", "diag_hessian"]
        assert not legend_covers_data(a)
    # a hue value keeps its colour in every panel
    colours = {tuple(a.lines[m].get_color() for a in axes) for m in (0, 1)}
    assert all(len(set(c)) == 1 for c in colours) and len(colours) == 2
    # the aggregate drawn in a panel is the aggregate of that panel's directions
    one = samples[(samples.model == "b") & (samples.cutoff == 0.01)
                  & (samples.preconditioner == "diag_hessian")]
    assert axes[4].lines[1].get_xdata()[0] == pytest.approx(
        float(np.log(np.mean(np.exp(one.log_volume - one.log_volume.max())))
              + one.log_volume.max()))
    # one panel left: an Axes, drawn where asked
    _fig, ax = plt.subplots()
    assert plot_samples(samples[(samples.model == "a") & (samples.cutoff == 0.1)],
                        ax=ax, hue="preconditioner") is ax


def test_plot_samples_hue_errors_name_the_fix(fitted):
    samples = samples_table()
    _fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="6 panels, one per model × cutoff: pass ax=None"):
        plot_samples(samples, ax=ax, hue="preconditioner")
    with pytest.raises(ValueError, match="hue='sigma' is not a column"):
        plot_samples(samples, hue="sigma")
    with pytest.raises(TypeError, match="hue= names a column of a samples DataFrame"):
        plot_samples(fitted[2]["naive"], hue="preconditioner")
    with pytest.raises(ValueError, match="samples frame is empty"):
        plot_samples(samples[samples.cutoff == 7.0], hue="preconditioner")


def test_plot_cutoff_sweep_references_stay_within_the_datas_range():
    # the digits MLP's shape: n/2 = 2405, a measured slope of ~1500, five decades of cutoff;
    # a reference drawn over the whole range would climb 2405 · ln(1e4) ≈ 22 000 nats
    eps = np.logspace(-4, 0, 5)
    frame = pd.DataFrame({
        "cutoff": np.tile(eps, 2), "n_parameters": 4810,
        "preconditioner": ["naive"] * 5 + ["diag_hessian"] * 5,
        "log_volume": np.concatenate([-3300 + 1960 * np.log(eps), -3800 + 1540 * np.log(eps)]),
    })
    ax = plot_cutoff_sweep(frame)
    low, high = frame.log_volume.min(), frame.log_volume.max()
    bottom, top = ax.get_ylim()
    margin = 0.1 * (high - low)
    assert low - margin <= bottom <= low and high <= top <= high + margin
    references = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(references) == 2
    for line, anchor in zip(references, [frame.log_volume[0], frame.log_volume[5]], strict=True):
        x, y = line.get_xdata(), line.get_ydata()
        assert x[0] == eps[0] and y[0] == pytest.approx(anchor)  # through the measured point
        assert y.max() <= high + 1e-6  # stops where the data stop
        np.testing.assert_allclose(np.diff(y) / np.diff(np.log(x)), 2405.0)
    assert not legend_covers_data(ax)


def test_plot_checkpoints_legend_covers_neither_axes_lines():
    # the case that hid the accuracy lines: log-volume falling, accuracies rising on the twin
    frame = pd.DataFrame({
        "model": [f"epoch {e}" for e in range(1, 7)], "epoch": np.arange(1, 7),
        "log_volume": [-5200.0, -6900, -7800, -8300, -8600, -8700],
        "train_accuracy": [0.85, 0.93, 0.96, 0.98, 0.99, 0.995],
        "test_accuracy": [0.83, 0.90, 0.93, 0.95, 0.955, 0.96],
    })
    accuracies = ["train_accuracy", "test_accuracy"]
    ax = plot_checkpoints(frame, x="epoch", accuracy_columns=accuracies)
    assert legend_texts(ax) == ["log-volume", *accuracies]  # one legend for both axes
    assert not legend_covers_data(ax)
    # several lines per axes, and a legend too long for the inside
    two = pd.concat([frame.assign(preconditioner=p, log_volume=frame.log_volume + shift)
                     for p, shift in (("naive", -2000.0), ("diag_hessian", 0.0))])
    ax = plot_checkpoints(two, x="epoch", accuracy_columns=accuracies)
    assert len(legend_texts(ax)) == 4 and not legend_covers_data(ax)
    six = pd.concat([two.assign(cutoff=c, log_volume=two.log_volume + shift)
                     for c, shift in ((1e-3, -4000.0), (1e-2, 0.0), (1e-1, 3000.0))])
    ax = plot_checkpoints(six, accuracy_columns=accuracies)
    assert len(legend_texts(ax)) == 8 and not legend_covers_data(ax)
    twin = ax.figure.axes[-1]
    ax.figure.canvas.draw()  # beside the axes, clear of the twin's tick labels
    assert ax.get_legend().get_window_extent().x0 >= twin.yaxis.get_tightbbox().x1


def test_ax_argument_is_drawn_on(tmp_path):
    _fig, axes = plt.subplots(1, 2)
    frame = pd.DataFrame({"model": ["a", "b"], "log_volume": [-1.0, -2.0]})
    assert plot_checkpoints(frame, ax=axes[1]) is axes[1]


def test_missing_matplotlib_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.pyplot", None)
    frame = pd.DataFrame({"model": ["a"], "log_volume": [-1.0]})
    with pytest.raises(ImportError, match=r"volsk\[plot\]"):
        plot_checkpoints(frame)
