"""Preconditioners: symmetric positive-definite maps P with det P = 1 for importance sampling.

A direction is u = P g / |P g| with g uniform on the sphere; its importance log-weight is
−n·log|P g| (DESIGN §1). A good P stretches flat directions: for a quadratic cost ½ δᵀHδ the ideal
is P ∝ H^{−1/2}. Every preconditioner here is an object with one job: ``bind(ctx)`` looks at the
anchor (curvature, optimizer state) and returns a :class:`BoundPreconditioner` acting on the
active coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "PreconditionerContext",
    "BoundPreconditioner",
    "DiagonalMap",
    "Identity",
    "Diagonal",
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
    """P acting on the active coordinates: ``apply(G)`` maps rows g (B, n) to rows P g."""

    n: int

    def apply(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def diagonal_scales(curvature, eps, exponent) -> torch.Tensor:
    """log of P's diagonal, p ∝ 1/(|h|^exponent + eps), normalised so Σ log p = 0 (det P = 1).

    Computed in the log domain so that thousands of tiny or huge entries do not overflow.
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


class DiagonalMap(BoundPreconditioner):
    """P = diag(exp(log_p)) with Σ log_p = 0."""

    def __init__(self, log_p: torch.Tensor):
        self.log_p = log_p
        self.scale = log_p.exp()
        self.n = log_p.numel()
        if abs(float(log_p.sum())) > 1e-9 * max(1.0, math.sqrt(self.n)):
            raise ValueError(f"log det P = {float(log_p.sum())}, expected 0")

    def apply(self, G):
        return G * self.scale.to(G.device)


class _IdentityMap(BoundPreconditioner):
    is_identity = True

    def __init__(self, n):
        self.n = n

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


class Diagonal:
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
        self.curvature = curvature

    def __repr__(self):
        return f"Diagonal(<{np.size(self.curvature)} entries>)"

    def bind(self, ctx: PreconditionerContext) -> BoundPreconditioner:
        h = check_curvature(self.curvature, ctx.mask.numel())
        return DiagonalMap(diagonal_scales(h[ctx.mask.cpu()], ctx.eps, ctx.exponent))


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


_BY_NAME: dict = {}  # name -> zero-argument factory, filled below as preconditioners are defined

PRECONDITIONERS = ("adam", "adam_m1", "diag_hessian", "hesscale", "hessian", "fisher")


def resolve_preconditioner(spec):
    """Turn the estimator's ``preconditioner`` parameter into a preconditioner object."""
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
