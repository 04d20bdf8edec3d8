"""A scikit-learn scorer that scores a fitted network by the log-volume of its neighbourhood.

``make_volume_scorer(**estimator_params)`` returns a callable ``scorer(estimator, X, y)`` for
``cross_validate``, ``GridSearchCV``, ``permutation_test_score`` and friends. It fits a fresh
:class:`~volsk.LocalVolumeEstimator` on the fitted model it is handed (a skorch net, a Pipeline
ending in one, or a ``torch.nn.Module``) with the neighbourhood defined on the scoring data X —
in cross-validation, the held-out fold — and returns ``log_volume_`` in nats. Greater is better:
a larger neighbourhood is a simpler network (fewer nats of information content).
"""

from __future__ import annotations

from ..costs import resolve_cost
from ..estimator import LocalVolumeEstimator
from ..results import check_confidence, log_lower_bound

__all__ = ["VolumeScorer", "make_volume_scorer"]


class VolumeScorer:
    """Score a fitted network by the log-volume of its neighbourhood on X (greater is better).

    Build it with :func:`make_volume_scorer`; the attributes below are its arguments.

    Parameters
    ----------
    estimator_params : dict
        Parameters of the :class:`~volsk.LocalVolumeEstimator` fitted at every call.
    confidence : float or None, default=None
        None scores the estimate ``log_volume_``; a level in (0, 1) scores the lower
        confidence bound ``log_volume_lower_bound(confidence)`` instead.

    See Also
    --------
    make_volume_scorer : the factory, with examples.
    """

    def __init__(self, estimator_params, confidence=None):
        self.estimator_params = dict(estimator_params)
        self.confidence = confidence

    def estimator(self):
        """A fresh, unfitted :class:`~volsk.LocalVolumeEstimator` with this scorer's parameters."""
        return LocalVolumeEstimator(**self.estimator_params)

    def __call__(self, estimator, X, y=None):
        """Fit a volume estimate on ``estimator`` (the fitted model) and X; return its log.

        Parameters
        ----------
        estimator : fitted skorch net, Pipeline ending in one, or torch.nn.Module
            The model to score. A Pipeline's earlier steps transform X first.
        X : array-like of shape (N, ...)
            The data the neighbourhood is defined on (raw, as the Pipeline receives it).
        y : array-like, optional
            Passed to the estimate only when the cost uses labels (``cost="cross_entropy"``, or
            a callable taking ``y``).

        Returns
        -------
        float
            The log-volume in nats (or its lower confidence bound).
        """
        est = self.estimator()
        labels = y if resolve_cost(est.cost).uses_labels else None
        est.fit(estimator, X, labels)
        if self.confidence is None:
            return float(est.log_volume_)
        return float(log_lower_bound(est.log_volume_, self.confidence))

    def __repr__(self):
        args = [f"{k}={v!r}" for k, v in self.estimator_params.items()]
        if self.confidence is not None:
            args.append(f"confidence={self.confidence!r}")
        return f"make_volume_scorer({', '.join(args)})"


def make_volume_scorer(*, confidence=None, **estimator_params):
    """Make a scikit-learn scorer that returns a fitted network's log-volume (nats).

    The scorer has the signature ``scorer(estimator, X, y)`` that ``cross_validate``,
    ``GridSearchCV`` (also in a ``scoring`` dict, next to ``"accuracy"``) and
    ``permutation_test_score`` expect. At each call it fits a fresh
    :class:`~volsk.LocalVolumeEstimator` to the fitted model it is handed, with the
    neighbourhood defined on the scoring data X (the held-out fold in cross-validation), and
    returns ``log_volume_``. Greater is better: a network that owns more volume is simpler.

    Parameters
    ----------
    confidence : float in (0, 1) or None, default=None
        None scores the estimate; a level scores its lower confidence bound
        ``log_volume_ + log(1 - confidence)`` instead.
    **estimator_params
        Parameters of :class:`~volsk.LocalVolumeEstimator` (``cutoff``, ``measure``, ``sigma``,
        ``n_samples``, ``preconditioner``, ...). They are validated here, so a misspelt name or
        a bad value fails at once rather than inside a grid search. ``random_state`` defaults to
        0 rather than None: every call then draws the same directions (common random numbers),
        which makes candidates and folds compared with less noise, and the scorer never draws
        from NumPy's global random state.

    Returns
    -------
    VolumeScorer
        A picklable callable ``scorer(estimator, X, y) -> float``.

    Notes
    -----
    The scored model may be a fitted skorch net (what its module outputs — probabilities for
    ``NLLLoss``, logits for ``CrossEntropyLoss`` — is read from its criterion), a fitted
    :class:`~sklearn.pipeline.Pipeline` ending in one (X goes through the earlier steps
    first, so the neighbourhood is defined on what the net actually sees), or a
    ``torch.nn.Module``. ``y`` reaches the estimate only for a cost that uses labels
    (``cost="cross_entropy"`` or a callable taking ``y``).

    Each call costs one volume estimate (about ``n_samples`` × 4 forward passes on X), so keep
    ``n_samples`` modest inside large searches.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from sklearn.model_selection import cross_validate
    >>> from volsk import make_volume_scorer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 4)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=5,
    ...                           train_split=None, verbose=0)
    >>> scorer = make_volume_scorer(cutoff=1e-2, sigma=1.0, n_samples=10)
    >>> scorer
    make_volume_scorer(cutoff=0.01, sigma=1.0, n_samples=10, random_state=0)
    >>> res = cross_validate(net, X, y, cv=2,
    ...                      scoring={"accuracy": "accuracy", "log_volume": scorer})
    >>> bool(np.all(np.isfinite(res["test_log_volume"])))
    True
    """
    params = dict(estimator_params)
    params.setdefault("random_state", 0)
    try:
        est = LocalVolumeEstimator(**params)
    except TypeError as exc:
        valid = sorted(LocalVolumeEstimator().get_params())
        raise TypeError(
            f"make_volume_scorer got a parameter LocalVolumeEstimator does not have ({exc}); "
            f"valid names: {valid}"
        ) from None
    est._validate_params()
    if confidence is not None:
        check_confidence(confidence)
    return VolumeScorer(params, confidence=confidence)
