"""
A language model's volume across training: Python's standard library as the corpus
==================================================================================

The paper's headline experiment in miniature. Scherlis & Belrose measure Pythia's local
volume across its training checkpoints and find that it falls as the model learns (their
Figure 4), and that log-volume grows with log cutoff at a slope d/2 below n/2 (Figure 6).
Here the model is a GPT-NeoX — Pythia's architecture, built from a config: nothing is
downloaded — with a few tens of thousands of parameters, and the corpus is text every
Python ships with: the standard library's own modules, read as bytes
(:func:`~volsk.experiments.language.load_stdlib_corpus`). Held-out sequences come from
modules the model never reads.

The prior is the model's own initialisation (``sigma="init"``): the probability that a
freshly initialised network would land in the trained network's neighbourhood.
"""

# %%
# Training, keeping checkpoints
# -----------------------------
# :func:`~volsk.experiments.language.train_language_model` keeps the weights at steps
# spaced geometrically (0, 1/16, 1/8, … of training), with the losses on 32 training and 32
# held-out sequences, in nats per byte (a uniform guess scores log 256 ≈ 5.55).
import warnings

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from volsk import LocalVolumeEstimator, effective_dimension, sweep  # noqa: E402
from volsk.experiments.language import (  # noqa: E402
    load_stdlib_corpus,
    train_language_model,
    volume_along_training,
)
from volsk.plot import plot_checkpoints, plot_cutoff_sweep  # noqa: E402
from volsk.priors import InitPriorWarning  # noqa: E402

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest

splits = load_stdlib_corpus(seq_len=64)
print(splits)
run = train_language_model(splits, steps=200, hidden_size=32, seed=0)
n_parameters = sum(p.numel() for p in run.model.parameters())
print(f"{n_parameters:,} parameters")
pd.DataFrame(run.history).round(3)

# %%
# The volume at every checkpoint
# ------------------------------
# KL cutoff 1e-2 nats per token on 16 held-out sequences (1024 bytes), 16 directions. Every
# checkpoint is probed along the same directions (``random_state=0``), so the differences
# between checkpoints are not Monte Carlo noise. The untrained network owns the most
# probability; each stretch of training costs it more.
#
# LayerNorm weights and biases start at constants, so ``sigma="init"`` floors their prior
# spread at that of the random tensors and warns about it; we have read the warning.
X = splits.heldout_subset(16)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", InitPriorWarning)
    frame = volume_along_training(run, X, cutoff=1e-2, n_samples=16, random_state=0)
frame[["step", "train_loss", "heldout_loss", "log_volume", "bits", "n_flat",
       "evals_per_dir"]].round(2)

# %%
# ``n_flat`` counts parameters that cannot change the outputs on X: the input embeddings of
# bytes that never occur in these 1024 bytes. volsk integrates them out exactly.
ax = plot_checkpoints(frame[["step", "log_volume", "heldout_loss"]], x="step",
                      accuracy_columns=["heldout_loss"])
ax.figure.axes[-1].set_ylabel("held-out loss (nats per byte)")
ax.set_title("Tiny GPT-NeoX on the standard library: log-volume falls as it learns")

# %%
# Log-volume against cutoff
# -------------------------
# The final model at five cutoffs, one :func:`volsk.sweep` call, the same directions at every
# cutoff. For a small cutoff the neighbourhood is an ellipsoid and its measure grows as
# ε^(d/2): twice the slope (:func:`volsk.effective_dimension`) counts the directions the data
# pins down, to be compared with the n/2 of the dotted reference line.
base = LocalVolumeEstimator(sigma="init", n_samples=16)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", InitPriorWarning)
    cutoffs = sweep({f"step {run.steps[-1]}": run.model}, X,
                    {"cutoff": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}, estimator=base, random_state=0)
d_eff = effective_dimension(cutoffs)
print(f"effective dimension {d_eff:,.0f} of {n_parameters:,} parameters, "
      f"{n_parameters - frame.n_flat.iloc[-1]:,} of them not flat on X")
cutoffs[["cutoff", "log_volume", "ess", "n_evaluations", "seconds"]].round(
    {"log_volume": 1, "ess": 2, "seconds": 2})

# %%
# One slope over five decades averages two regimes. Twice the local slope between
# neighbouring cutoffs, a local effective dimension: at the smallest cutoffs it is close to
# the number of parameters that are not flat — every direction pinned down — and it falls
# as the neighbourhood outgrows the prior along more and more directions, where the prior's
# mass, not the cutoff, bounds it.
log_cutoff = np.log(cutoffs["cutoff"].to_numpy())
local = 2 * np.diff(cutoffs["log_volume"].to_numpy()) / np.diff(log_cutoff)
pd.DataFrame({"from cutoff": cutoffs["cutoff"].to_numpy()[:-1],
              "to cutoff": cutoffs["cutoff"].to_numpy()[1:],
              "2 Δlog µ / Δlog ε": local.round(0)})

# %%
ax = plot_cutoff_sweep(cutoffs)
ax.set_title("Tiny GPT-NeoX: log-volume against KL cutoff (dotted: slope n/2)")
