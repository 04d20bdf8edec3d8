"""
Poisoned vs clean networks: who owns more of parameter space?
=============================================================

Scherlis & Belrose's digits experiment with skorch and scikit-learn: train the 64-64-10 GELU MLP
on 8x8 digits twice — once cleanly, once *poisoned* (each batch is joined by held-out digits on
which the loss pushes probability away from the true label, Huang et al. 2020), so that the
network still fits its training set but generalises worse — and score both with accuracy and with
:func:`volsk.make_volume_scorer <volsk.integrations.make_volume_scorer>`, the log prior
probability of the neighbourhood in which the network's predictions on held-out digits stay
within a KL cutoff (Gaussian prior ``sigma = prior_sigma()``, cutoff 1e-2 nats, 100 directions
importance-sampled with the "diag_hessian" preconditioner).

The poisoning lives in a small skorch subclass, :class:`PoisonedNeuralNetClassifier`: the
poison fraction is an ordinary hyperparameter (``poison=0`` is the clean net), so
``cross_validate`` and ``GridSearchCV`` treat clean and poisoned training alike, and every fold
trains a fresh net. The recipe is :func:`volsk.experiments.digits.train_digits_mlp`'s: batches
of 64 clean digits plus ``round(64 * poison / (1 - poison))`` poison digits, loss
``(sum CE + sum reverse-CE) / batch`` plus the L2 penalty (Adam's ``weight_decay`` adds exactly
its gradient), a per-step cosine learning-rate decay from 0.05 to 0 over 25 epochs. Each split
of :class:`~sklearn.model_selection.ShuffleSplit` trains on 1024 of the 1497 non-poison digits
and holds out 473; the 300 poison digits are disjoint from both.

Run ``python examples/poisoned_vs_clean.py`` (well under a minute on one CPU thread);
``--seeds 5`` (and ``--seeds 5 --preconditioner naive``) reproduces the tables in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import ShuffleSplit, cross_validate
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler
from skorch.dataset import unpack_data
from torch.nn import functional as F

from volsk import make_volume_scorer
from volsk.experiments.digits import (
    L2_WEIGHT_DECAY,
    N_POISON,
    load_digits_splits,
    make_digits_mlp,
    poison_batch_size,
    prior_sigma,
    reverse_cross_entropy,
)
from volsk.results import LowEffectiveSampleSizeWarning, log_lower_bound

N_TRAIN = 1024


# %%
# Poisoning as a hyperparameter
# -----------------------------
# The poison pool rides along as constructor arguments, so ``clone`` (which
# ``cross_validate`` calls for every fold) copies it, and ``poison=0`` is an ordinary clean
# classifier. Only ``train_step_single`` changes: the poison examples join each batch.
class PoisonedNeuralNetClassifier(NeuralNetClassifier):
    """A skorch classifier whose every training batch is joined by poison examples.

    The module outputs logits (criterion ``CrossEntropyLoss``). Each training step adds
    ``k = poison_batch_size(b, poison)`` examples of ``(X_poison, y_poison)`` to a clean batch
    of ``b`` and minimises ``(sum CE(clean) + sum RCE(poison)) / (b + k)``, where RCE is
    :func:`~volsk.experiments.digits.reverse_cross_entropy` ``-log(1 - p_y)``. Poison examples
    are taken in order from a permutation of the pool, redrawn from a generator seeded by
    ``random_state`` whenever it runs out. ``poison=0`` trains a plain classifier.

    Parameters
    ----------
    poison : float in [0, 1), default=0.0
        Fraction of each combined batch drawn from the poison pool.
    X_poison, y_poison : array-like, optional
        The poison pool; needed when ``poison > 0``. Keep it disjoint from the data the net
        is scored on.
    random_state : int, default=0
        Seed of the poison order.
    *args, **kwargs
        Everything else goes to :class:`skorch.NeuralNetClassifier`.
    """

    def __init__(self, *args, poison=0.0, X_poison=None, y_poison=None, random_state=0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.poison = poison
        self.X_poison = X_poison
        self.y_poison = y_poison
        self.random_state = random_state

    def initialize(self):
        super().initialize()
        self.poison_rng_ = np.random.default_rng(self.random_state)
        self.poison_order_ = np.zeros(0, dtype=np.int64)
        return self

    def _take_poison(self, k):
        pool = len(self.y_poison)
        taken = []
        while k > 0:
            if self.poison_order_.size == 0:
                self.poison_order_ = self.poison_rng_.permutation(pool)
            m = min(k, self.poison_order_.size)
            taken.append(self.poison_order_[:m])
            self.poison_order_ = self.poison_order_[m:]
            k -= m
        return np.concatenate(taken)

    def train_step_single(self, batch, **fit_params):
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        y_pred = self.infer(Xi, **fit_params)
        yi = torch.as_tensor(yi, device=y_pred.device)
        b = len(yi)
        k = poison_batch_size(b, self.poison) if self.poison else 0
        total = F.cross_entropy(y_pred, yi, reduction="sum")
        if k:
            if self.X_poison is None or self.y_poison is None:
                raise ValueError("poison > 0 needs X_poison and y_poison")
            idx = self._take_poison(k)
            Xp = torch.as_tensor(np.asarray(self.X_poison)[idx], device=y_pred.device)
            yp = torch.as_tensor(np.asarray(self.y_poison)[idx], device=y_pred.device)
            total = total + reverse_cross_entropy(self.infer(Xp), yp, reduction="sum")
        loss = total / (b + k)
        loss.backward()
        return {"loss": loss, "y_pred": y_pred}


# %%
# The paper's recipe as a skorch net
# ----------------------------------
def make_net(poison, splits, *, epochs=25, batch_size=64, lr=0.05, seed=0):
    """The digits MLP (``make_digits_mlp``) as a skorch net trained with the paper's recipe."""
    steps = epochs * math.ceil(N_TRAIN / batch_size)
    return PoisonedNeuralNetClassifier(
        make_digits_mlp,
        module__seed=seed,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        optimizer__weight_decay=L2_WEIGHT_DECAY,  # ≡ the explicit L2 penalty 0.5·wd·|θ|²
        lr=lr,
        max_epochs=epochs,
        batch_size=batch_size,
        iterator_train__shuffle=True,
        train_split=None,
        classes=list(range(10)),
        callbacks=[("cosine", LRScheduler("CosineAnnealingLR", T_max=steps,
                                          step_every="batch"))],
        poison=poison,
        X_poison=splits.X_poison.numpy(),
        y_poison=splits.y_poison.numpy(),
        random_state=seed,
        verbose=0,
    )


