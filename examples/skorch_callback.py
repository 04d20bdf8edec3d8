"""
Tracking the log-volume during training with a skorch callback
===============================================================

:class:`volsk.skorch.LocalVolume` is a skorch callback: every few epochs it estimates the
network's log-volume and writes it into ``net.history``, next to the loss and the accuracy.
It never changes training — it works on a copy of the module and restores every global random
state afterwards — so a run with the callback is the run without it, plus a column.

The network is the digits MLP as a :class:`skorch.NeuralNetClassifier`. The neighbourhood is
defined on the validation data (``X="valid"``: the 773 held-out digits), under one Gaussian
prior for all epochs (a fixed ``sigma``: the default ``"auto"`` follows the weights' scale and
would change the prior from epoch to epoch). The same directions are used at every epoch
(``random_state=0``), so epoch-to-epoch changes are the network's, not the sampler's.
"""

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.dataset import Dataset
from skorch.helper import predefined_split

from volsk.experiments.digits import (
    L2_WEIGHT_DECAY,
    load_digits_splits,
    make_digits_mlp,
    prior_sigma,
)
from volsk.results import LowEffectiveSampleSizeWarning
from volsk.skorch import LocalVolume

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest
# ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
# the warning that says so after every fit is switched off here
warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)

splits = load_digits_splits()
X_train, y_train = splits.X_train.numpy(), splits.y_train.numpy()
X_test, y_test = splits.X_test.numpy(), splits.y_test.numpy()

torch.manual_seed(0)  # skorch shuffles batches with torch's global generator
net = NeuralNetClassifier(
    make_digits_mlp,
    criterion=torch.nn.CrossEntropyLoss,  # the module outputs logits; volsk reads this
    optimizer=torch.optim.Adam,
    optimizer__weight_decay=L2_WEIGHT_DECAY,
    lr=0.01,
    max_epochs=20,
    batch_size=64,
    iterator_train__shuffle=True,
    train_split=predefined_split(Dataset(X_test, y_test)),  # valid_acc: test accuracy
    callbacks=[
        ("volume", LocalVolume("valid", every=2, cutoff=1e-2, sigma=prior_sigma(),
                               preconditioner="diag_hessian", n_samples=40,
                               confidence=0.95,
                               estimator_params={"preconditioner_eps": 1e-2})),
    ],
    verbose=0,
)
net.fit(X_train, y_train)

# %%
# The history
# -----------
# ``log_volume`` appears at epochs 2, 4, …; the other rows have no entry.
rows = [(h["epoch"], h["train_loss"], h["valid_acc"], h.get("log_volume", np.nan),
         h.get("log_volume_lower_bound", np.nan)) for h in net.history]
for epoch, loss, acc, vol, low in rows:
    if np.isfinite(vol):
        print(f"epoch {epoch:2d}  train loss {loss:.3f}  test accuracy {acc:.3f}  "
              f"log-volume {vol:9.1f} nats (95% lower bound {low:9.1f})")

# %%
# Differences between epochs are meaningful only beyond the estimate's Monte Carlo noise: with
# 40 directions per estimate that is tens to hundreds of nats on this network (the same
# directions at every epoch make the differences less noisy than the estimates themselves).
# For a paper-grade curve, raise ``n_samples`` and use the "hessian" preconditioner.
epochs = [r[0] for r in rows if np.isfinite(r[3])]
volumes = [r[3] for r in rows if np.isfinite(r[3])]
fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
ax.plot(epochs, volumes, marker="o", label="log-volume")
ax.set_xlabel("epoch")
ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
ax.set_ylabel("log-volume (nats)")
twin = ax.twinx()
twin.plot([r[0] for r in rows], [r[2] for r in rows], color="0.5", linestyle="--",
          label="test accuracy")
twin.set_ylabel("test accuracy")
ax.legend(*[a + b for a, b in zip(ax.get_legend_handles_labels(),
                                  twin.get_legend_handles_labels(), strict=True)],
          loc="lower right")  # the curves rise to the upper right: this corner is free
ax.set_title("Digits MLP (skorch): LocalVolume callback every 2 epochs")

# %%
# The callback's parameters are ordinary skorch parameters, reachable by name — so a grid
# search can vary them too:
net.get_params()["callbacks__volume__cutoff"]
