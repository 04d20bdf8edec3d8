"""Preconditioners: symmetric positive-definite maps P with det P = 1 for importance sampling.

A direction is u = P g / |P g| with g uniform on the sphere; its importance log-weight is
−n·log|P g| (DESIGN §1). A good P stretches flat directions: for a quadratic cost ½ δᵀHδ the ideal
is P ∝ H^{−1/2}. Every preconditioner here is an object with one job: ``bind(ctx)`` looks at the
anchor (curvature, optimizer state) and returns a :class:`BoundPreconditioner` acting on the
active coordinates.

From a curvature h (a diagonal, or a symmetric matrix with eigen-decomposition V D Vᵀ) the map is

    P ∝ diag(1/(|h|^exponent + eps))          or   P ∝ V (|D|^exponent + eps)^{-1} Vᵀ,

normalised to det P = 1 in the log domain; with the default exponent 0.5 and eps → 0 this is
H^{-1/2}. Note the second Vᵀ: the map returns to parameter coordinates.

Curvature objects compute their curvature once per ``bind``; a bound map can be re-made for
another eps without recomputing it (``with_eps``), which is what :func:`select_eps` uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "PreconditionerContext",
    "BoundPreconditioner",
    "DiagonalMap",
    "EigenMap",
    "Identity",
    "Diagonal",
    "Adam",
    "DiagHessian",
    "HesScale",
    "Hessian",
    "Fisher",
    "EPS_GRID",
    "EpsSelection",
    "select_eps",
    "pilot_seed",
    "resolve_preconditioner",
    "diagonal_scales",
]


@dataclass
class PreconditionerContext:
    """What a preconditioner may look at when it is bound to an anchor.

    Attributes
    ----------
    evaluator : volsk._evaluate.FunctionalModel
        The private eval-mode copy of the model with the inputs X.
    cost : callable
        ``outputs -> scalar`` bound to the anchor.
    mask : torch.Tensor (n,) bool
        Coordinates directions move in (flat coordinates integrated out are False).
    eps, exponent : float
        P ∝ 1/(|h|^exponent + eps).
    user_module : torch.nn.Module
        The user's module, read only (to map optimizer state by parameter identity).
    optimizer : torch.optim.Optimizer or dict or None
    cost_name : str or callable
    output : str
    y : torch.Tensor or None
    random_state : int
    """

    evaluator: object
    cost: object
    mask: torch.Tensor
    eps: float = 1e-3
    exponent: float = 0.5
    user_module: object = None
    optimizer: object = None
    cost_name: object = "kl"
    output: str = "logits"
    y: object = None
    random_state: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.mask.sum())


class BoundPreconditioner:
    """P acting on the active coordinates: ``apply(G)`` maps rows g (B, n) to rows P g.

    Maps built from a curvature also offer ``with_eps(eps)``: the same curvature, another eps.
    """

    n: int

    def apply(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def diagonal_scales(curvature, eps, exponent) -> torch.Tensor:
    """log of P's diagonal, p ∝ 1/(|h|^exponent + eps), normalised so Σ log p = 0 (det P = 1).

    Computed in the log domain so that thousands of tiny or huge entries do not overflow.

    Examples
    --------
    >>> from volsk.preconditioners import diagonal_scales
    >>> [round(p, 6) for p in diagonal_scales([1.0, 4.0], eps=0.0, exponent=0.5).exp().tolist()]
    [1.414214, 0.707107]
    """
    h = torch.as_tensor(curvature, dtype=torch.float64).abs()
    if exponent == 0:
        scaled = torch.ones_like(h)
    else:
        with np.errstate(divide="ignore"):
            scaled = h.pow(exponent)
    log_p = -torch.log(scaled + eps)
    if not torch.isfinite(log_p).all():
        raise ValueError(
            "preconditioner curvature has zero entries and preconditioner_eps=0: P would be "
            "infinite there; use preconditioner_eps > 0"
        )
    return log_p - log_p.mean()


def _check_log_det(log_p: torch.Tensor):
    n = log_p.numel()
    log_det = float(log_p.sum())
    if abs(log_det) > 1e-9 * max(1.0, math.sqrt(n)):
        raise ValueError(f"log det P = {log_det}, expected 0")


class DiagonalMap(BoundPreconditioner):
    """P = diag(exp(log_p)) with Σ log_p = 0."""

    def __init__(self, log_p: torch.Tensor):
        self.log_p = log_p
        self.scale = log_p.exp()
        self.n = log_p.numel()
        self.curvature = None
        _check_log_det(log_p)

    @classmethod
    def from_curvature(cls, curvature, eps, exponent) -> DiagonalMap:
        """P ∝ diag(1/(|h|^exponent + eps)), det P = 1."""
        h = torch.as_tensor(curvature, dtype=torch.float64)
        out = cls(diagonal_scales(h, eps, exponent))
        out.curvature, out.eps, out.exponent = h, float(eps), float(exponent)
        return out

    def with_eps(self, eps) -> DiagonalMap:
        if self.curvature is None:
            raise ValueError("this DiagonalMap was built from scales, not a curvature")
        return DiagonalMap.from_curvature(self.curvature, eps, self.exponent)

    def apply(self, G):
        return G * self.scale.to(G.device)


class EigenMap(BoundPreconditioner):
    """P = V diag(d) Vᵀ with d ∝ 1/(|λ|^exponent + eps), Σ log d = 0 (det P = 1).

    Applied to rows as ((G V) ⊙ d) Vᵀ in float64: the second Vᵀ brings the stretched direction
    back to parameter coordinates (leaving it out, as the paper's code does, maps into the
    eigenbasis and is no better than no preconditioner).
    """

    def __init__(self, eigenvalues, eigenvectors, eps, exponent):
        self.eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
        self.eigenvectors = torch.as_tensor(eigenvectors, dtype=torch.float64)
        self.eps, self.exponent = float(eps), float(exponent)
        self.log_d = diagonal_scales(self.eigenvalues, eps, exponent)
        _check_log_det(self.log_d)
        self.d = self.log_d.exp()
        self.n = self.log_d.numel()

    def with_eps(self, eps) -> EigenMap:
        return EigenMap(self.eigenvalues, self.eigenvectors, eps, self.exponent)

    def apply(self, G):
        V = self.eigenvectors.to(G.device)
        return ((G.to(torch.float64) @ V) * self.d.to(G.device)) @ V.T


class _IdentityMap(BoundPreconditioner):
    is_identity = True

    def __init__(self, n):
        self.n = n

    def with_eps(self, eps):
        return self

    def apply(self, G):
        return G


class Identity:
    """No preconditioning: directions uniform on the sphere (the naive estimator).

    Examples
    --------
    >>> from volsk.preconditioners import Identity
    >>> Identity()
    Identity()
    """

    name = "naive"

    def bind(self, ctx: PreconditionerContext) -> BoundPreconditioner:
        return _IdentityMap(ctx.n)

    def __repr__(self):
        return "Identity()"


class _DiagonalCurvature:
    """Base of preconditioners built from a diagonal curvature h: P ∝ 1/(|h|^exponent + eps)."""

    def curvature(self, ctx: PreconditionerContext) -> torch.Tensor:  # pragma: no cover
        """The curvature h on the active coordinates, (n_active,) float64."""
        raise NotImplementedError

    def bind(self, ctx: PreconditionerContext) -> BoundPreconditioner:
        h = self.curvature(ctx)
        if not torch.isfinite(h).all():
            raise ValueError(f"{self!r} produced a curvature with NaN or infinite entries")
        return DiagonalMap.from_curvature(h.cpu(), ctx.eps, ctx.exponent)


class Diagonal(_DiagonalCurvature):
    """A user-supplied diagonal curvature h (length n): P ∝ 1/(|h|^exponent + eps).

    Parameters
    ----------
    curvature : array-like of shape (n,)
        Non-negative, finite; one entry per trainable parameter in ``named_parameters()`` order.

    Examples
    --------
    >>> import numpy as np
    >>> from volsk.preconditioners import Diagonal
    >>> Diagonal(np.ones(3))
    Diagonal(<3 entries>)
    """

    name = "diagonal"

    def __init__(self, curvature):
        self.curvature_values = curvature

    def __repr__(self):
        return f"Diagonal(<{np.size(self.curvature_values)} entries>)"

    def curvature(self, ctx):
        h = check_curvature(self.curvature_values, ctx.mask.numel())
        return h[ctx.mask.cpu()]


class Adam(_DiagonalCurvature):
    """Adam's moment estimates as a diagonal curvature (the paper's "Adam ν" and "Adam μ").

    ``moment=2`` ("adam"): h = v̂ = exp_avg_sq / (1 − β₂ᵗ), the bias-corrected second moment;
    with the default exponent 0.5, P ∝ 1/(sqrt(v̂) + eps) — Adam's own step scaling.
    ``moment=1`` ("adam_m1"): h = |m̂| = |exp_avg| / (1 − β₁ᵗ), used in the same formula
    P ∝ 1/(|m̂|^exponent + eps), as in the paper's code (which applies one formula to either
    moment vector). With amsgrad, the second moment is ``max_exp_avg_sq``.

    State is mapped to parameters by identity (``optimizer.state[p]`` for each trainable
    ``p`` of the user's module) or, for a ``state_dict()``, by param-group order checked against
    ``model.parameters()`` shapes — never guessed from values. A trainable parameter the
    optimizer does not hold, missing state or mismatched shapes raise ValueError.

    Parameters
    ----------
    moment : {2, 1}, default=2
    optimizer : torch.optim.Optimizer or dict, optional
        Overrides the optimizer passed to ``fit`` (or a skorch net's ``optimizer_``).

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.preconditioners import Adam
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(net.parameters())
    >>> net(torch.ones(4, 3)).sum().backward(); opt.step()
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner=Adam(),
    ...                            random_state=0).fit(net, torch.randn(4, 3), optimizer=opt)
    >>> bool(est.log_volume_ < 0)
    True
    """

    def __init__(self, moment=2, optimizer=None):
        self.moment = moment
        self.optimizer = optimizer

    @property
    def name(self):
        return "adam" if self.moment == 2 else "adam_m1"

    def __repr__(self):
        return "Adam()" if self.moment == 2 else f"Adam(moment={self.moment})"

    def curvature(self, ctx):
        from ._curvature import optimizer_moment

        if self.moment not in (1, 2):
            raise ValueError(f"Adam moment must be 1 or 2, got {self.moment!r}")
        optimizer = self.optimizer if self.optimizer is not None else ctx.optimizer
        module = ctx.user_module if ctx.user_module is not None else ctx.evaluator.module
        h = optimizer_moment(optimizer, module, self.moment, what=repr(self.name))
        if h.numel() != ctx.mask.numel():
            raise ValueError(
                f"the optimizer state covers {h.numel()} parameters but the model has "
                f"{ctx.mask.numel()} trainable ones"
            )
        return h[ctx.mask.cpu()]


class DiagHessian(_DiagonalCurvature):
    """The exact diagonal of the cost's Hessian at the anchor.

    For cost "kl" (and "mse") this is the Gauss–Newton/Fisher diagonal, computed exactly from
    per-example Jacobians (DESIGN §2: at the anchor the KL Hessian equals the Fisher on X). For
    "cross_entropy" (Hessian ≠ Gauss–Newton) and callable costs it comes from Hessian-vector
    products: exactly (n_active of them) up to ``max_exact`` active parameters, otherwise
    Hutchinson's estimate with ``probes`` Rademacher vectors (64 when not given).

    Parameters
    ----------
    probes : int, optional
        Force Hutchinson's estimate with this many probes (HVP route only).
    max_exact : int, default=5000
        Largest number of active parameters for the exact HVP route.
    dtype : torch.dtype or None, default=torch.float64
        Precision of the curvature computation (None: the model's dtype).

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="diag_hessian",
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> est.samples_.shape[0]
    4
    """

    name = "diag_hessian"

    def __init__(self, probes=None, max_exact=5000, dtype=torch.float64):
        self.probes = probes
        self.max_exact = max_exact
        self.dtype = dtype

    def __repr__(self):
        return "DiagHessian()" if self.probes is None else f"DiagHessian(probes={self.probes})"

    def curvature(self, ctx):
        from ._curvature import curvature_target, exact_hessian_diagonal

        if self.probes is not None and int(self.probes) < 1:
            raise ValueError(f"probes must be a positive integer or None, got {self.probes!r}")
        target = curvature_target(ctx, self.dtype)
        return exact_hessian_diagonal(target, self.probes, self.max_exact).cpu()


class HesScale(_DiagonalCurvature):
    """HesScale (Elsayed & Mahmood 2022): a diagonal Hessian from one backward recursion.

    For ``nn.Sequential`` stacks (nested allowed) of Linear, Conv1d/2d/3d, Flatten and
    elementwise activations (ReLU, GELU, Tanh, Sigmoid, SiLU, …; Identity and Dropout pass
    through in eval mode). A final Softmax/LogSoftmax is folded into the loss when the model
    outputs probabilities/log-probabilities. Exact for the last layer's weights; an
    approximation (off-diagonal terms dropped) below it. At the anchor the KL gradient is zero,
    so it equals HesScaleGN there.

    Parameters
    ----------
    dtype : torch.dtype or None, default=torch.float64

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="hesscale",
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> bool(est.log_volume_ < 0)
    True
    """

    name = "hesscale"

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype

    def __repr__(self):
        return "HesScale()"

    def curvature(self, ctx):
        from ._curvature import curvature_target, hesscale_diagonal

        target = curvature_target(ctx, self.dtype)
        return hesscale_diagonal(target)[target.cols].cpu()


class _MatrixCurvature:
    """Base of full-matrix preconditioners: P ∝ V (|D|^exponent + eps)^{-1} Vᵀ."""

    kind = "matrix"

    def __init__(self, max_parameters=20_000, dtype=torch.float64):
        self.max_parameters = max_parameters
        self.dtype = dtype

    def __repr__(self):
        args = "" if self.max_parameters == 20_000 else f"max_parameters={self.max_parameters}"
        return f"{type(self).__name__}({args})"

    def _target(self, ctx):
        from ._curvature import curvature_target

        if ctx.n > self.max_parameters:
            raise ValueError(
                f"preconditioner {self.name!r} builds a full {ctx.n} × {ctx.n} matrix, more than "
                f"max_parameters={self.max_parameters}; use 'diag_hessian' or 'hesscale', or "
                f"{type(self).__name__}(max_parameters=...) if it fits in memory"
            )
        return curvature_target(ctx, self.dtype)

    def curvature(self, ctx) -> torch.Tensor:  # pragma: no cover - interface
        """The symmetric curvature matrix on the active coordinates, float64."""
        raise NotImplementedError

    def bind(self, ctx: PreconditionerContext) -> BoundPreconditioner:
        H = self.curvature(ctx)
        if not torch.isfinite(H).all():
            raise ValueError(f"{self!r} produced a matrix with NaN or infinite entries")
        eigenvalues, eigenvectors = torch.linalg.eigh(H)
        return EigenMap(eigenvalues, eigenvectors, ctx.eps, ctx.exponent)


class Hessian(_MatrixCurvature):
    """The full Hessian of the cost at the anchor (torch.func HVPs, exact for any cost).

    P = V (|D|^exponent + eps)^{-1} Vᵀ, det P = 1. Limited to ``max_parameters`` active
    parameters (n² float64 entries plus an eigendecomposition).

    Parameters
    ----------
    max_parameters : int, default=20000
    dtype : torch.dtype or None, default=torch.float64

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.preconditioners import Hessian
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner=Hessian(),
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> bool(est.log_volume_ < 0)
    True
    """

    name = "hessian"

    def curvature(self, ctx):
        from ._curvature import hessian_matrix

        return hessian_matrix(self._target(ctx))


class Fisher(_MatrixCurvature):
    """The Gauss–Newton / Fisher matrix of the cost on X at the anchor.

    For "kl" and "cross_entropy": Σ_x w_x Jᵀ(diag p − p pᵀ)J on logits, i.e. the Fisher
    information of the predictive distribution weighted as the cost weights examples (1/N) —
    equal to the KL Hessian at the anchor. For "mse": (2/(N·D)) JᵀJ, equal to its Hessian there.
    Callable costs raise (use :class:`Hessian`).

    Parameters
    ----------
    max_parameters : int, default=20000
    dtype : torch.dtype or None, default=torch.float64

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="fisher",
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> bool(est.log_volume_ < 0)
    True
    """

    name = "fisher"

    def curvature(self, ctx):
        from ._curvature import ggn_matrix

        return ggn_matrix(self._target(ctx))


def check_curvature(curvature, n) -> torch.Tensor:
    """Validate a diagonal curvature vector: length n, finite, non-negative."""
    try:
        h = torch.as_tensor(np.asarray(curvature, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "preconditioner must be None, a name, an array-like diagonal curvature or a "
            f"volsk.preconditioners object; could not read it as an array ({exc})"
        ) from None
    if h.ndim != 1 or h.numel() != n:
        raise ValueError(
            f"preconditioner diagonal must have one entry per trainable parameter (length {n}), "
            f"got shape {tuple(h.shape)}"
        )
    if not torch.isfinite(h).all():
        raise ValueError("preconditioner diagonal contains NaN or infinite entries")
    if (h < 0).any():
        raise ValueError(
            "preconditioner diagonal has negative entries; pass a curvature estimate >= 0 "
            "(e.g. its absolute value)"
        )
    return h


# --------------------------------------------------------------------- choosing eps by pilot

#: Default grid of ``preconditioner_eps="auto"``.
EPS_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
_PILOT_STREAM = 0x70696C6F74  # "pilot": a seed stream apart from the estimate's directions


class EpsSelection(NamedTuple):
    """Result of :func:`select_eps`: the chosen eps, the pilot table, the re-bound problem."""

    eps: float | None
    table: object
    problem: object


def pilot_seed(random_state: int) -> int:
    """The base seed of the pilot directions: independent of the estimate's own directions."""
    state = np.random.SeedSequence([int(random_state), _PILOT_STREAM]).generate_state(1)
    return int(state[0])


def select_eps(problem, grid=EPS_GRID, n_directions=32, random_state=0) -> EpsSelection:
    """Choose ``preconditioner_eps`` by a pilot estimate at each eps of a grid.

    The same ``n_directions`` direction seeds are used at every eps (so the comparison is
    paired), drawn from a seed stream separate from the estimate's (so choosing eps does not
    bias the final estimate upwards). The eps with the largest pilot log-volume wins: an
    unbiased non-negative estimate exceeds the truth by t nats with probability ≤ e^{-t}, so a
    larger estimate is, with high probability, a more accurate one (DESIGN §1). The curvature
    is computed once: the bound map is re-made for each eps with ``with_eps``.

    Parameters
    ----------
    problem : volsk._engine.Problem
        Prepared with any eps (e.g. ``grid[0]``); its bound preconditioner must offer
        ``with_eps`` (all volsk preconditioners do).
    grid : sequence of float, default=EPS_GRID
        Candidate eps values, >= 0. Ties go to the earlier entry.
    n_directions : int, default=32
    random_state : int, default=0
        The estimator's base seed (``seed_``); the pilot seed is derived from it.

    Returns
    -------
    EpsSelection
        ``(eps, table, problem)``: the chosen eps (None when the preconditioner does not depend
        on eps, e.g. the naive one; then no pilot is run), a pandas DataFrame with one row per
        eps (log_volume, max_sample, median_sample, ess, evaluations_per_direction, selected)
        and ``problem`` with its preconditioner re-bound to the chosen eps.

    Examples
    --------
    >>> import torch
    >>> from volsk._engine import prepare_problem
    >>> from volsk.measures import Gaussian
    >>> from volsk.preconditioners import DiagHessian, select_eps
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> problem = prepare_problem(
    ...     net, torch.randn(16, 3), cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
    ...     measure=Gaussian(sigma=1.0), preconditioner=DiagHessian(), eps=1.0, exponent=0.5,
    ...     device="cpu", batch_size=None, n_directions=8)
    >>> eps, table, problem = select_eps(problem, grid=(1.0, 1e-2), n_directions=8)
    >>> eps in (1.0, 1e-2), list(table["eps"])
    (True, [1.0, 0.01])
    """
    import pandas as pd

    from ._engine import TAYLOR_START, estimate_directions
    from .results import summarise_samples

    grid = [float(e) for e in np.atleast_1d(np.asarray(grid, dtype=np.float64))]
    if not grid or any(not (math.isfinite(e) and e >= 0) for e in grid):
        raise ValueError(f"grid must be a non-empty sequence of finite eps >= 0, got {grid!r}")
    if int(n_directions) < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions!r}")
    bound = problem.preconditioner
    columns = ["eps", "log_volume", "max_sample", "median_sample", "ess",
               "evaluations_per_direction", "selected"]
    if getattr(bound, "is_identity", False):
        return EpsSelection(None, pd.DataFrame(columns=columns), problem)
    if not hasattr(bound, "with_eps"):
        raise ValueError(
            'preconditioner_eps="auto" needs a preconditioner whose bound map can be re-made '
            f"for another eps (a with_eps method); {type(bound).__name__} has none. Pass a "
            "numeric preconditioner_eps."
        )
    seed = pilot_seed(random_state)
    rows, candidates = [], []
    for eps in grid:
        candidate = replace(problem, preconditioner=bound.with_eps(eps))
        # a few directions: each searched from its own Taylor guess (a search pilot would
        # cost as much as this eps pilot)
        rec = estimate_directions(candidate, range(int(n_directions)), seed,
                                  start=TAYLOR_START)
        rows.append({"eps": eps, **summarise_samples(rec["log_volume"], rec["evaluations"])})
        candidates.append(candidate)
    table = pd.DataFrame(rows)
    scores = table["log_volume"].to_numpy()
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = int(np.argmax(scores))
    table["selected"] = np.arange(len(grid)) == best
    return EpsSelection(grid[best], table[columns], candidates[best])


# ---------------------------------------------------------------------------------- by name

_BY_NAME: dict = {
    "adam": Adam,
    "adam_m1": lambda: Adam(moment=1),
    "diag_hessian": DiagHessian,
    "hesscale": HesScale,
    "hessian": Hessian,
    "fisher": Fisher,
}

PRECONDITIONERS = ("adam", "adam_m1", "diag_hessian", "hesscale", "hessian", "fisher")


def resolve_preconditioner(spec):
    """Turn the estimator's ``preconditioner`` parameter into a preconditioner object.

    Examples
    --------
    >>> from volsk.preconditioners import resolve_preconditioner
    >>> resolve_preconditioner("adam_m1"), resolve_preconditioner(None)
    (Adam(moment=1), Identity())
    """
    if spec is None or (isinstance(spec, str) and spec in ("naive", "none", "identity")):
        return Identity()
    if isinstance(spec, str):
        if spec in _BY_NAME:
            return _BY_NAME[spec]()
        raise ValueError(
            f"preconditioner must be None, one of {PRECONDITIONERS}, an array-like diagonal "
            f"curvature or a volsk.preconditioners object; got {spec!r}"
        )
    if hasattr(spec, "bind"):
        return spec
    return Diagonal(spec)
