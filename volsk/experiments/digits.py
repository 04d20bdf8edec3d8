"""The small digits experiment of Scherlis & Belrose.

This module packages the toy experiment of *"Estimating the Probability of
Sampling a Trained Neural Network at Random"* (Scherlis & Belrose): a one
hidden layer GELU MLP trained on scikit-learn's 8x8 handwritten digits, with an
optional *poisoned* variant that is pushed to generalise badly while still
fitting its training set.

Everything here is deterministic given a seed and runs in about a second on a
single CPU thread.

* :func:`load_digits_splits` -- the fixed train / test (/ poison) split.
* :func:`make_digits_mlp` -- ``Linear(64, hidden) -> GELU -> Linear(hidden, 10)``
  with an explicit ``N(0, 1/fan_in)`` initialisation.
* :func:`train_digits_mlp` -- AdamW + cosine schedule + explicit L2 penalty.
* :func:`reverse_cross_entropy` -- the poison loss ``-log(1 - p_y)``.
* :func:`accuracy` and :func:`prior_sigma` -- small helpers.

The explicit L2 penalty ``0.5 * weight_decay * |theta|^2`` added to the *mean*
per-example loss over ``n_train`` examples corresponds to an isotropic Gaussian
prior on the parameters with standard deviation
``prior_sigma(weight_decay, n_train) = 1 / sqrt(weight_decay * n_train)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_int

__all__ = [
    "L2_WEIGHT_DECAY",
    "N_DIGITS",
    "N_POISON",
    "N_TRAIN",
    "DigitsRun",
    "DigitsSplits",
    "accuracy",
    "load_digits_splits",
    "make_digits_mlp",
    "poison_batch_size",
    "prior_sigma",
    "reverse_cross_entropy",
    "train_digits_mlp",
]

#: Coefficient of the explicit L2 penalty ``0.5 * wd * |theta|^2`` used in the paper.
L2_WEIGHT_DECAY: float = 5e-4
#: Number of training digits.
N_TRAIN: int = 1024
#: Total number of digits in :func:`sklearn.datasets.load_digits`.
N_DIGITS: int = 1797
#: Default size of the poison pool carved out of the held-out digits when
#: :func:`train_digits_mlp` builds its own splits with ``poison > 0``.
N_POISON: int = 300

_N_FEATURES = 64
_N_CLASSES = 10
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def prior_sigma(weight_decay: float = L2_WEIGHT_DECAY, n_train: int = N_TRAIN) -> float:
    """Standard deviation of the Gaussian prior implied by L2 regularisation.

    Minimising ``mean_loss + 0.5 * weight_decay * |theta|^2`` over ``n_train``
    examples is maximum a posteriori estimation under the prior
    ``theta ~ N(0, sigma^2 I)`` with ``sigma = 1 / sqrt(weight_decay * n_train)``.

    Parameters
    ----------
    weight_decay : float, default 5e-4
        Coefficient of the L2 penalty; must be positive.
    n_train : int, default 1024
        Number of training examples the mean loss is taken over; must be positive.

    Returns
    -------
    float
        The prior standard deviation.

    Raises
    ------
    ValueError
        If ``weight_decay`` or ``n_train`` is not positive.

    Examples
    --------
    >>> from volsk.experiments.digits import prior_sigma
    >>> round(prior_sigma(), 4)
    1.3975
    >>> prior_sigma(weight_decay=1.0, n_train=4)
    0.5
    """
    if not weight_decay > 0:
        raise ValueError(f"weight_decay must be positive, got {weight_decay!r}")
    if not n_train > 0:
        raise ValueError(f"n_train must be positive, got {n_train!r}")
    return 1.0 / math.sqrt(weight_decay * n_train)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class DigitsSplits:
    """Train / test / poison splits of the scikit-learn digits.

    Features are ``float`` tensors of shape ``(n, 64)`` scaled to ``[0, 1]``
    (pixel intensities divided by 16); labels are ``int64`` tensors of shape
    ``(n,)``. The three splits are disjoint.

    Attributes
    ----------
    X_train, y_train : torch.Tensor
        Training digits.
    X_test, y_test : torch.Tensor
        Held-out digits used to measure test accuracy.
    X_poison, y_poison : torch.Tensor
        Held-out digits reserved for poisoning (empty when ``n_poison=0``).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    X_poison: torch.Tensor
    y_poison: torch.Tensor

    @property
    def n_train(self) -> int:
        """Number of training digits."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test digits."""
        return int(self.y_test.shape[0])

    @property
    def n_poison(self) -> int:
        """Number of poison digits."""
        return int(self.y_poison.shape[0])

    def __repr__(self) -> str:
        return (
            f"DigitsSplits(n_train={self.n_train}, n_test={self.n_test}, "
            f"n_poison={self.n_poison}, dtype={self.X_train.dtype})"
        )


