"""The maps P (symmetric positive-definite, det P = 1) that bound preconditioners apply.

A bound map acts on the active coordinates: ``apply(G)`` maps rows g to rows P g. Maps built
from a curvature can be re-made for another eps without recomputing it (``with_eps``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BoundPreconditioner", "DiagonalMap", "EigenMap", "IdentityMap", "diagonal_scales"]


class BoundPreconditioner:
    """P acting on the active coordinates: ``apply(G)`` maps rows g (B, n) to rows P g.

    Maps built from a curvature also offer ``with_eps(eps)``: the same curvature, another eps.
    Maps that act on a block of coordinates on their own (diagonal maps) also offer
    ``apply_block(G, start, stop)``: P g restricted to the active coordinates [start, stop),
    from g on those coordinates alone — the large-model evaluator builds its directions so,
    never holding a whole row; a map without it is applied to a whole row there.
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

    def apply_block(self, G, start, stop):
        return G * self.scale[start:stop].to(G.device)


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


class IdentityMap(BoundPreconditioner):
    """P = I; ``is_identity`` lets sampling skip the map and eps selection skip its pilot."""

    is_identity = True

    def __init__(self, n):
        self.n = n

    def with_eps(self, eps):
        return self

    def apply(self, G):
        return G

    def apply_block(self, G, start, stop):
        return G
