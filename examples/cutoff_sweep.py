"""
Log-volume against cutoff: the n/2 slope and the effective dimension
====================================================================

The paper's Figure 6. For a small cutoff ε the neighbourhood is an ellipsoid, the cost being
≈ ½ δᵀHδ, and its measure scales as ε^(d/2): d log µ / d log ε = d/2, where d counts the
directions the data pins down inside the prior's bulk. With all n parameters pinned the slope
would be n/2 (dotted); flat and weakly constrained directions do not count. Twice the fitted
slope is :func:`~volsk.sweeps.effective_dimension`.

One :func:`~volsk.sweeps.sweep` call estimates the digits MLP at five cutoffs, naive and with
the diagonal-Hessian preconditioner, along the same directions at every cutoff (paired seeds).
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from volsk import LocalVolumeEstimator
from volsk.experiments.digits import prior_sigma, train_digits_mlp
from volsk.plot import plot_cutoff_sweep
from volsk.results import LowEffectiveSampleSizeWarning
from volsk.sweeps import effective_dimension, sweep

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest
# ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
# the warning that says so after every fit is switched off here
warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)

run = train_digits_mlp(epochs=25, seed=0)

base = LocalVolumeEstimator(sigma=prior_sigma(), preconditioner_eps=1e-2, n_samples=60)
grid = {"cutoff": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "preconditioner": [None, "diag_hessian"]}
frame = sweep({"digits MLP": run.model}, run.splits.X_test, grid, estimator=base,
              random_state=0)
frame[["cutoff", "preconditioner", "log_volume", "lower_bound", "ess", "n_evaluations",
       "seconds"]].round({"log_volume": 1, "lower_bound": 1, "ess": 2, "seconds": 2})

# %%
# Effective dimension
# -------------------
# Fitted over the whole range, by preconditioner (of 4810 parameters):
effective_dimension(frame).round(0)

# %%
# The two preconditioners disagree, because the effective dimension is the slope of
# *estimates*: an estimate falls short of the truth, by an amount that changes with the cutoff.
# The naive estimator almost never draws the directions in which the prior, not the cutoff,
# bounds the neighbourhood, so its estimates grow nearly as ε^(n/2) and it overstates d.
# Read d from the largest estimate at each cutoff — by Markov's inequality the most accurate
# one (the table says which preconditioner gave it):
best = frame.loc[frame.groupby("cutoff")["log_volume"].idxmax()]
print(best[["cutoff", "preconditioner", "log_volume"]].to_string(index=False))
print(f"effective dimension from the largest estimates: {effective_dimension(best, by=[]):.0f}")

# %%
# The slope is not constant. Between neighbouring cutoffs, the local slope Δ log µ / Δ log ε
# is close to n/2 at the smallest cutoffs — an ellipsoid small in every direction — and falls
# as the neighbourhood outgrows the prior along more and more directions (there the prior's
# mass, not the cutoff, bounds it). Twice the local slope, a local effective dimension:
local = frame.pivot(index="cutoff", columns="preconditioner", values="log_volume")
log_cutoff = pd.Series(np.log(local.index.to_numpy()), index=local.index)
(2 * local.diff().div(log_cutoff.diff(), axis=0)).round(0).dropna()

# %%
# The figure
# ----------
# Every estimate errs low rather than high in log space (never more than a few nats high),
# so the upper line is the better estimate at every cutoff. The preconditioner matters most
# at small cutoffs, where the neighbourhood is most elongated relative to the prior; at a
# cutoff of 1 nat it is as wide as the prior in most directions and the naive estimate
# catches up.
_fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
plot_cutoff_sweep(frame, ax=ax)
ax.set_title("Digits MLP: log-volume against KL cutoff (dotted: slope n/2)")