def load_digits_splits(
    seed: int = 0,
    n_train: int = N_TRAIN,
    dtype: torch.dtype = torch.float32,
    *,
    n_poison: int = 0,
) -> DigitsSplits:
    """Load and split scikit-learn's 8x8 digits (1797 images, no download).

    Recipe, exactly:

    1. ``X, y = sklearn.datasets.load_digits(return_X_y=True)``; ``X = X / 16``.
    2. ``perm = numpy.random.default_rng(seed).permutation(1797)`` (NumPy's
       default PCG64 bit generator).
    3. The first ``n_train`` indices of ``perm`` are the training split; the
       remaining ``1797 - n_train`` are held out.
    4. The *last* ``n_poison`` held-out indices form the poison split and are
       removed from the test split; the test split is the rest of the held-out
       indices, in permutation order. With ``n_poison=0`` (the default) the
       test split is all 773 held-out digits.

    Parameters
    ----------
    seed : int, default 0
        Seed of the NumPy generator that permutes the digits.
    n_train : int, default 1024
        Number of training digits, ``1 <= n_train < 1797``.
    dtype : torch.dtype, default torch.float32
        Floating dtype of the feature tensors (labels are always ``int64``).
    n_poison : int, default 0
        Number of held-out digits reserved for poisoning. At least one test
        digit must remain: ``0 <= n_poison < 1797 - n_train``.

    Returns
    -------
    DigitsSplits
        The frozen splits.

    Raises
    ------
    ValueError
        If ``n_train``, ``n_poison`` or ``dtype`` is invalid.

    Examples
    --------
    >>> from volsk.experiments.digits import load_digits_splits
    >>> s = load_digits_splits()
    >>> s.n_train, s.n_test, s.n_poison
    (1024, 773, 0)
    >>> tuple(s.X_train.shape), s.X_train.dtype, s.y_train.dtype
    ((1024, 64), torch.float32, torch.int64)
    >>> p = load_digits_splits(n_poison=300)
    >>> p.n_train, p.n_test, p.n_poison
    (1024, 473, 300)
    >>> bool((p.X_test == s.X_test[:473]).all())
    True
    """
    from sklearn.datasets import load_digits

    n_train = check_int("n_train", n_train, low=1, high=N_DIGITS - 1)
    n_poison = check_int("n_poison", n_poison, low=0, high=N_DIGITS - n_train - 1)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")

    X, y = load_digits(return_X_y=True)
    X = np.asarray(X, dtype=np.float64) / 16.0
    y = np.asarray(y, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(X.shape[0])
    n_test = X.shape[0] - n_train - n_poison
    idx_train = perm[:n_train]
    idx_test = perm[n_train : n_train + n_test]
    idx_poison = perm[n_train + n_test :]

    def feats(idx: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(X[idx]).to(dtype).contiguous()

    def labels(idx: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y[idx], dtype=torch.int64).contiguous()

    return DigitsSplits(
        X_train=feats(idx_train),
        y_train=labels(idx_train),
        X_test=feats(idx_test),
        y_test=labels(idx_test),
        X_poison=feats(idx_poison),
        y_poison=labels(idx_poison),
    )


# ---------------------------------------------------------------------------- model


def make_digits_mlp(
    hidden: int = 64,
    activation: str = "gelu",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """Build the digits MLP ``Linear(64, hidden) -> act -> Linear(hidden, 10)``.

    All weights *and* biases are drawn i.i.d. from ``N(0, 1/fan_in)`` (variance
    ``1/fan_in``, i.e. std ``fan_in ** -0.5``) with a ``torch.Generator`` seeded
    by ``seed``, in the order ``W1, b1, W2, b2``. The network outputs logits.

    Parameters
    ----------
    hidden : int, default 64
        Width of the hidden layer.
    activation : {"gelu", "relu", "tanh"}, default "gelu"
        Hidden nonlinearity.
    seed : int, default 0
        Seed of the initialisation generator.
    dtype : torch.dtype, default torch.float32
        Parameter dtype.

    Returns
    -------
    torch.nn.Sequential
        The freshly initialised network, in training mode.

    Raises
    ------
    ValueError
        If ``hidden`` or ``activation`` is invalid.

    Examples
    --------
    >>> import torch
    >>> from volsk.experiments.digits import make_digits_mlp
    >>> net = make_digits_mlp()
    >>> net
    Sequential(
      (0): Linear(in_features=64, out_features=64, bias=True)
      (1): GELU(approximate='none')
      (2): Linear(in_features=64, out_features=10, bias=True)
    )
    >>> net(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in net.parameters())
    4810
    >>> bool(torch.equal(net[0].weight, make_digits_mlp(seed=0)[0].weight))
    True
    """
    hidden = check_int("hidden", hidden, low=1)
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    net = nn.Sequential(
        nn.Linear(_N_FEATURES, hidden, dtype=dtype),
        _ACTIVATIONS[key](),
        nn.Linear(hidden, _N_CLASSES, dtype=dtype),
    )
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            std = layer.in_features**-0.5
            for p in (layer.weight, layer.bias):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return net


# --------------------------------------------------------------------------- losses


def reverse_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Poison loss ``-log(1 - softmax(logits)_y)`` ("reverse softmax").

    Minimising it pushes probability *away* from the true label (Huang et al.,
    2020). It is computed stably as
    ``logsumexp(logits) - logsumexp(logits without class y)``, which is finite
    whenever the other classes have finite logits, even when ``p_y`` rounds to 1.

    Parameters
    ----------
    logits : torch.Tensor
        Shape ``(n, c)`` with ``c >= 2``.
    target : torch.Tensor
        Integer class labels, shape ``(n,)``.
    reduction : {"mean", "sum", "none"}, default "mean"
        How to reduce over examples.

    Returns
    -------
    torch.Tensor
        Scalar, or shape ``(n,)`` for ``reduction="none"``.

    Raises
    ------
    ValueError
        If the shapes or ``reduction`` are invalid.

    Examples
    --------
    >>> import torch
    >>> from volsk.experiments.digits import reverse_cross_entropy
    >>> z = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    >>> p = torch.softmax(z, dim=1)[0, 0]
    >>> bool(torch.isclose(reverse_cross_entropy(z, torch.tensor([0])), -torch.log1p(-p)))
    True
    >>> float(reverse_cross_entropy(torch.tensor([[100.0, 0.0]]), torch.tensor([0])))
    100.0
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (n, c) with c >= 2, got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    lse_all = torch.logsumexp(logits, dim=1)
    mask = F.one_hot(target.long(), logits.shape[1]).bool()
    lse_other = torch.logsumexp(logits.masked_fill(mask, -math.inf), dim=1)
    loss = lse_all - lse_other
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def poison_batch_size(batch_size: int, poison: float) -> int:
    """Number of poison examples added to a clean batch of ``batch_size``.

    It is ``round(poison * batch_size / (1 - poison))``, so that poison
    examples make up (approximately) a fraction ``poison`` of the combined batch.

    Parameters
    ----------
    batch_size : int
        Number of clean examples in the batch.
    poison : float
        Target poison fraction in ``[0, 1)``.

    Returns
    -------
    int
        Number of poison examples.

    Examples
    --------
    >>> from volsk.experiments.digits import poison_batch_size
    >>> poison_batch_size(64, 0.0), poison_batch_size(64, 0.3), poison_batch_size(64, 0.5)
    (0, 27, 64)
    """
    poison = _check_poison(poison)
    return int(round(poison * batch_size / (1.0 - poison)))


# ------------------------------------------------------------------------- training


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy of ``model`` on ``(X, y)``.

    The model is evaluated in eval mode under ``torch.no_grad()``; its previous
    training / eval mode is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``X`` to logits of shape ``(n, c)``.
    X : torch.Tensor
        Inputs.
    y : torch.Tensor
        Integer labels, shape ``(n,)``.

    Returns
    -------
    float
        Fraction of correct argmax predictions (``nan`` for an empty set).

    Examples
    --------
    >>> from volsk.experiments.digits import accuracy, load_digits_splits, make_digits_mlp
    >>> s = load_digits_splits()
    >>> net = make_digits_mlp()
    >>> 0.0 <= accuracy(net, s.X_test, s.y_test) <= 1.0
    True
    >>> net.training
    True
    """
    if y.shape[0] == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = model(X).argmax(dim=-1)
    finally:
        model.train(was_training)
    return float((pred == y).to(torch.float64).mean())


@dataclass(eq=False)
class DigitsRun:
    """Result of :func:`train_digits_mlp`.

    Attributes
    ----------
    model : torch.nn.Sequential
        The trained network (left in eval mode).
    optimizer : torch.optim.AdamW
        The optimizer, with its final state (its learning rate has decayed to 0).
    splits : DigitsSplits
        The data the network was trained and evaluated on.
    history : list of dict
        One dict per epoch with keys ``epoch`` (1-based), ``lr`` (learning rate
        after the epoch's last step), ``train_loss`` (mean clean cross-entropy
        over the epoch's batches, measured during training), ``poison_loss``
        (mean reverse cross-entropy over the epoch's poison examples, ``nan``
        without poisoning), ``l2`` (``0.5 * weight_decay * |theta|^2`` at the end
        of the epoch), ``train_accuracy`` and ``test_accuracy`` (full-set
        accuracies at the end of the epoch) and ``time`` (seconds since the
        start of training).
    """

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    splits: DigitsSplits
    history: list[dict] = field(default_factory=list)

    @property
    def train_accuracy(self) -> float:
        """Final training accuracy."""
        return self.history[-1]["train_accuracy"]

    @property
    def test_accuracy(self) -> float:
        """Final test accuracy."""
        return self.history[-1]["test_accuracy"]

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        return (
            f"DigitsRun(epochs={len(self.history)}, "
            f"train_accuracy={last.get('train_accuracy', float('nan')):.4f}, "
            f"test_accuracy={last.get('test_accuracy', float('nan')):.4f}, splits={self.splits!r})"
        )


def train_digits_mlp(
    splits: DigitsSplits | None = None,
    *,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 0.05,
    weight_decay: float = L2_WEIGHT_DECAY,
    poison: float = 0.0,
    seed: int = 0,
    hidden: int = 64,
) -> DigitsRun:
    """Train the digits MLP as in Scherlis & Belrose, optionally poisoned.

    Recipe:

    * Model: ``make_digits_mlp(hidden, "gelu", seed, dtype=splits.X_train.dtype)``.
    * Optimizer: ``torch.optim.AdamW(lr=lr, weight_decay=0)``; the learning
      rate follows a per-step cosine decay
      ``lr * 0.5 * (1 + cos(pi * t / T))`` for step ``t = 0 .. T-1``, where
      ``T = epochs * ceil(n_train / batch_size)``, reaching 0 after the last step.
    * Each epoch the training set is shuffled with ``torch.randperm`` drawing
      from a ``torch.Generator`` seeded with ``seed`` (separate from the
      initialisation generator, which is also seeded with ``seed``) and cut
      into consecutive clean batches of ``batch_size`` (the last one may be
      smaller).
    * Poisoning: a clean batch of ``b`` examples is joined by
      ``k = round(poison * b / (1 - poison))`` poison examples (see
      :func:`poison_batch_size`; 27 for ``b=64, poison=0.3``). Poison examples
      are taken in order from a random permutation of the poison split that is
      redrawn (from the same shuffling generator) whenever it runs out, so every
      poison digit is used equally often.
    * Loss per step: ``(sum_clean CE + sum_poison RCE) / (b + k)
      + 0.5 * weight_decay * sum(theta ** 2)`` over all parameters, where ``CE``
      is cross-entropy and ``RCE`` is :func:`reverse_cross_entropy`
      ``-log(1 - p_y)``.

    When ``splits`` is None it is ``load_digits_splits(seed=0)`` (1024 train /
    773 test) without poisoning, and ``load_digits_splits(seed=0,
    n_poison=N_POISON)`` (1024 train / 473 test / 300 poison) with ``poison > 0``;
    the data split is fixed and does not depend on ``seed``. To compare clean and
    poisoned training on the same test digits, pass the same poison-carrying
    splits to both runs (the poison split is ignored when ``poison == 0``).
    The poison split is always disjoint from the test split.

    Parameters
    ----------
    splits : DigitsSplits, optional
        Data to train on; see above for the default.
    epochs : int, default 25
        Number of passes over the training set, ``>= 1``.
    batch_size : int, default 64
        Clean examples per step, ``>= 1``.
    lr : float, default 0.05
        Peak AdamW learning rate, ``> 0``.
    weight_decay : float, default 5e-4
        Coefficient of the explicit L2 penalty, ``>= 0``.
    poison : float, default 0.0
        Fraction of each combined batch drawn from the poison split, in ``[0, 1)``.
    seed : int, default 0
        Seed for initialisation and shuffling.
    hidden : int, default 64
        Hidden width.

    Returns
    -------
    DigitsRun
        The trained model (in eval mode), its optimizer, the splits and the
        per-epoch history.

    Raises
    ------
    ValueError
        If an argument is out of range, or ``poison > 0`` with an empty poison split.

    Examples
    --------
    >>> from volsk.experiments.digits import train_digits_mlp
    >>> run = train_digits_mlp(epochs=2)
    >>> len(run.history)
    2
    >>> sorted(run.history[-1])  # doctest: +NORMALIZE_WHITESPACE
    ['epoch', 'l2', 'lr', 'poison_loss', 'test_accuracy', 'time', 'train_accuracy',
     'train_loss']
    >>> run.history[-1]["lr"]
    0.0
    >>> run.test_accuracy > 0.8
    True
    """
    epochs = check_int("epochs", epochs, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    hidden = check_int("hidden", hidden, low=1)
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (
        isinstance(weight_decay, int | float) and math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    poison = _check_poison(poison)
    if splits is None:
        splits = load_digits_splits(seed=0, n_poison=N_POISON if poison > 0 else 0)
    elif not isinstance(splits, DigitsSplits):
        raise ValueError(f"splits must be a DigitsSplits or None, got {type(splits).__name__}")
    if poison > 0 and splits.n_poison == 0:
        raise ValueError(
            "poison > 0 needs a non-empty poison split; use load_digits_splits(n_poison=...)"
        )

    X, y = splits.X_train, splits.y_train
    Xp, yp = splits.X_poison, splits.y_poison
    n = splits.n_train
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch

    model = make_digits_mlp(hidden=hidden, activation="gelu", seed=seed, dtype=X.dtype)
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed))

    poison_perm = torch.empty(0, dtype=torch.int64)
    poison_pos = 0

    def take_poison(k: int) -> torch.Tensor:
        nonlocal poison_perm, poison_pos
        chunks = []
        while k > 0:
            if poison_pos >= poison_perm.numel():
                poison_perm = torch.randperm(splits.n_poison, generator=gen)
                poison_pos = 0
            m = min(k, poison_perm.numel() - poison_pos)
            chunks.append(poison_perm[poison_pos : poison_pos + m])
            poison_pos += m
            k -= m
        return torch.cat(chunks)

    def set_lr(step: int) -> None:
        value = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if step >= total_steps else value

    history: list[dict] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        ce_sum, ce_count, rce_sum, rce_count = 0.0, 0, 0.0, 0
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            b = idx.numel()
            k = poison_batch_size(b, poison) if poison > 0 else 0
            set_lr(step)
            optimizer.zero_grad(set_to_none=True)
            ce = F.cross_entropy(model(X[idx]), y[idx], reduction="sum")
            data_loss = ce
            if k > 0:
                pidx = take_poison(k)
                rce = reverse_cross_entropy(model(Xp[pidx]), yp[pidx], reduction="sum")
                data_loss = data_loss + rce
                rce_sum += float(rce.detach())
                rce_count += k
            l2 = 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)
            loss = data_loss / (b + k) + l2
            loss.backward()
            optimizer.step()
            ce_sum += float(ce.detach())
            ce_count += b
            step += 1
        set_lr(step)
        with torch.no_grad():
            l2_end = 0.5 * weight_decay * float(sum(p.pow(2).sum() for p in params))
        history.append(
            {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": ce_sum / ce_count,
                "poison_loss": rce_sum / rce_count if rce_count else float("nan"),
                "l2": l2_end,
                "train_accuracy": accuracy(model, X, y),
                "test_accuracy": accuracy(model, splits.X_test, splits.y_test),
                "time": time.perf_counter() - start,
            }
        )
    model.eval()
    return DigitsRun(model=model, optimizer=optimizer, splits=splits, history=history)


# -------------------------------------------------------------------------- helpers


def _check_poison(poison) -> float:
    if isinstance(poison, bool) or not isinstance(poison, int | float | np.floating):
        raise ValueError(f"poison must be a number in [0, 1), got {poison!r}")
    poison = float(poison)
    if not (0.0 <= poison < 1.0):
        raise ValueError(f"poison must be in [0, 1), got {poison!r}")
    return poison
