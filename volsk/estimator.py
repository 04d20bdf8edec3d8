"""LocalVolumeEstimator: the scikit-learn face of volsk. It orchestrates; it owns no math."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _pipeline as pipeline
from ._checks import is_integer
from ._evaluate_large import EVALUATIONS
from ._fingerprint import AsFloat64, fingerprint
from ._sampling import GENERATORS, resolve_generator
from ._seeding import base_seed
from ._threads import fit_threads
from .costs import COSTS, OUTPUT_KINDS, Cost
from .measures import MEASURES, resolve_measure
from .preconditioners import EPS_GRID, PRECONDITIONERS, resolve_preconditioner
from .preconditioners.selection import DEFAULT_EXPONENT
from .results import (
    DirectionRecords,
    LowEffectiveSampleSizeWarning,
    aggregate_log_volume,
    bootstrap_interval,
    effective_sample_size,
    log_lower_bound,
    to_bits,
    to_log10,
    top_sample_share,
)

__all__ = ["LocalVolumeEstimator"]

# warn that the estimate rests on one direction when at least this many were drawn
ESS_WARNING_MIN_SAMPLES = 10
ESS_WARNING_BELOW = 1.5


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
    cost : {"kl", "cross_entropy", "mse"}, callable or volsk.costs.Cost, default="kl"
        A callable is ``cost(outputs, anchor_outputs) -> scalar tensor`` (``cost(outputs,
        anchor_outputs, y)`` when y is given), written with torch operations. A
        :class:`volsk.costs.Cost` object carries options, e.g. ``KL(top_k=100)`` or
        ``KL(anchor_dtype=torch.bfloat16)`` for a language model's large vocabulary.
    output : str, default="auto"
        What the model outputs: "auto", "logits", "probabilities", "log_probabilities",
        "binary_logits" or "binary_probabilities". "auto": read from a skorch net's criterion
        (NLLLoss → probabilities, CrossEntropyLoss → logits, BCEWithLogitsLoss →
        binary_logits, BCELoss → binary_probabilities); for a plain module from the outputs'
        shape: (N, 1) is a binary classifier's logit, (N, C) logits (with a warning when the
        rows look like
        probabilities). "binary_*": one output per example, (N, 1) or (N,), the logit or the
        probability of class 1 (the KL is then between Bernoulli distributions). The "kl" and
        "cross_entropy" costs refuse outputs they cannot read as a distribution per example.
    sigma : float, array-like, dict or {"auto", "init"}, default="auto"
        Standard deviation of the Gaussian prior. "auto": RMS of θ; "init": per tensor, from
        re-initialising a copy of the model.
    bounds : float, array-like, dict or "init", default="init"
        Half-widths of the uniform prior's box.
    preconditioner_eps : float or "auto", default="auto"
        The regulariser ε of P ∝ 1/(|h|^exponent + ε), in units of |h|^exponent (unused by
        the naive estimator). "auto": chosen by a pilot of 8 directions per eps (seeds apart
        from the estimate's, the same at every eps) over a log-scale search — the coarse grid
        1, 1e-2, 1e-4, 1e-6 (extended by 100× steps past an end that keeps winning), then the
        winner × 10^{±1/2}, × 10^{±1} — keeping the *largest* eps whose pilot log-volume is
        within log(8/0.05) ≈ 5.1 nats of the best (a larger estimate is, with high
        probability, a more accurate one: Markov's inequality bounds how far 8 pilot
        estimates can overshoot, P ≤ 8e^{−t} = 0.05 at t ≈ 5.1 nats; within that the mildest
        map is preferred). Typically 64 pilot directions; see
        :func:`volsk.preconditioners.choose_eps`. A float fixes ε.
    preconditioner_exponent : float or "auto", default=0.5
        The exponent of P ∝ 1/(|h|^exponent + ε); 0.5 gives H^{−1/2}, exact for a quadratic
        cost. "auto": chosen with ε by the same pilot directions — ε's search runs for each
        exponent of 0.25, 0.5 and 1, and among the (exponent, ε) whose pilot log-volume is
        within the same 5.1 nats of the best, 0.5 is kept if it is there, else the smaller
        exponent, then the larger ε (about three times ε's pilot; with a numeric
        ``preconditioner_eps`` the exponents are compared at that ε, which is in units of
        |h|^exponent). See :func:`volsk.preconditioners.choose_exponent`.
    rtol : float, default=1e-3
        Boundary accuracy: |C(θ + R u) − cutoff| ≤ rtol·cutoff.
    batch_size : int or None, default=None
        Directions evaluated together (None: chosen from a memory budget). Results do not
        depend on it.
    data_batch_size : int or None, default=None
        Examples of X per forward pass. None: all of X at once, except in the large-model
        evaluation mode, which splits X so that one batch's outputs take at most 32 MiB on
        the CPU (a language model's tokens × vocabulary logits; on a GPU an eighth of the
        free memory budget). The cost over batches equals
        the full-batch cost (an exact weighted mean, token masks included), so results do not
        depend on it beyond rounding. X may also be a ``torch.utils.data.DataLoader`` (not
        shuffling): its batches are used as they come.
    evaluation : {"auto", "vmap", "large"}, default="auto"
        How the model is evaluated. "vmap": many directions per forward pass (vmapped over
        stacked parameter vectors). "large": one direction per forward pass through one
        perturbed copy of the parameters, each direction generated block by block from its
        seed — a fit's memory is then the model's copy, one perturbed copy, one direction and
        one data batch's activations, whatever ``n_samples`` is (``batch_size`` is unused).
        "auto": "large" for models of 2**20 trainable parameters or more, or when two
        vmapped directions do not fit the memory budget. The directions are the same; the
        results differ by float rounding only.
    device : "auto", str or torch.device, default="auto"
        Where to evaluate ("auto": cuda when available). The user's model is never moved.
    generator : {"auto", "host", "device"}, default="auto"
        Where each direction's normals are drawn. "host": NumPy's PCG64 seeded by
        (random_state, i), drawn on the host and copied to the device — direction i is the
        same float64 vector on every machine and device. "device": torch's generator on the
        fit's device (Philox on CUDA, MT19937 on the CPU), re-seeded from (random_state, i)
        for each fixed chunk of 2**15 coordinates — no host round trip per direction; direction
        i is the same whatever ``batch_size``, ``data_batch_size``, ``n_jobs``, the joblib
        backend, the number of workers or GPUs, shard splits, ``evaluation`` and
        ``partial_fit``, on one device type (on CUDA: one GPU model and torch version), but
        another vector on the CPU than on CUDA, so estimates from the two agree statistically,
        not bit for bit. "auto": "device" when the fit's device is CUDA, else "host". With
        either, per-direction scalars are reduced in float64 (block by block in the
        large-model mode: the modes agree to rounding). See ``generator_``.
    random_state : int, RandomState instance or None, default=None
        Direction i is drawn from a generator seeded by (random_state, i).
    n_jobs : int or None, default=None
        joblib workers over directions (None: 1 unless a ``joblib.parallel_config`` says
        otherwise; -1: all CPUs). Results are identical whatever the number of workers and the
        backend; with process backends the prepared problem (a copy of the model and X) is
        sent to each worker.
    n_threads : "auto", int or None, default="auto"
        torch's intra-op threads during ``fit``, ``partial_fit`` and ``score`` (the caller's
        setting is restored afterwards, also when the fit raises or is interrupted). "auto":
        one thread for models of fewer than 5 000 000 trainable parameters — small operations
        gain nothing from threads, and on a machine whose cores are busy several threads make
        a fit many times slower — and torch's own setting for larger models, where threads on
        idle cores pay (``benchmarks/threads.py`` measures it: ``benchmarks/RESULTS.md``).
        None: leave torch's setting as it is. The thread count changes results at most by
        rounding (it can change how a large matrix product is summed).
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
        Kish's (Σw)²/Σw² of the per-direction estimates: near 1 when one direction carries
        the estimate (then a ``LowEffectiveSampleSizeWarning`` is given for k ≥ 10).
    top_sample_share_ : float
        The fraction of µ̂ from the largest per-direction estimate.
    samples_ : pandas.DataFrame
        One row per direction: log_volume, radius, cost_at_radius, log_weight, evaluations…
    flat_parameters_ : volsk.results.FlatCoordinates
        Parameter coordinates that cannot change the outputs on X (integrated out under
        probability measures; they make the Lebesgue volume infinite): a read-only sequence
        of names such as ``"0.weight[3, 7]"`` that compares equal to a list of them, held as
        runs of consecutive coordinates (a language model's unused embedding rows are
        millions); ``.counts()`` gives them per parameter tensor.
    seed_ : int
        The base seed the directions were drawn with.
    generator_ : {"host", "device"}
        The direction generator used (``generator`` with "auto" resolved).
    preconditioner_eps_ : float or None
        The eps used (the pilot's choice when ``preconditioner_eps="auto"``; None for the
        naive estimator, whose map does not depend on eps).
    preconditioner_exponent_ : float or None
        The exponent used (the pilot's choice when ``preconditioner_exponent="auto"``, else
        the one given; None for the naive estimator, whose map does not depend on it).
    eps_pilot_ : pandas.DataFrame or None
        With ``preconditioner_eps="auto"`` or ``preconditioner_exponent="auto"``: one row per
        (exponent, eps) tried, by exponent then decreasing eps (exponent, eps, stage, pilot
        log-volume, max and median sample, ESS, evaluations per direction, directions,
        selected); empty when the map does not depend on eps. None when both are numbers.
    boundary_pilot_ : pandas.DataFrame or None
        With a boundary-fitted preconditioner (``"boundary"``, ``BoundaryFitted``): one row per
        round of its fit (round, groups, directions, pilot log-volume, max sample, ESS,
        evaluations per direction, accepted, selected); its pilots' evaluations are counted
        in ``n_pilot_evaluations_``. None otherwise.

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
        "cost": [StrOptions(set(COSTS)), callable, Cost],
        "output": [StrOptions({"auto", *OUTPUT_KINDS})],
        "sigma": [
            Interval(Real, 0, None, closed="neither"),
            StrOptions({"auto", "init"}),
            "array-like",
            dict,
        ],
        "bounds": [Interval(Real, 0, None, closed="neither"), StrOptions({"init"}), "array-like",
                   dict],
        "preconditioner_eps": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "preconditioner_exponent": [Interval(Real, 0, None, closed="left"),
                                    StrOptions({"auto"})],
        "rtol": [Interval(Real, 0, 1, closed="neither")],
        "batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "data_batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "evaluation": [StrOptions(set(EVALUATIONS))],
        "device": [StrOptions({"auto"}), str, torch.device],
        "generator": [StrOptions(set(GENERATORS))],
        "random_state": ["random_state"],
        "n_jobs": [None, Integral],
        "n_threads": [None, Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
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
        preconditioner_eps="auto",
        preconditioner_exponent=0.5,
        rtol=1e-3,
        batch_size=None,
        data_batch_size=None,
        evaluation="auto",
        device="auto",
        generator="auto",
        random_state=None,
        n_jobs=None,
        n_threads="auto",
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
        self.evaluation = evaluation
        self.device = device
        self.generator = generator
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.n_threads = n_threads
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

        A fit that raises (or is interrupted) leaves the estimator as it was before the call:
        its previous fit, or unfitted.

        Parameters
        ----------
        model : torch.nn.Module, fitted skorch net or Pipeline ending in one
            Never modified (parameters, buffers, device, mode, requires_grad, grads).
        X : array-like or torch.Tensor of shape (N, ...)
            Inputs on which the neighbourhood is defined.
        y : array-like, optional
            Labels, for cost="cross_entropy" (or a callable cost taking them).
        optimizer : torch.optim.Optimizer, dict, str or os.PathLike, optional
            Optimizer state for the "adam" preconditioners: the optimizer, its
            ``state_dict()``, or the path of a saved state_dict such as a Hugging Face
            ``Trainer`` checkpoint's ``"run/checkpoint-100/optimizer.pt"`` (read with
            ``torch.load(..., weights_only=True)``).
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
        self._validate_params()
        self._check_values()
        with fit_threads(self.n_threads, model):
            return self._fit(model, X, y, self.n_samples, optimizer, attention_mask)

    def _fit(self, model, X, y, n_samples, optimizer, attention_mask):
        seed = base_seed(self.random_state)
        progress = self._progress(n_samples)
        try:
            result = pipeline.fit(model, X, y, self._settings(), eps=self.preconditioner_eps,
                                  n_samples=n_samples, seed=seed, optimizer=optimizer,
                                  attention_mask=attention_mask, n_jobs=self.n_jobs,
                                  progress=progress)
            fitted = self._fitted_state(result.problem, result.records)
        finally:
            if progress is not None:
                progress.close()
        fitted.update(
            seed_=seed,
            generator_=result.problem.generator,
            eps_pilot_=result.eps_table,
            boundary_pilot_=result.boundary_table,
            preconditioner_eps_=result.eps,  # None: P does not depend on eps (naive)
            preconditioner_exponent_=result.exponent,
            n_pilot_evaluations_=result.pilot_evaluations,
            _question=self._question_of(result.problem, y),
            _pilots=(result.choice, result.start),  # partial_fit extends without them
        )
        self._replace_fitted_state(fitted)
        return self

    def partial_fit(self, model, X, y=None, *, n_samples=None, optimizer=None,
                    attention_mask=None):
        """Add ``n_samples`` directions (default: the ``n_samples`` parameter) to the estimate.

        With the same ``random_state``, ``fit`` with k = 200 equals ``fit`` with k = 100
        followed by ``partial_fit(n_samples=100)``, sample for sample. Only the same question
        can be extended: a model, X, y or any parameter (other than ``n_samples``, ``n_jobs``,
        ``n_threads``, ``verbose``, ``batch_size``, ``evaluation`` (rounding only) and
        ``random_state``, whose seed is kept in ``seed_``) different from the fitted ones
        raises ValueError; call ``fit`` to start a new estimate. On an unfitted estimator it is
        ``fit`` with ``n_samples`` directions. The fit's pilots (the eps, exponent and
        boundary choices and the search pilot) are reused, not run again; an estimate from
        :func:`~volsk.sweeps.fit_sharded` runs them once more (the same outcome).

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
        if not is_integer(extra, 1):
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        self._validate_params()
        self._check_values()
        with fit_threads(self.n_threads, model):
            return self._partial_fit(model, X, y, int(extra), optimizer, attention_mask)

    def _partial_fit(self, model, X, y, extra, optimizer, attention_mask):
        if not hasattr(self, "log_volume_"):
            return self._fit(model, X, y, int(extra), optimizer, attention_mask)
        changed = [name for name, value in self._params_fingerprint().items()
                   if self._question["params"].get(name) != value]
        if changed:
            raise ValueError(
                f"partial_fit: parameter(s) {changed} changed since fit (set_params); an "
                "estimate can only be extended with the question it answers. Call fit to start "
                "a new estimate."
            )

        def same_anchor(problem):
            if self._question["data"] != self._data_fingerprint(problem, y):
                raise ValueError(
                    "partial_fit got a different model, X or y than fit: an estimate can only "
                    "be extended on the same anchor and data. Call fit to start a new one."
                )

        eps = EPS_GRID[0] if self.preconditioner_eps_ is None else self.preconditioner_eps_
        # "auto" keeps what the fit chose (the naive map does not depend on the exponent)
        exponent = getattr(self, "preconditioner_exponent_", None)
        if exponent is None:
            exponent = DEFAULT_EXPONENT if isinstance(self.preconditioner_exponent, str) else (
                self.preconditioner_exponent)
        first = len(self._records)
        progress = self._progress(int(extra))
        # the fit's pilots (map and search start) are reused: the same records, none of
        # their cost again (an estimate from fit_sharded or an older pickle runs them)
        pilots = getattr(self, "_pilots", None)
        try:
            result = pipeline.fit(model, X, y, self._settings(exponent), eps=eps,
                                  n_samples=int(extra),
                                  seed=self.seed_, first=first, optimizer=optimizer,
                                  attention_mask=attention_mask, n_jobs=self.n_jobs,
                                  progress=progress, check=same_anchor, pilots=pilots)
            records = DirectionRecords.concatenate([self._records, result.records])
            fitted = self._fitted_state(result.problem, records)
        finally:
            if progress is not None:
                progress.close()
        if pilots is None:
            fitted.update(n_pilot_evaluations_=result.pilot_evaluations,
                          _pilots=(result.choice, result.start))
        for name, value in fitted.items():
            setattr(self, name, value)
        return self

    def _settings(self, exponent=None, generator=None) -> pipeline.Settings:
        """The settings a problem is bound with (``exponent``: one chosen, in place of the
        parameter; ``generator``: one resolved for a whole sharded run, in place of this
        process's resolution)."""
        return pipeline.Settings(
            cost=self.cost,
            output=self.output,
            cutoff=float(self.cutoff),
            rtol=float(self.rtol),
            measure=resolve_measure(self.measure, sigma=self.sigma, bounds=self.bounds),
            preconditioner=resolve_preconditioner(self.preconditioner),
            exponent=self.preconditioner_exponent if exponent is None else exponent,
            device=self._device(),
            batch_size=self.batch_size,
            data_batch_size=self.data_batch_size,
            evaluation=self.evaluation,
            generator=self._generator() if generator is None else generator,
        )

    def _check_values(self):
        if not np.isfinite(self.cutoff):
            raise ValueError(f"cutoff must be a finite number > 0, got {self.cutoff!r}")

    def _device(self):
        if isinstance(self.device, str) and self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _generator(self) -> str:
        """``generator`` resolved for this process's device: "host" or "device"."""
        return resolve_generator(self.generator, self._device())

    def _progress(self, total):
        if not self.verbose:
            return None
        from tqdm.auto import tqdm  # import time: only with verbose

        return tqdm(total=total, desc="directions", leave=False)

    # the question a fit answers: partial_fit may only extend the same one
    _NOT_IN_QUESTION = ("n_samples", "n_jobs", "n_threads", "verbose", "batch_size",
                        "random_state", "evaluation")  # evaluation: rounding only

    def _params_fingerprint(self) -> dict:
        params = {name: fingerprint(value) for name, value in self.get_params(deep=False).items()
                  if name not in self._NOT_IN_QUESTION}
        params["generator"] = fingerprint(self._generator())  # what "auto" means here
        return params

    @staticmethod
    def _data_fingerprint(problem, y) -> str:
        ev = problem.evaluator
        data = [(batch.X, batch.kwargs) for batch in ev.batches]
        labels = None if y is None else torch.as_tensor(np.asarray(y) if not isinstance(
            y, torch.Tensor) else y)
        return fingerprint(AsFloat64(ev.theta), data, labels)

    def _question_of(self, problem, y) -> dict:
        return {"params": self._params_fingerprint(), "data": self._data_fingerprint(problem, y)}

    def _replace_fitted_state(self, fitted: dict):
        """Drop the previous fit's attributes and set the new ones (only once all succeeded)."""
        stale = [a for a in vars(self) if a.endswith("_") and not a.startswith("__")]
        for attr in stale + (["_pilots"] if hasattr(self, "_pilots") else []):
            delattr(self, attr)  # an estimate without its fit's pilots runs them again
        for name, value in fitted.items():
            setattr(self, name, value)

    def _fitted_state(self, problem, records) -> dict:
        """The fitted attributes from the per-direction records (warns; raises on an empty
        neighbourhood). ``problem``: the Problem, or the ``pipeline.ProblemSummary`` of one
        prepared in worker processes (then no model is kept for ``score(X)``)."""
        summary = pipeline.summarise(problem)
        log_volume = aggregate_log_volume(records.log_volume)
        if np.isneginf(log_volume) and not summary.is_probability:
            raise ValueError("every direction has zero radius; the neighbourhood is empty")
        if np.isneginf(log_volume):
            raise ValueError(
                "every direction gives zero prior mass (for a uniform prior: no ray meets the "
                "box, or every ray crosses the cutoff before entering it). Widen the prior "
                "(bounds/sigma) or center it on the anchor (mean)."
            )
        flat_names = summary.flat
        radii = records.radius.copy()
        if not summary.is_probability:
            unbounded = int(np.isposinf(radii).sum())
            if unbounded:
                warnings.warn(
                    f"{unbounded} of {radii.size} directions never reached the cutoff "
                    "(a flat direction): the Lebesgue volume is infinite. Use a probability "
                    "measure (gaussian, uniform) for a finite answer.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            if flat_names:
                names = ", ".join(flat_names[:10])
                more = "" if len(flat_names) <= 10 else f" and {len(flat_names) - 10} more"
                warnings.warn(
                    f"{len(flat_names)} parameter(s) cannot change the outputs on X ({names}"
                    f"{more}): the neighbourhood is a cylinder of infinite Lebesgue volume. Under "
                    "a gaussian or uniform prior they are integrated out exactly.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                log_volume = np.inf
        log_volume = float(log_volume)
        sample_log_volumes = records.log_volume.copy()
        ess = effective_sample_size(sample_log_volumes)
        if sample_log_volumes.size >= ESS_WARNING_MIN_SAMPLES and ess < ESS_WARNING_BELOW:
            warnings.warn(
                f"one direction carries {top_sample_share(sample_log_volumes):.0%} of the "
                f"estimate (effective sample size {ess:.2f} of {sample_log_volumes.size}): "
                "read log_volume_ as a lower bound driven by the best direction (it is "
                "unbiased, but typical estimates fall below the truth). More directions or a "
                "better preconditioner raise it; results_frame() has the diagnostics.",
                LowEffectiveSampleSizeWarning,
                stacklevel=4,
            )
        return {
            "_records": records,
            # the private copy of the model and its data, for score(X); nothing else of the
            # problem (a bound preconditioner can hold an n × n matrix) is kept
            "_evaluator": getattr(problem, "evaluator", None),
            "n_parameters_": summary.n_parameters,
            "flat_parameters_": flat_names,
            "sample_log_volumes_": sample_log_volumes,
            "radii_": radii,
            "n_evaluations_": int(records.evaluations.sum()),
            "effective_sample_size_": ess,
            "top_sample_share_": top_sample_share(sample_log_volumes),
            "log_volume_": log_volume,
            "log10_volume_": to_log10(log_volume),
            "bits_": to_bits(log_volume) if summary.is_probability else None,
            "samples_": records.to_frame(),
        }

    # ------------------------------------------- fits computed elsewhere (sharded over workers)
    # volsk.sweeps.fit_sharded prepares the problem and runs the directions in worker processes.
    # These two hooks are its only way into the estimator: partial_fit's question check, and
    # the finishing code of fit/partial_fit applied to the merged per-direction records.

    def _check_extension(self, data_fingerprint=None):
        """Raise ValueError unless directions answering ``data_fingerprint`` (the
        ``_data_fingerprint`` of the problem prepared elsewhere; None: not known yet) with the
        current parameters may be added to this fit: ``partial_fit``'s rule."""
        changed = [name for name, value in self._params_fingerprint().items()
                   if self._question["params"].get(name) != value]
        if changed:
            raise ValueError(
                f"parameter(s) {changed} changed since the estimate was fitted (set_params); "
                "an estimate can only be extended with the question it answers. Fit anew."
            )
        if data_fingerprint is not None and self._question["data"] != data_fingerprint:
            raise ValueError(
                "a different model, X or y than the fitted estimate's: an estimate can only be "
                "extended on the same anchor and data. Fit anew."
            )

    def _from_records(self, summary, records, *, seed, eps, eps_table, pilot_evaluations,
                      data_fingerprint, extend=False, generator=None, exponent=None,
                      boundary_table=None):
        """Set the fitted state from per-direction records computed outside ``fit``.

        ``summary`` is the ``pipeline.ProblemSummary`` of the problem the records answer,
        ``records`` the directions 0 … k − 1 in order (with ``extend``: this fit's records
        followed by the new ones, after ``_check_extension``), ``seed``, ``eps``,
        ``eps_table``, ``pilot_evaluations``, ``exponent`` and ``boundary_table`` what
        ``pipeline.fit`` would have returned,
        ``generator`` the resolved direction generator (None: this process's resolution).
        The result is what ``fit`` (``partial_fit`` with ``extend``) sets from the same
        records, except that no model is kept (``score(X)`` needs a ``fit``). Returns self.
        """
        fitted = self._fitted_state(summary, records)
        fitted.update(n_pilot_evaluations_=pilot_evaluations)
        if extend:
            fitted.pop("_evaluator")  # a model kept by an earlier fit still answers score(X)
            for name, value in fitted.items():
                setattr(self, name, value)
            return self
        fitted.update(
            seed_=seed,
            generator_=self._generator() if generator is None else generator,
            eps_pilot_=eps_table,
            boundary_pilot_=boundary_table,
            preconditioner_eps_=eps,
            preconditioner_exponent_=exponent,
            _question={"params": self._params_fingerprint(), "data": data_fingerprint},
        )
        self._replace_fitted_state(fitted)
        return self

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
        evaluator = getattr(self, "_evaluator", None)
        if evaluator is None:
            raise ValueError(
                "score(X) needs the fitted model, which is not kept when the estimator is "
                "pickled; call fit(model, X) again"
            )
        other = clone(self)
        eps = self.preconditioner_eps if self.preconditioner_eps_ is None else (
            self.preconditioner_eps_)
        exponent = getattr(self, "preconditioner_exponent_", None)
        exponent = self.preconditioner_exponent if exponent is None else exponent
        other.set_params(random_state=self.seed_, n_samples=self.sample_log_volumes_.size,
                         preconditioner_eps=eps, preconditioner_exponent=exponent)
        return other.fit(evaluator.module, X, y).log_volume_

    def results_frame(self):
        """A one-row DataFrame of the estimate and its diagnostics (for tables and sweeps).

        Besides the estimate and the Markov ``lower_bound`` (95 %), it says how much the
        estimate rests on its best direction: ``ess`` (Kish's effective sample size),
        ``top_sample_share`` (the fraction of µ̂ from the largest sample) and a 90 % percentile
        bootstrap interval of the aggregate over the directions drawn (``bootstrap_low``,
        ``bootstrap_high``; too narrow when ESS ≈ 1 — see
        :func:`volsk.results.bootstrap_interval`).

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
        import pandas as pd  # import time: pandas is needed only for tables

        low, high = bootstrap_interval(self.sample_log_volumes_, 0.9, seed=self.seed_)
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
                    "top_sample_share": self.top_sample_share_,
                    "bootstrap_low": low,
                    "bootstrap_high": high,
                }
            ]
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_evaluator", None)  # a model copy: never pickled with the results
        return state
