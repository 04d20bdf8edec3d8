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
from volsk.sweep import sweep  # noqa: E402

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
    reference = ax.lines[1].get_ydata()
    np.testing.assert_allclose(np.diff(reference) / np.diff(np.log(eps)), 5.0)
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


def test_ax_argument_is_drawn_on(tmp_path):
    _fig, axes = plt.subplots(1, 2)
    frame = pd.DataFrame({"model": ["a", "b"], "log_volume": [-1.0, -2.0]})
    assert plot_checkpoints(frame, ax=axes[1]) is axes[1]


def test_missing_matplotlib_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.pyplot", None)
    frame = pd.DataFrame({"model": ["a"], "log_volume": [-1.0]})
    with pytest.raises(ImportError, match=r"volsk\[plot\]"):
        plot_checkpoints(frame)