# %%
# Accuracy and log-volume, cross-validated
# ----------------------------------------
# One ``cross_validate`` call per net scores every held-out fold twice: accuracy, and the
# log prior probability of the neighbourhood defined on that fold. The volume scorer draws its
# directions from the same seeds for every fold and net (``random_state`` 0: common random
# numbers), which makes the clean − poisoned differences less noisy.
def compare(n_seeds=3, n_samples=100, epochs=25, preconditioner="diag_hessian", poison=0.3,
            n_jobs=None):
    """Cross-validate clean and poisoned nets; one row per (net, split).

    Returns
    -------
    pandas.DataFrame
        Columns ``net``, ``split``, ``accuracy`` (held-out), ``log_volume`` (nats, KL on the
        held-out digits), ``lower_bound_95`` and ``fit_time``.
    """
    splits = load_digits_splits(n_poison=N_POISON)
    X = torch.cat([splits.X_train, splits.X_test]).numpy()
    y = torch.cat([splits.y_train, splits.y_test]).numpy()
    cv = ShuffleSplit(n_splits=n_seeds, train_size=N_TRAIN, random_state=0)
    scoring = {
        "accuracy": "accuracy",
        "log_volume": make_volume_scorer(cutoff=1e-2, sigma=prior_sigma(), n_samples=n_samples,
                                         preconditioner=preconditioner),
    }
    frames = []
    for name, fraction in (("clean", 0.0), ("poisoned", poison)):
        torch.manual_seed(0)  # skorch shuffles batches with torch's global generator
        res = cross_validate(make_net(fraction, splits, epochs=epochs), X, y, cv=cv,
                             scoring=scoring, n_jobs=n_jobs, error_score="raise")
        frames.append(pd.DataFrame({
            "net": name,
            "split": np.arange(n_seeds),
            "accuracy": res["test_accuracy"],
            "log_volume": res["test_log_volume"],
            "lower_bound_95": [log_lower_bound(v, 0.95) for v in res["test_log_volume"]],
            "fit_time": res["fit_time"],
        }))
    return pd.concat(frames, ignore_index=True)


def summarize(table):
    """Per split: how many nats more the clean net owns than the poisoned one."""
    wide = table.pivot(index="split", columns="net", values=["accuracy", "log_volume"])
    return pd.DataFrame({
        "clean_accuracy": wide["accuracy", "clean"],
        "poisoned_accuracy": wide["accuracy", "poisoned"],
        "clean_log_volume": wide["log_volume", "clean"],
        "poisoned_log_volume": wide["log_volume", "poisoned"],
        "clean_minus_poisoned_nats": wide["log_volume", "clean"] - wide["log_volume", "poisoned"],
    })


# %%
# Run it
# ------
# Three splits by default (well under a minute on one CPU thread). The numbers are estimates with
# Monte Carlo noise of a few hundred nats at 100 directions; ``benchmarks/RESULTS.md``
# discusses them with five splits and the naive estimator for contrast.
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Poisoned vs clean networks: who owns more of parameter space?")
    parser.add_argument("--seeds", type=int, default=3, help="ShuffleSplit splits (default 3)")
    parser.add_argument("--n-samples", type=int, default=100, help="directions per estimate")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--preconditioner", default="diag_hessian",
                        help='volsk preconditioner (default "diag_hessian"; "naive" for none)')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
    # the warning that says so after every fit is switched off here
    warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)
    table = compare(args.seeds, args.n_samples, args.epochs, args.preconditioner)
    with pd.option_context("display.width", 120, "display.precision", 3):
        print(table.to_string(index=False))
        print()
        summary = summarize(table)
        print(summary.to_string())
        diff = summary["clean_minus_poisoned_nats"]
        sd = diff.std(ddof=1) if diff.size > 1 else 0.0
        print(f"\nclean - poisoned: {diff.mean():.0f} ± {sd:.0f} nats "
              f"(mean ± sd over {diff.size} splits)")
    return table


if __name__ == "__main__":
    main()
