"""Preconditioners: symmetric positive-definite maps P with det P = 1 for importance sampling.

A direction is u = P g / |P g| with g uniform on the sphere; its importance log-weight is
−n·log|P g|. A good P stretches flat directions: for a quadratic cost ½ δᵀHδ the ideal is
P ∝ H^{−1/2}. Every preconditioner here is an object with one job: ``bind(ctx)`` looks at the
anchor (curvature, optimizer state) and returns a :class:`BoundPreconditioner` acting on the
active coordinates.

From a curvature h (a diagonal, or a symmetric matrix with eigen-decomposition V D Vᵀ) the map is

    P ∝ diag(1/(|h|^exponent + eps))          or   P ∝ V (|D|^exponent + eps)^{-1} Vᵀ,

normalised to det P = 1 in the log domain; with the default exponent 0.5 and eps → 0 this is
H^{-1/2}. Note the second Vᵀ: the map returns to parameter coordinates.

Curvature objects compute their curvature once per ``bind``; a bound map can be re-made for
another eps or exponent without recomputing it (``with_eps``, ``with_exponent``), which is
what choosing them by pilot (:func:`choose_eps`, :func:`choose_exponent`) relies on.

The package: ``maps`` (the bound maps P), ``context`` (what a preconditioner sees),
``strategies`` (the preconditioners and their names), ``selection`` (choosing eps and the
exponent) and ``curvature`` (the curvature kernels the strategies are built from).
"""

from .boundary import BoundaryFitted, BoundaryMap
from .context import PreconditionerContext
from .kfac import KFAC, KroneckerMap
from .lowrank import LowRank, LowRankMap
from .maps import BoundPreconditioner, DiagonalMap, EigenMap, diagonal_scales
from .selection import EPS_GRID, EXPONENT_GRID, choose_eps, choose_exponent
from .strategies import (
    PRECONDITIONERS,
    Adam,
    DiagHessian,
    Diagonal,
    Fisher,
    HesScale,
    Hessian,
    Identity,
    resolve_preconditioner,
)

__all__ = [
    "Identity",
    "Diagonal",
    "Adam",
    "DiagHessian",
    "HesScale",
    "Hessian",
    "Fisher",
    "KFAC",
    "LowRank",
    "BoundaryFitted",
    "BoundPreconditioner",
    "DiagonalMap",
    "EigenMap",
    "KroneckerMap",
    "LowRankMap",
    "BoundaryMap",
    "PreconditionerContext",
    "diagonal_scales",
    "resolve_preconditioner",
    "PRECONDITIONERS",
    "EPS_GRID",
    "EXPONENT_GRID",
    "choose_eps",
    "choose_exponent",
]
