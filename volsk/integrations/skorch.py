"""The skorch callback :class:`LocalVolume`: the network's log-volume in ``net.history``.

Also :func:`dataset_inputs` (the inputs held by a skorch dataset) and the guard that keeps the
callback from touching any global random state, so training is the same with it as without it.
Users import these from ``volsk.skorch``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from numbers import Integral

import numpy as np
import torch
from skorch.callbacks import Callback
from skorch.dataset import Dataset
from skorch.utils import multi_indexing

from .._checks import is_integer
from .._seeding import base_seed
from ..estimator import LocalVolumeEstimator
from ..results import check_confidence

__all__ = ["LocalVolume", "dataset_inputs"]

_CALLBACK_OWN = ("cutoff", "measure", "preconditioner", "n_samples", "sigma", "random_state")


class LocalVolume(Callback):
    """skorch callback: record the network's log-volume in ``net.history`` every few epochs.

    At the end of every ``every``-th epoch a :class:`~volsk.LocalVolumeEstimator` is fitted to
    the net (its ``module_``; its criterion says whether the module outputs logits or
    probabilities, its ``optimizer_`` serves the "adam" preconditioners) on ``X`` and the
    result is written to the epoch's row of ``net.history`` under ``name`` (and
    ``name + "_lower_bound"`` when ``confidence`` is set).

    The callback never changes training: the estimator works on a copy of the module, and
    the global random states (torch CPU and CUDA, NumPy, Python) are restored after each
    estimate, so a run with the callback has the same weights, optimizer state and history
    as a run without it.

    Parameters
    ----------
    X : None, "train", "valid" or array-like, default=None
        Inputs the neighbourhood is defined on, in the net's input space (after any Pipeline
        steps). None or "train": the epoch's training data; "valid": its validation data.
        The KL cost runs over all of it at every evaluation: for a large training set pass a
        fixed subset.
    every : int, default=1
        Record at epochs ``every``, ``2 * every``, ...
    cutoff : float, default=1e-2
    measure : str or a volsk.measures object, default="gaussian"
    preconditioner : None, str, array-like or a volsk.preconditioners object, default=None
    n_samples : int, default=100
        Directions per estimate. Each costs about four forward passes on X.
    sigma : float, array-like, dict or {"auto", "init"}, default="auto"
        Gaussian prior scale. "auto" (the RMS of the weights) changes as the net trains; pass a
        float to compare epochs under one prior.
    confidence : float in (0, 1) or None, default=None
        Also record the lower confidence bound at this level.
    name : str, default="log_volume"
        History key.
    random_state : int, numpy RandomState or None, default=0
        Seed of the directions. An int draws the same directions at every epoch (common random
        numbers: epoch-to-epoch changes are the network's, not the sampler's). A RandomState is
        drawn from once per ``initialize``. None follows scikit-learn: the seed is drawn from
        NumPy's global RandomState once per ``initialize`` (so ``np.random.seed`` makes it
        repeatable), and that state is then restored, so training draws the same random
        numbers as without the callback.
    estimator_params : dict or None, default=None
        Further :class:`~volsk.LocalVolumeEstimator` parameters (``cost``, ``rtol``,
        ``device``, ``batch_size``, ``bounds``, ...). The parameters above are set by name, not
        here.

    Attributes
    ----------
    seed_ : int
        The seed the directions are drawn with during this training run.

    See Also
    --------
    volsk.LocalVolumeEstimator : the estimate made at each recorded epoch.
    volsk.integrations.make_volume_scorer : the same estimate as a scorer for model selection.

    Notes
    -----
    Constructor arguments are ordinary skorch callback parameters: with
    ``callbacks=[("vol", LocalVolume(...))]`` they are reachable as
    ``net.set_params(callbacks__vol__cutoff=1e-3)`` and searchable in ``GridSearchCV``.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from volsk.skorch import LocalVolume
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(64, 4)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = NeuralNetClassifier(
    ...     torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...     criterion=torch.nn.CrossEntropyLoss, max_epochs=4, train_split=None, verbose=0,
    ...     callbacks=[("vol", LocalVolume(every=2, sigma=1.0, n_samples=10))])
    >>> net = net.fit(X, y)
    >>> bool(np.isfinite(net.history[-1, "log_volume"]))
    True
    >>> "log_volume" in net.history[0]
    False
    >>> net.get_params()["callbacks__vol__n_samples"]
    10
    """

    def __init__(
        self,
        X=None,
        *,
        every=1,
        cutoff=1e-2,
        measure="gaussian",
        preconditioner=None,
        n_samples=100,
        sigma="auto",
        confidence=None,
        name="log_volume",
        random_state=0,
        estimator_params=None,
    ):
        self.X = X
        self.every = every
        self.cutoff = cutoff
        self.measure = measure
        self.preconditioner = preconditioner
        self.n_samples = n_samples
        self.sigma = sigma
        self.confidence = confidence
        self.name = name
        self.random_state = random_state
        self.estimator_params = estimator_params

    def initialize(self):
        """Reset run-time state (skorch calls this when the net is (re-)initialized)."""
        self.seed_ = self._draw_seed()
        return self

    def make_estimator(self):
        """The unfitted :class:`~volsk.LocalVolumeEstimator` used at each recorded epoch."""
        extra = dict(self.estimator_params or {})
        repeated = sorted(set(extra) & set(_CALLBACK_OWN))
        if repeated:
            raise ValueError(
                f"estimator_params repeats {repeated}: set these as LocalVolume parameters"
            )
        seed = getattr(self, "seed_", None)
        if seed is None:
            seed = self._draw_seed()
        return LocalVolumeEstimator(
            cutoff=self.cutoff,
            measure=self.measure,
            preconditioner=self.preconditioner,
            n_samples=self.n_samples,
            sigma=self.sigma,
            random_state=seed,
            **extra,
        )

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Validate the parameters once, before any epoch runs."""
        if not is_integer(self.every, 1):
            raise ValueError(f"every must be an integer >= 1, got {self.every!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.confidence is not None:
            check_confidence(self.confidence)
        if isinstance(self.X, str) and self.X not in ("train", "valid"):
            raise ValueError(f'X must be None, "train", "valid" or array-like, got {self.X!r}')
        if getattr(self, "seed_", None) is None:
            self.seed_ = self._draw_seed()
        try:
            self.make_estimator()._validate_params()
        except TypeError as exc:
            raise TypeError(f"LocalVolume estimator_params: {exc}") from None

    def on_epoch_end(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        """Estimate and record at every ``every``-th epoch."""
        epoch = int(net.history[-1, "epoch"])
        if epoch % self.every:
            return
        X = self._inputs(dataset_train, dataset_valid)
        with _global_rng_untouched():
            est = self.make_estimator().fit(net, X)
        net.history.record(self.name, float(est.log_volume_))
        if self.confidence is not None:
            net.history.record(
                f"{self.name}_lower_bound", float(est.log_volume_lower_bound(self.confidence))
            )

    def _draw_seed(self):
        rs = self.random_state
        if isinstance(rs, bool) or not (
            rs is None or isinstance(rs, Integral | np.random.RandomState)
        ):
            raise ValueError(
                f"random_state must be an int, a numpy RandomState or None, got {rs!r}"
            )
        # None draws from NumPy's global state: restored at once, so training is unchanged
        with _global_rng_untouched():
            return base_seed(rs)

    def _inputs(self, dataset_train, dataset_valid):
        if self.X is None or (isinstance(self.X, str) and self.X == "train"):
            return dataset_inputs(dataset_train)
        if isinstance(self.X, str) and self.X == "valid":
            if dataset_valid is None:
                raise ValueError(
                    'LocalVolume(X="valid") needs validation data: the net has no train_split'
                )
            return dataset_inputs(dataset_valid)
        return self.X


def dataset_inputs(dataset):
    """The inputs X held by a skorch Dataset, a ``torch.utils.data.Subset`` of one, or any
    map-style dataset of ``(X_i, y_i)`` items (stacked).

    Examples
    --------
    >>> import numpy as np
    >>> from skorch.dataset import Dataset
    >>> from volsk.skorch import dataset_inputs
    >>> dataset_inputs(Dataset(np.arange(6.0).reshape(3, 2), np.zeros(3))).shape
    (3, 2)
    """
    if isinstance(dataset, torch.utils.data.Subset):
        return multi_indexing(dataset_inputs(dataset.dataset), np.asarray(dataset.indices))
    if isinstance(dataset, Dataset):
        return dataset.X
    # no DataLoader here: iterating one draws a seed from torch's global generator
    items = [dataset[i] for i in range(len(dataset))]
    first = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    return torch.stack([torch.as_tensor(x) for x in first])


@contextmanager
def _global_rng_untouched():
    """Restore torch (CPU and initialized CUDA devices), NumPy and Python global RNG states."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is the one to keep
    py_state = random.getstate()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
