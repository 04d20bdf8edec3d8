"""
Log-volume across training checkpoints
======================================

Train the digits MLP of Scherlis & Belrose (64-64-10 GELU, 4810 parameters) for a few epochs,
saving a checkpoint after every epoch, then estimate the prior probability of each checkpoint's
neighbourhood with :func:`volsk.sweep <volsk.sweeps.sweep>`: checkpoints × three cutoffs ×
{naive, diagonal Hessian preconditioner}, 36 rows in one table.

The checkpoints are :class:`volsk.Checkpoint <volsk.sweeps.Checkpoint>` objects, loaded by the
worker that fits them, so the sweep never holds every model in memory. Directions are paired
(common random numbers): every checkpoint is probed along the same directions, so differences
between checkpoints are not swamped by Monte Carlo noise.

Runs on one CPU thread in well under a minute. To spread the rows over processes or a cluster,
wrap the call in ``joblib.parallel_config(backend="loky" | "dask", n_jobs=...)``: the table is
the same. ``python examples/checkpoints_sweep.py --output DIR`` also saves the three figures
as PNG files in DIR.
"""

import argparse
import math
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from volsk import LocalVolumeEstimator  # noqa: E402
from volsk.experiments.digits import (  # noqa: E402
    L2_WEIGHT_DECAY,
    accuracy,
    load_digits_splits,
    make_digits_mlp,
    prior_sigma,
)
from volsk.plot import plot_checkpoints, plot_cutoff_sweep, plot_samples  # noqa: E402
from volsk.results import LowEffectiveSampleSizeWarning  # noqa: E402
from volsk.sweeps import Checkpoint, effective_dimension, sweep  # noqa: E402

EPOCHS = 6
CUTOFFS = [1e-3, 1e-2, 1e-1]


# %%
# Training, with a checkpoint per epoch
# -------------------------------------
# The digits recipe, written out so that a state dict (model and optimizer) is saved after
# every epoch; each checkpoint becomes a :class:`~volsk.sweeps.Checkpoint` that a sweep worker
# loads into a fresh :func:`~volsk.experiments.digits.make_digits_mlp`.
def train_with_checkpoints(splits, folder, epochs=EPOCHS, lr=0.05, batch_size=64, seed=0):
    """The digits recipe (AdamW, cosine schedule, explicit L2), saving every epoch."""
    model = make_digits_mlp(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(splits.n_train / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / (epochs * steps_per_epoch)))
    )
    gen = torch.Generator().manual_seed(seed)
    checkpoints, history = {}, []
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(splits.n_train, generator=gen).split(batch_size):
            loss = F.cross_entropy(model(splits.X_train[idx]), splits.y_train[idx])
            loss = loss + 0.5 * L2_WEIGHT_DECAY * sum(p.pow(2).sum() for p in model.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        name = f"epoch {epoch}"
        path = Path(folder) / f"epoch_{epoch:02d}.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        checkpoints[name] = Checkpoint(path, make_digits_mlp, key="model")
        history.append({
            "model": name,
            "epoch": epoch,
            "train_accuracy": accuracy(model, splits.X_train, splits.y_train),
            "test_accuracy": accuracy(model, splits.X_test, splits.y_test),
        })
    return checkpoints, pd.DataFrame(history)


# %%
# The sweep, its tables and its figures
# -------------------------------------
# One :func:`~volsk.sweeps.sweep` call: checkpoints × cutoffs × preconditioners, 30 directions
# per row, the same seed for every row. The table is merged with the training history, so
# log-volume and accuracy can be drawn together.
def main(output=None):
    """Train, sweep, print the tables and draw the figures (saved as PNGs in ``output``)."""
    torch.set_num_threads(1)  # small ops on a shared CPU: one thread is fastest
    # ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
    # the warning that says so after every fit is switched off here
    warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)
    splits = load_digits_splits()
    with tempfile.TemporaryDirectory() as folder:
        checkpoints, history = train_with_checkpoints(splits, folder)
        print(history.to_string(index=False), "\n")

        base = LocalVolumeEstimator(sigma=prior_sigma(), n_samples=30)
        grid = {"cutoff": CUTOFFS, "preconditioner": [None, "diag_hessian"]}
        frame, samples = sweep(checkpoints, splits.X_test, grid, estimator=base,
                               random_state=0, return_samples=True)

    frame = frame.merge(history, on="model")
    columns = ["model", "cutoff", "preconditioner", "log_volume", "bits", "ess",
               "n_evaluations", "seconds", "test_accuracy"]
    with pd.option_context("display.width", 140, "display.precision", 4):
        print(frame[columns].to_string(index=False), "\n")
    print("effective dimension 2 d log µ / d log ε (of 4810 parameters):")
    print(effective_dimension(frame, by=["model", "preconditioner"]).unstack().round(0), "\n")

    at = frame[frame.cutoff == 1e-2]
    ax = plot_checkpoints(at, x="epoch", accuracy_columns=["train_accuracy", "test_accuracy"])
    ax.set_title("Digits MLP: log-volume at cutoff 1e-2 across epochs")
    if output is not None:
        ax.figure.savefig(Path(output) / "checkpoints_sweep_epochs.png", dpi=120)

    last = frame[frame.model == f"epoch {EPOCHS}"]
    ax = plot_cutoff_sweep(last)
    ax.set_title(f"Digits MLP after {EPOCHS} epochs: log-volume against cutoff")
    if output is not None:
        ax.figure.savefig(Path(output) / "checkpoints_sweep_cutoffs.png", dpi=120)

    # one panel per checkpoint, one colour per preconditioner
    axes = plot_samples(samples[samples.cutoff == 1e-2], hue="preconditioner")
    axes[0].figure.suptitle("Digits MLP, cutoff 1e-2: per-direction estimates by epoch, "
                            "dashed: aggregate log µ̂")
    if output is not None:
        axes[0].figure.savefig(Path(output) / "checkpoints_sweep_samples.png", dpi=120)
    return frame  # the figures stay open: a gallery build collects them


# %%
# Run it
# ------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Log-volume across training checkpoints")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder to save the figures in (default: not saved)")
    main(parser.parse_args().output)
