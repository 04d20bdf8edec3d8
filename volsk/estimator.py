"""LocalVolumeEstimator: the scikit-learn face of volsk. It orchestrates; it owns no math."""

from __future__ import annotations

import hashlib
import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._engine import calibrate_search, estimate_directions, prepare_problem
from ._radius import STATUS
from .costs import COSTS
from .measures import MEASURES, resolve_measure
from .preconditioners import EPS_GRID, PRECONDITIONERS, resolve_preconditioner, select_eps
from .results import (
    aggregate_log_volume,
    effective_sample_size,
    log_lower_bound,
    to_bits,
    to_log10,
)
from .skorch import resolve_model

__all__ = ["LocalVolumeEstimator"]


class LocalVolumeEstimator(BaseEstimator):
    """Estimate the prior probability (or volume) of a trained network's neighbourhood.

    The neighbourhood is the star domain around the trained weights θ in which the cost (by
    default the mean KL divergence from the trained network's predictions on X) stays below
    ``cutoff``. Its measure under a prior (Gaussian, uniform) or the Lebesgue measure is
    estimated by radial Monte Carlo over ``n_samples`` random directions, optionally importance
    sampled with a ``preconditioner``. ``-log_volume_`` is the network's information content.

    Parameters
    ----------
    cutoff : float, default=1e-2
        ε, in the cost's units (nats for "kl").
    measure : {"gaussian", "lebesgue", "uniform"} or a volsk.measures object, default="gaussian"
    preconditioner : None, str, array-like of shape (n,) or a volsk.preconditioners object
        None is the naive estimator. An array is a diagonal curvature h turned into
        P ∝ 1/(|h|^preconditioner_exponent + preconditioner_eps), normalised to det P = 1.
    n_samples : int, default=100
        Number of directions k.
    cost : {"kl", "cross_entropy", "mse"} or callable, default="kl"
        A callable is ``cost(outputs, anchor_outputs) -> scalar tensor`` (``cost(outputs,
        anchor_outputs, y)`` when y is given), written with torch operations.
    output : {"auto", "logits", "probabilities", "log_probabilities"}, default="auto"
        What the model outputs. "auto": logits for modules; read from a skorch net's criterion
        (NLLLoss → probabilities, CrossEntropyLoss → logits).
    sigma : float, array-like, dict or {"auto", "init"}, default="auto"
        Standard deviation of the Gaussian prior. "auto": RMS of θ; "init": per tensor, from
        re-initialising a copy of the model.
    bounds : float, array-like, dict or "init", default="init"
        Half-widths of the uniform prior's box.
    preconditioner_eps : float or "auto", default=1e-3
        "auto": a pilot of up to 32 directions (seeds separate from the estimate's, shared
        across the grid) at each eps in 1, 1e-1, …, 1e-6; the largest pilot estimate wins (a
        larger estimate is, with high probability, a more accurate one).
    preconditioner_exponent : float, default=0.5
    rtol : float, default=1e-3
        Boundary accuracy: |C(θ + R u) − cutoff| ≤ rtol·cutoff.
    batch_size : int or None, default=None
        Directions evaluated together (None: chosen from a memory budget). Results do not
        depend on it.
    data_batch_size : int or None, default=None
        Examples of X per forward pass (None: all of X at once). The cost over batches equals
        the full-batch cost (an exact weighted mean, token masks included), so results do not
        depend on it beyond rounding. X may also be a ``torch.utils.data.DataLoader`` (not
        shuffling): its batches are used as they come.
    device : "auto", str or torch.device, default="auto"
        Where to evaluate ("auto": cuda when available). The user's model is never moved.
    random_state : int, RandomState instance or None, default=None
        Direction i is drawn from a generator seeded by (random_state, i).
    n_jobs : int or None, default=None
        joblib workers over directions (None: 1 unless a ``joblib.parallel_config`` says
        otherwise; -1: all CPUs). Results are identical whatever the number of workers and the
        backend; with process backends the prepared problem (a copy of the model and X) is
        sent to each worker.
    verbose : int, default=0
        > 0 shows a progress bar.

    Attributes
    ----------
    log_volume_ : float
        log µ̂ in nats (+inf for an unbounded Lebesgue volume).
    log10_volume_ : float
    bits_ : float or None
        −log2 µ̂, the description length, for probability measures (None for Lebesgue).
    sample_log_volumes_ : ndarray of shape (k,)
        Per-direction log estimates ℓ_i; ``log_volume_ = logsumexp(ℓ) − log k``.
    radii_ : ndarray of shape (k,)
    n_parameters_ : int
    n_evaluations_ : int
        Cost evaluations spent by the directions' radius searches.
    n_pilot_evaluations_ : int
        Cost evaluations spent by the search pilot (8 directions from a separate seed stream,
        each searched to rtol 1e-2 from its Taylor guess — one JVP, counted as one
        evaluation — and measured twice more around its crossing). It fixes where every
        direction's search starts and how the cost grows there; it does not enter the
        estimate.
    effective_sample_size_ : float
    samples_ : pandas.DataFrame
        One row per direction: log_volume, radius, cost_at_radius, log_weight, evaluations…
    flat_parameters_ : list of str
        Parameters that cannot change the outputs on X (integrated out under probability
        measures; they make the Lebesgue volume infinite).
    seed_ : int
        The base seed the directions were drawn with.
    preconditioner_eps_ : float or None
        The eps used (the pilot's choice when ``preconditioner_eps="auto"``; None for the
        naive estimator, whose map does not depend on eps).
    eps_pilot_ : pandas.DataFrame or None
        With ``preconditioner_eps="auto"``: one row per eps of the grid (pilot log-volume, max
        and median sample, ESS, evaluations per direction, selected).

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(32, 4)
    >>> est = LocalVolumeEstimator(cutoff=1e-2, sigma=1.0, n_samples=20, random_state=0)
    >>> est.fit(net, X).log_volume_ < 0
    True
    >>> est.log_volume_lower_bound(0.95) < est.log_volume_
    True

    Notes
    -----
    Only trainable parameters (``requires_grad=True``) are perturbed and counted in
    ``n_parameters_``; frozen parameters and buffers (e.g. BatchNorm running statistics) keep
    their values, and the model is evaluated as in eval mode (dropout off, running statistics
    used) on a private copy — the model passed in is never modified. ``sigma="init"`` and
    ``bounds="init"`` also centre the prior on the initialisation's mean (1 for
    LayerNorm/BatchNorm weights) unless the measure's ``mean`` is given.

    References
    ----------
    Scherlis & Belrose, "Estimating the Probability of Sampling a Trained Neural Network at
    Random".
    """

    _doc_link_module = "volsk"
    _doc_link_template = "https://volsk.readthedocs.io/en/latest/api/{estimator_name}.html"

    _parameter_constraints: dict = {
        "cutoff": [Interval(Real, 0, None, closed="neither")],
        "measure": [StrOptions(set(MEASURES)), HasMethods(["bind"])],
        "preconditioner": [
            None,
            StrOptions(set(PRECONDITIONERS) | {"naive"}),
            "array-like",
            HasMethods(["bind"]),
        ],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "cost": [StrOptions(set(COSTS)), callable],
        "output": [StrOptions({"auto", "logits", "probabilities", "log_probabilities"})],
        "sigma": [
            Interval(Real, 0, None, closed="neither"),
            StrOptions({"auto", "init"}),
            "array-like",
            dict,
        ],
        "bounds": [Interval(Real, 0, None, closed="neither"), StrOptions({"init"}), "array-like",
                   dict],
        "preconditioner_eps": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "preconditioner_exponent": [Interval(Real, 0, None, closed="left")],
        "rtol": [Interval(Real, 0, 1, closed="neither")],
        "batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "data_batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "device": [StrOptions({"auto"}), str, torch.device],
        "random_state": ["random_state"],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        cutoff=1e-2,
        measure="gaussian",
        preconditioner=None,
        n_samples=100,
        *,
        cost="kl",
        output="auto",
        sigma="auto",
        bounds="init",
        preconditioner_eps=1e-3,
        preconditioner_exponent=0.5,
        rtol=1e-3,
        batch_size=None,
        data_batch_size=None,
        device="auto",
        random_state=None,
        n_jobs=None,
        verbose=0,
    ):
        self.cutoff = cutoff
        self.measure = measure
        self.preconditioner = preconditioner
        self.n_samples = n_samples
        self.cost = cost
        self.output = output
        self.sigma = sigma
        self.bounds = bounds
        self.preconditioner_eps = preconditioner_eps
        self.preconditioner_exponent = preconditioner_exponent
        self.rtol = rtol
        self.batch_size = batch_size
        self.data_batch_size = data_batch_size
        self.device = device
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.non_deterministic = True
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        return tags

    # ---------------------------------------------------------------------------------- fitting
    def fit(self, model, X, y=None, *, optimizer=None, attention_mask=None):
        """Record the anchor θ and its outputs on X, then estimate the neighbourhood's measure.

        Parameters
        ----------
        model : torch.nn.Module, fitted skorch net or Pipeline ending in one
            Never modified (parameters, buffers, device, mode, requires_grad, grads).
        X : array-like or torch.Tensor of shape (N, ...)
            Inputs on which the neighbourhood is defined.
        y : array-like, optional
            Labels, for cost="cross_entropy" (or a callable cost taking them).
        optimizer : torch.optim.Optimizer, optional
            Optimizer state for the "adam" preconditioners.
        attention_mask : array-like of shape (N, T), optional
            For sequence outputs (N, T, V): tokens where the mask is 0 are ignored.

        Returns
        -------
        self

        Examples
        --------
        >>> import torch
        >>> from volsk import LocalVolumeEstimator
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        >>> X = torch.linspace(-1, 1, 24).reshape(8, 3)
        >>> est = LocalVolumeEstimator(cutoff=1e-2, sigma=1.0, n_samples=8, random_state=0)
        >>> est.fit(net, X).sample_log_volumes_.shape
        (8,)
        """
        return self._fit(model, X, y, self.n_samples, optimizer, attention_mask)

    def _fit(self, model, X, y, n_samples, optimizer, attention_mask):
        self._validate_params()
        self._check_values()
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("__")]:
            delattr(self, attr)
        self._problem = None
        self.seed_ = self._base_seed()
        auto = isinstance(self.preconditioner_eps, str)  # "auto": pilot over EPS_GRID
        eps = EPS_GRID[0] if auto else float(self.preconditioner_eps)
        problem = self._prepare(model, X, y, optimizer, attention_mask, n_samples, eps)
        self.eps_pilot_ = None
        if auto:
            eps, self.eps_pilot_, problem = select_eps(
                problem, n_directions=min(32, n_samples), random_state=self.seed_
            )
        self.preconditioner_eps_ = eps  # None: P does not depend on eps (naive)
        self._records = self._estimate(problem, range(n_samples))
        self._fingerprint = self._fingerprint_of(problem)
        self._finish(problem)
        return self

    def partial_fit(self, model, X, y=None, *, n_samples=None, optimizer=None,
                    attention_mask=None):
        """Add ``n_samples`` directions (default: the ``n_samples`` parameter) to the estimate.

        With the same ``random_state``, ``fit`` with k = 200 equals ``fit`` with k = 100
        followed by ``partial_fit(n_samples=100)``, sample for sample. A model or X other than
        the fitted ones raises ValueError.

        Returns
        -------
        self

        Examples
        --------
        >>> import torch
        >>> from volsk import LocalVolumeEstimator
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        >>> X = torch.linspace(-1, 1, 24).reshape(8, 3)
        >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0).fit(net, X)
        >>> est.partial_fit(net, X, n_samples=4).sample_log_volumes_.shape
        (8,)
        >>> long = LocalVolumeEstimator(sigma=1.0, n_samples=8, random_state=0).fit(net, X)
        >>> bool((long.sample_log_volumes_ == est.sample_log_volumes_).all())
        True
        """
        extra = self.n_samples if n_samples is None else n_samples
        if not isinstance(extra, Integral) or extra < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if not hasattr(self, "log_volume_"):
            return self._fit(model, X, y, int(extra), optimizer, attention_mask)
        self._validate_params()
        eps = EPS_GRID[0] if self.preconditioner_eps_ is None else self.preconditioner_eps_
        problem = self._prepare(model, X, y, optimizer, attention_mask, int(extra), eps)
        if self._fingerprint_of(problem) != self._fingerprint:
            raise ValueError(
                "partial_fit got a different model or different X than fit: an estimate can "
                "only be extended on the same anchor and data. Call fit to start a new one."
            )
        start = len(self._records["index"])
        new = self._estimate(problem, range(start, start + extra))
        self._records = {k: np.concatenate([self._records[k], new[k]]) for k in new}
        self._finish(problem)
        return self

    def _estimate(self, problem, indices):
        """Run directions ``indices``, split over ``n_jobs`` joblib workers when asked.

        Direction i depends only on (seed, i), so the records are identical whatever the
        number of workers or the backend (``joblib.parallel_config`` chosen by the user wins).
        """
        indices = np.asarray(list(indices), dtype=np.int64)
        # where every radius search starts: a pilot that depends on the problem and the seed
        # only (computed once, here, not in each worker)
        start = calibrate_search(problem, self.seed_)
        self.n_pilot_evaluations_ = start.evaluations
        workers = min(effective_n_jobs(self.n_jobs), indices.size)
        if workers <= 1:
            return estimate_directions(problem, indices, self.seed_,
                                       progress=self._progress(indices.size), start=start)
        chunks = np.array_split(indices, workers)
        parts = Parallel(n_jobs=self.n_jobs)(
            delayed(estimate_directions)(problem, chunk, self.seed_, start=start)
            for chunk in chunks
        )
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _check_values(self):
        if not np.isfinite(self.cutoff):
            raise ValueError(f"cutoff must be a finite number > 0, got {self.cutoff!r}")

    def _base_seed(self):
        if isinstance(self.random_state, Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _device(self):
        if isinstance(self.device, str) and self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _progress(self, total):
        if not self.verbose:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="directions", leave=False)

    def _prepare(self, model, X, y, optimizer, attention_mask, n_directions, eps):
        batches = batch_y = None
        if isinstance(X, torch.utils.data.DataLoader):
            if y is not None or attention_mask is not None:
                raise ValueError(
                    "X is a DataLoader: its batches carry the labels and masks; pass y=None "
                    "and attention_mask=None"
                )
            batches, batch_y = batches_from_loader(X)
            X = None
        resolved = resolve_model(model, X)
        X = _as_input(resolved.X) if batches is None else None
        output = resolved.output if self.output == "auto" else self.output
        if y is not None:
            y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
            if y.shape[0] != _n_examples(X):
                raise ValueError(
                    f"y has {y.shape[0]} entries but X has {_n_examples(X)} examples"
                )
        if attention_mask is not None:
            attention_mask = torch.as_tensor(np.asarray(attention_mask))
        optimizer = optimizer if optimizer is not None else resolved.optimizer
        return prepare_problem(
            resolved.module,
            X,
            cost=self.cost,
            output=output,
            cutoff=self.cutoff,
            rtol=self.rtol,
            measure=resolve_measure(self.measure, sigma=self.sigma, bounds=self.bounds),
            preconditioner=resolve_preconditioner(self.preconditioner),
            eps=eps,
            exponent=self.preconditioner_exponent,
            device=self._device(),
            batch_size=self.batch_size,
            n_directions=n_directions,
            y=y,
            attention_mask=attention_mask,
            optimizer=optimizer,
            random_state=self.seed_,
            data_batch_size=self.data_batch_size,
            batches=batches,
            batch_y=batch_y,
        )

    @staticmethod
    def _fingerprint_of(problem):
        h = hashlib.sha256()
        h.update(problem.evaluator.theta.cpu().numpy().tobytes())

        def feed(value):
            if isinstance(value, torch.Tensor):
                # raw bytes, so that dtypes NumPy lacks (bfloat16) hash too
                raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                h.update(str(value.dtype).encode() + raw.numpy().tobytes())
            elif isinstance(value, dict):
                for k in sorted(value):
                    feed(value[k])
            elif isinstance(value, (tuple, list)):
                for v in value:
                    feed(v)

        for batch in problem.evaluator.batches:
            feed(batch.X)
            feed(batch.kwargs)
        return h.hexdigest()

    def _finish(self, problem):
        """Set the fitted attributes from the per-direction records."""
        rec = self._records
        space = problem.evaluator.space
        log_volume = aggregate_log_volume(rec["log_volume"])
        if np.isneginf(log_volume) and not problem.is_probability:
            raise ValueError("every direction has zero radius; the neighbourhood is empty")
        if np.isneginf(log_volume):
            raise ValueError(
                "every direction gives zero prior mass (for a uniform prior: no ray meets the "
                "box, or every ray crosses the cutoff before entering it). Widen the prior "
                "(bounds/sigma) or center it on the anchor (mean)."
            )
        self._problem = problem
        self.n_parameters_ = space.n
        self.flat_parameters_ = space.coordinate_names(problem.flat)
        self.sample_log_volumes_ = rec["log_volume"].astype(np.float64)
        self.radii_ = rec["radius"].astype(np.float64)
        self.n_evaluations_ = int(rec["evaluations"].sum())
        self.effective_sample_size_ = effective_sample_size(self.sample_log_volumes_)
        if not problem.is_probability:
            unbounded = int(np.isposinf(self.radii_).sum())
            if unbounded:
                warnings.warn(
                    f"{unbounded} of {self.radii_.size} directions never reached the cutoff "
                    "(a flat direction): the Lebesgue volume is infinite. Use a probability "
                    "measure (gaussian, uniform) for a finite answer.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if problem.flat.size:
                names = ", ".join(self.flat_parameters_[:10])
                more = "" if problem.flat.size <= 10 else f" and {problem.flat.size - 10} more"
                warnings.warn(
                    f"{problem.flat.size} parameter(s) cannot change the outputs on X ({names}"
                    f"{more}): the neighbourhood is a cylinder of infinite Lebesgue volume. Under "
                    "a gaussian or uniform prior they are integrated out exactly.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                log_volume = np.inf
        self.log_volume_ = float(log_volume)
        self.log10_volume_ = to_log10(self.log_volume_)
        self.bits_ = to_bits(self.log_volume_) if problem.is_probability else None
        frame = pd.DataFrame(
            {
                "direction": rec["index"].astype(np.int64),
                "log_volume": self.sample_log_volumes_,
                "radius": self.radii_,
                "cost_at_radius": rec["cost_at_radius"],
                "log_weight": rec["log_weight"],
                "log_radial_integral": rec["log_radial_integral"],
                "evaluations": rec["evaluations"].astype(np.int64),
                "status": pd.Categorical(
                    [STATUS[int(s)] for s in rec["status"]], categories=list(STATUS.values())
                ),
            }
        )
        self.samples_ = frame

    # ---------------------------------------------------------------------------------- results
    def log_volume_lower_bound(self, confidence=0.95):
        """Lower confidence bound on log µ at level ``confidence`` (Markov: log µ̂ + log(1 − c)).

        Examples
        --------
        >>> import torch
        >>> from volsk import LocalVolumeEstimator
        >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=5, random_state=0)
        >>> est = est.fit(torch.nn.Linear(3, 2), torch.ones(4, 3))
        >>> bool(est.log_volume_lower_bound(0.99) < est.log_volume_)
        True
        """
        check_is_fitted(self, "log_volume_")
        return log_lower_bound(self.log_volume_, confidence)

    def score(self, X=None, y=None):
        """The log-volume (nats). With X: of the neighbourhood defined on X instead.

        The neighbourhood on new X is estimated with the same directions (same seed and
        ``n_samples``) around the same anchor.

        Examples
        --------
        >>> import torch
        >>> from volsk import LocalVolumeEstimator
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        >>> X = torch.linspace(-1, 1, 24).reshape(8, 3)
        >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0).fit(net, X)
        >>> est.score() == est.log_volume_
        True
        >>> bool(abs(est.score(X) - est.log_volume_) < 1e-9)
        True
        """
        check_is_fitted(self, "log_volume_")
        if X is None:
            return self.log_volume_
        problem = getattr(self, "_problem", None)
        if problem is None:
            raise ValueError(
                "score(X) needs the fitted model, which is not kept when the estimator is "
                "pickled; call fit(model, X) again"
            )
        other = clone_with_data(self, problem, X, y)
        return other.log_volume_

    def results_frame(self):
        """A one-row DataFrame of the estimate and its diagnostics (for tables and sweeps).

        Examples
        --------
        >>> import torch
        >>> from volsk import LocalVolumeEstimator
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        >>> X = torch.linspace(-1, 1, 24).reshape(8, 3)
        >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0).fit(net, X)
        >>> list(est.results_frame().columns[:4])
        ['log_volume', 'log10_volume', 'bits', 'lower_bound']
        """
        check_is_fitted(self, "log_volume_")
        return pd.DataFrame(
            [
                {
                    "log_volume": self.log_volume_,
                    "log10_volume": self.log10_volume_,
                    "bits": self.bits_,
                    "lower_bound": self.log_volume_lower_bound(),
                    "ess": self.effective_sample_size_,
                    "n_samples": self.sample_log_volumes_.size,
                    "n_parameters": self.n_parameters_,
                    "n_evaluations": self.n_evaluations_,
                    "evaluations_per_direction": self.n_evaluations_
                    / max(1, self.sample_log_volumes_.size),
                    "max_sample": float(np.max(self.sample_log_volumes_)),
                    "median_sample": float(np.median(self.sample_log_volumes_)),
                }
            ]
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_problem", None)  # holds a model copy: never pickled with the results
        return state


def clone_with_data(est, problem, X, y):
    """Estimate on new X around the stored anchor (private helper of ``score``)."""
    from sklearn.base import clone

    other = clone(est)
    eps = est.preconditioner_eps if est.preconditioner_eps_ is None else est.preconditioner_eps_
    other.set_params(random_state=est.seed_, n_samples=est.sample_log_volumes_.size,
                     preconditioner_eps=eps)
    return other.fit(problem.evaluator.module, X, y)


def _as_input(X):
    """Check X (non-empty, finite) and turn it into tensors; dicts/tuples of arrays allowed."""
    if isinstance(X, dict):
        return {k: _as_input(v) for k, v in X.items()}
    if isinstance(X, tuple):
        return tuple(_as_input(v) for v in X)
    if not isinstance(X, torch.Tensor):
        try:
            arr = np.asarray(X)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad X
            raise TypeError(f"X must be an array-like or a torch.Tensor ({exc})") from None
        if arr.dtype == object:
            raise TypeError("X must be a numeric array-like or a torch.Tensor")
        X = torch.as_tensor(arr.astype(np.float32) if arr.dtype == np.float64 else arr)
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(f"X must hold at least one example, got shape {tuple(X.shape)}")
    if torch.is_floating_point(X) and not torch.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X


def batches_from_loader(loader):
    """Materialise a DataLoader's batches once (CPU tensors) so every evaluation sees the same
    data: items are tensors, ``(x, y)`` pairs or dicts (Hugging Face style; ``"labels"`` is
    taken as y, ``"attention_mask"`` is passed to the model and masks the cost)."""
    from ._evaluate import DataBatch

    batches, ys = [], []
    for item in loader:
        y = None
        if isinstance(item, dict):
            item = dict(item)
            y = item.pop("labels", None)
            x = {k: _as_input(v) for k, v in item.items()}
        elif isinstance(item, (tuple, list)):
            x = _as_input(item[0])
            y = item[1] if len(item) > 1 else None
        else:
            x = _as_input(item)
        n = _n_examples(x)
        batches.append(DataBatch(x, {}, n))
        ys.append(None if y is None else torch.as_tensor(y))
    if not batches:
        raise ValueError("X is an empty DataLoader: it must yield at least one batch")
    if any(v is None for v in ys) and not all(v is None for v in ys):
        raise ValueError("the DataLoader yields labels for some batches and not for others")
    return batches, ys


def _n_examples(X):
    if isinstance(X, dict):
        return int(next(iter(X.values())).shape[0])
    if isinstance(X, tuple):
        return int(X[0].shape[0])
    return int(X.shape[0])
