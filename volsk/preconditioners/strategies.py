"""The preconditioner strategies: each one turns the anchor's curvature into a bound map P.

``bind(ctx)`` looks at the anchor (curvature, optimizer state) through a
:class:`~volsk.preconditioners.PreconditionerContext` and returns a bound map acting on the
active coordinates; :func:`resolve_preconditioner` turns the estimator's ``preconditioner``
parameter (a name, a diagonal or an object) into a strategy.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import is_integer
from .boundary import BoundaryFitted
from .context import PreconditionerContext
from .curvature.ggn import GGN_METHODS, gauss_newton_diagonal, ggn_matrix, ggn_route
from .curvature.hesscale import hesscale_diagonal
from .curvature.hessian import anchor_hessian_diagonal, hessian_matrix
from .curvature.optimizer_state import optimizer_moment
from .curvature.target import curvature_target
from .kfac import KFAC
from .lowrank import LowRank
from .maps import BoundPreconditioner, DiagonalMap, EigenMap, IdentityMap

__all__ = [
    "Identity",
    "Diagonal",
    "Adam",
    "DiagHessian",
    "HesScale",
    "Hessian",
    "Fisher",
    "check_curvature",
    "resolve_preconditioner",
    "PRECONDITIONERS",
]


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
        return IdentityMap(ctx.n)

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

    The eps convention differs from the paper's code by the bias correction. That code
    (``diag_preconditioner`` of EleutherAI's basin-volume) uses the *raw* moment as stored by
    the optimizer — torch's ``exp_avg_sq``, optax's ``nu`` — P ∝ 1/(ν^exponent + eps), while
    volsk uses v̂ = ν / (1 − β₂ᵗ). As det P = 1 removes constant factors, the two maps are
    equal when ``preconditioner_eps = eps_paper / (1 − β₂ᵗ)^exponent`` (at the default
    exponent, eps_paper / sqrt(1 − β₂ᵗ); for ``moment=1``, β₁ in place of β₂), t being the
    optimizer's step count. The same eps is therefore a smaller regulariser here, a more
    aggressive map, the more so the shorter the training (1 − β₂ᵗ ≈ 0.33 after 400 steps at
    β₂ = 0.999). To reproduce the paper's map exactly, also when parameters took different
    numbers of steps, pass the raw state as a diagonal with the paper's eps::

        nu = torch.cat([opt.state[p]["exp_avg_sq"].flatten()
                        for p in model.parameters() if p.requires_grad])
        LocalVolumeEstimator(preconditioner=nu.numpy(), preconditioner_eps=eps_paper)

    The state may also be read from disk: a path to a file written by
    ``torch.save(optimizer.state_dict(), path)`` — a Hugging Face ``Trainer`` checkpoint's
    ``optimizer.pt`` — or to a checkpoint folder holding one, loaded with
    ``torch.load(path, map_location="cpu", weights_only=True)``.

    State is mapped to parameters by identity (``optimizer.state[p]`` for each trainable
    ``p`` of the user's module) or, for a ``state_dict()``, by the parameter names it records
    (an optimizer built from ``model.named_parameters()``), else by param-group order checked
    against ``model.parameters()`` shapes — never guessed from values. Several param groups
    (Trainer's weights with weight decay, then biases and norms without) are interleaved
    back into the model's order by shape; where shapes leave the order ambiguous, Trainer's
    own grouping rule decides, else ValueError (see
    ``in_model_order`` in ``volsk.preconditioners.curvature.optimizer_state``). A trainable
    parameter the optimizer does not hold, missing state or mismatched shapes raise
    ValueError.

    Parameters
    ----------
    moment : {2, 1}, default=2
    optimizer : torch.optim.Optimizer, dict, str or os.PathLike, optional
        Overrides the optimizer passed to ``fit`` (or a skorch net's ``optimizer_``): the
        optimizer, its ``state_dict()``, or the path of a saved state_dict (e.g.
        ``"run/checkpoint-100/optimizer.pt"``).

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
    """The diagonal of the cost's Hessian at the anchor: exact, or a Monte-Carlo estimate where
    the exact one would not fit in memory.

    For cost "kl" (and "mse") this is the Gauss–Newton/Fisher diagonal (at the anchor the KL
    Hessian equals the Fisher on X), computed

    - exactly from per-example Jacobians, which hold (outputs per example) × n_active numbers
      at a time — a classifier's few outputs;
    - or, by Monte Carlo, as the mean over ``samples`` Rademacher vectors v over the outputs of
      the squared gradient Jᵀ(root ⊙ v), one backward pass each per data batch (unbiased;
      every coordinate's relative standard error at most sqrt(2/samples), about 18 % at the
      default 64; see :func:`~volsk.preconditioners.curvature.ggn.sampled_ggn_diagonal`).
      Memory: one data batch's activations and a few buffers of its outputs' size — what a
      language model needs, whose outputs per example are tokens × vocabulary.

    ``method="auto"`` takes the exact route while one example's Jacobian fits in 1 GiB (or the
    device's memory budget, if larger), the sampled one otherwise. The estimate is seeded by
    the estimator's ``random_state``. By default (``dtype="auto"``) the sampled route runs in
    the model's own precision (at least float32): its sampling error dwarfs float32's
    rounding, and a float64 twin of a language model would double its time and memory.

    For "cross_entropy" (Hessian ≠ Gauss–Newton) and callable costs the diagonal comes from
    Hessian-vector products: exactly (n_active of them) up to ``max_exact`` active parameters
    (or always, with ``method="exact"``), otherwise (or with ``method="sampled"``) Hutchinson's
    estimate with ``probes`` Rademacher vectors (``samples`` when not given).

    Parameters
    ----------
    method : {"auto", "exact", "sampled"}, default="auto"
    samples : int, default=64
        Monte-Carlo budget of the sampled routes: backward passes per data batch (Gauss–Newton)
        or Hutchinson probes (Hessian-vector products).
    probes : int, optional
        Force Hutchinson's estimate with this many probes (Hessian-vector-product route only).
    max_exact : int, default=5000
        Largest number of active parameters for the exact Hessian-vector-product route under
        ``method="auto"``.
    dtype : "auto", torch.dtype or None, default="auto"
        Precision of the curvature computation (None: the model's dtype). "auto": the model's
        dtype, at least float32, for the sampled Gauss–Newton route; float64 for the others.

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.preconditioners import DiagHessian
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="diag_hessian",
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> est.samples_.shape[0]
    4
    >>> DiagHessian(method="sampled", samples=16)
    DiagHessian(method='sampled', samples=16)
    """

    name = "diag_hessian"

    def __init__(self, method="auto", samples=64, probes=None, max_exact=5000, dtype="auto"):
        self.method = method
        self.samples = samples
        self.probes = probes
        self.max_exact = max_exact
        self.dtype = dtype

    def __repr__(self):
        defaults = {"method": "auto", "samples": 64, "probes": None, "max_exact": 5000,
                    "dtype": "auto"}
        args = [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
        return f"DiagHessian({', '.join(args)})"

    def _check(self):
        if self.method not in GGN_METHODS:
            raise ValueError(f"DiagHessian method must be one of {GGN_METHODS}, got "
                             f"{self.method!r}")
        for name, value, least in (("samples", self.samples, 1), ("probes", self.probes, 1),
                                   ("max_exact", self.max_exact, 0)):
            if name == "probes" and value is None:
                continue
            if not is_integer(value, least):
                allowed = "a positive integer" if least else "a non-negative integer"
                raise ValueError(f"DiagHessian {name} must be {allowed}"
                                 f"{' or None' if name == 'probes' else ''}, got {value!r}")
        if self.probes is not None and self.method == "exact":
            raise ValueError("DiagHessian probes forces Hutchinson's estimate; it cannot be "
                             "combined with method='exact' (pass one of them)")
        if not (self.dtype is None or self.dtype == "auto" or isinstance(self.dtype, torch.dtype)):
            raise ValueError(f"DiagHessian dtype must be 'auto', a torch.dtype or None, got "
                             f"{self.dtype!r}")

    def curvature(self, ctx):
        self._check()
        dtype = self.dtype
        if dtype == "auto":
            # the model's own precision, at least float32 (no copy for float32 models), where
            # the sampled Gauss–Newton route is taken; float64 everywhere else
            model_dtype = ctx.evaluator.model_dtype
            working = torch.float32 if torch.finfo(model_dtype).bits < 32 else None
            target = curvature_target(ctx, working)
            if all(part.cost.hessian_equals_ggn() for part in target.parts) and (
                    ggn_route(target, self.method) == "sampled"):
                return gauss_newton_diagonal(target, "sampled", self.samples).cpu()
            dtype = torch.float64
        target = curvature_target(ctx, dtype)
        return anchor_hessian_diagonal(target, self.probes, self.max_exact, method=self.method,
                                       samples=self.samples).cpu()


class HesScale(_DiagonalCurvature):
    """HesScale (Elsayed & Mahmood 2022): a diagonal Hessian from one backward recursion.

    For any model whose forward, traced with :func:`torch.fx.symbolic_trace`, is a chain:
    each operation takes the previous one's output (and its own parameters) only. The
    operations: Linear and Conv1d/2d/3d (modules, or ``F.linear``/``F.conv2d``… on the
    module's own parameters), elementwise activations (ReLU, GELU, Tanh, Sigmoid, SiLU, … as
    modules, ``torch.relu``, ``F.gelu`` or ``x.tanh()``), reshapes (Flatten, ``x.flatten(1)``,
    ``x.view(x.size(0), -1)``), Identity and Dropout in eval mode. So an ``nn.Sequential``
    (nested allowed), a custom module calling ``self.fc1``, ``self.act``, ``self.fc2`` in
    turn, or skorch's module classes. A final Softmax/LogSoftmax over the last axis is folded
    into the loss when the model outputs probabilities/log-probabilities. Residual
    connections, concatenations, attention, normalisation layers, a parameter used twice or a
    forward torch.fx cannot trace raise ValueError naming the first offending node; use
    ``"kfac"`` or ``"diag_hessian"`` for those. Exact for the last layer's weights; an
    approximation (off-diagonal terms dropped) below it. At the anchor the KL gradient is
    zero, so it equals HesScaleGN there.

    Parameters
    ----------
    dtype : torch.dtype or None, default=torch.float64

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> class MLP(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    ...
    ...     def forward(self, x):
    ...         return self.fc2(torch.nn.functional.gelu(self.fc1(x)))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="hesscale",
    ...                            random_state=0).fit(MLP(), torch.randn(16, 3))
    >>> bool(est.log_volume_ < 0)
    True
    """

    name = "hesscale"

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype

    def __repr__(self):
        return "HesScale()"

    def curvature(self, ctx):
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
        # applied in the dtype directions are formed in (float32 for a float32 model)
        dtype = getattr(ctx.evaluator, "ray_dtype", torch.float64)
        return EigenMap(eigenvalues, eigenvectors, ctx.eps, ctx.exponent, dtype=dtype)


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


# ---------------------------------------------------------------------------------- by name

_BY_NAME: dict = {
    "adam": Adam,
    "adam_m1": lambda: Adam(moment=1),
    "diag_hessian": DiagHessian,
    "hesscale": HesScale,
    "hessian": Hessian,
    "fisher": Fisher,
    "kfac": KFAC,
    "lowrank": LowRank,
    "boundary": BoundaryFitted,
}

#: The preconditioners accepted by name (besides "naive": no preconditioner).
PRECONDITIONERS = tuple(_BY_NAME)


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
        if spec not in _BY_NAME:
            raise ValueError(
                f"preconditioner must be None, one of {PRECONDITIONERS}, an array-like "
                f"diagonal curvature or a volsk.preconditioners object; got {spec!r}"
            )
        spec = _BY_NAME[spec]()
    if hasattr(spec, "bind"):
        # a preconditioner built on another one (BoundaryFitted) gets its base resolved here
        return spec.resolved(resolve_preconditioner) if hasattr(spec, "resolved") else spec
    return Diagonal(spec)
