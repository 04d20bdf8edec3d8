"""The maps P (symmetric positive-definite, det P = 1) that bound preconditioners apply.

A bound map acts on the active coordinates: ``apply(G)`` maps rows g to rows P g. Maps built
from a curvature can be re-made for another eps or exponent without recomputing it
(``with_eps``, ``with_exponent``).
"""

from __future__ import annotations

import copy
import math

import torch

__all__ = ["BoundPreconditioner", "DiagonalMap", "EigenMap", "IdentityMap", "diagonal_scales"]

# EigenMap's float32 products run on blocks of exactly this many rows (the last one padded with
# zeros): a row's result then does not depend on how many rows were mapped with it (BLAS picks
# other kernels, with other rounding, for other shapes — a single row, a few rows), so a
# direction's log-weight stays a function of (seed, index) alone. 64 = the CPU sampler's block.
APPLY_ROWS = 64


class BoundPreconditioner:
    """P acting on the active coordinates: ``apply(G)`` maps rows g (B, n) to rows P g.

    Maps built from a curvature also offer ``with_eps(eps)`` and ``with_exponent(exponent)``:
    the same curvature, another eps or exponent.
    Maps that act on a block of coordinates on their own (diagonal maps) also offer
    ``apply_block(G, start, stop)``: P g restricted to the active coordinates [start, stop),
    from g on those coordinates alone — the large-model evaluator builds its directions so,
    never holding a whole row; a map without it is applied to a whole row there.
    """

    n: int

    def apply(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def settled(self) -> BoundPreconditioner:
        """The map as the estimate's directions use it, without what only choosing eps or
        the exponent needed (``with_eps`` may then be unavailable). This map by default."""
        return self


def diagonal_scales(curvature, eps, exponent) -> torch.Tensor:
    """log of P's diagonal, p ∝ 1/(|h|^exponent + eps), normalised so Σ log p = 0 (det P = 1).

    Computed in the log domain so that thousands of tiny or huge entries do not overflow.

    Examples
    --------
    >>> from volsk.preconditioners import diagonal_scales
    >>> [round(p, 6) for p in diagonal_scales([1.0, 4.0], eps=0.0, exponent=0.5).exp().tolist()]
    [1.414214, 0.707107]
    """
    # one float64 n-vector, transformed in place (a language model's are twice its bytes)
    log_p = torch.as_tensor(curvature, dtype=torch.float64).abs()
    if exponent == 0:
        log_p.fill_(1.0)
    else:
        log_p.pow_(exponent)
    log_p.add_(eps).log_().neg_()
    if not bool(torch.isfinite(log_p).all()):
        raise ValueError(
            "preconditioner curvature has zero entries and preconditioner_eps=0: P would be "
            "infinite there; use preconditioner_eps > 0"
        )
    return log_p.sub_(log_p.mean())


def _check_log_det(log_p: torch.Tensor):
    n = log_p.numel()
    log_det = float(log_p.sum())
    if abs(log_det) > 1e-9 * max(1.0, math.sqrt(n)):
        raise ValueError(f"log det P = {log_det}, expected 0")


class DiagonalMap(BoundPreconditioner):
    """P = diag(exp(log_p)) with Σ log_p = 0."""

    def __init__(self, log_p: torch.Tensor):
        _check_log_det(log_p)
        # only the scales are kept: a language model's float64 n-vectors are twice its bytes
        self.scale = log_p.exp()
        self.n = log_p.numel()
        self.curvature = None

    @property
    def log_p(self) -> torch.Tensor:
        """log of the scales (recomputed: float64 rounding of exp and log, ~1e-16)."""
        return self.scale.log()

    @classmethod
    def from_curvature(cls, curvature, eps, exponent) -> DiagonalMap:
        """P ∝ diag(1/(|h|^exponent + eps)), det P = 1."""
        h = torch.as_tensor(curvature, dtype=torch.float64)
        out = cls(diagonal_scales(h, eps, exponent))
        out.curvature, out.eps, out.exponent = h, float(eps), float(exponent)
        return out

    def with_eps(self, eps) -> DiagonalMap:
        self._check_curvature()
        return DiagonalMap.from_curvature(self.curvature, eps, self.exponent)

    def with_exponent(self, exponent) -> DiagonalMap:
        self._check_curvature()
        return DiagonalMap.from_curvature(self.curvature, self.eps, exponent)

    def settled(self) -> DiagonalMap:
        """The same scales without the curvature (a float64 n-vector kept for ``with_eps``
        and ``with_exponent`` only: twice a float32 language model's bytes)."""
        if self.curvature is None:
            return self
        out = copy.copy(self)  # shares the scales
        out.curvature = None
        return out

    def _check_curvature(self):
        if self.curvature is None:
            raise ValueError("this DiagonalMap was built from scales, not a curvature")

    def apply(self, G):
        return G * self.scale.to(G.device)

    def apply_block(self, G, start, stop):
        return G * self.scale[start:stop].to(G.device)


class EigenMap(BoundPreconditioner):
    """P = V diag(d) Vᵀ with d ∝ 1/(|λ|^exponent + eps), Σ log d = 0 (det P = 1).

    Applied to a block of rows as ((G V) ⊙ d) Vᵀ: the second Vᵀ brings the stretched
    direction back to parameter coordinates (leaving it out, as the paper's code does, maps
    into the eigenbasis and is no better than no preconditioner). The two products run in
    ``dtype`` — the dtype the model's directions are formed in (float32 for float32, bfloat16
    and float16 models, float64 for float64 ones; see ``ray_dtype`` of the evaluator) — and
    the result is returned in float64, so the norm |P g| and the importance log-weight
    −n·log|P g| are accumulated in float64.

    Rounding: in float32 (unit roundoff u = 2⁻²⁴ ≈ 6·10⁻⁸) each entry of P g carries a
    relative error of order u·√n (rounding g, V and d, and summing n products). The error
    of the norm is an average of the entries' errors, so |P g| itself is off by far less —
    a few u — and the log-weight n·log|P g| by about n·δ for a relative error δ of |P g|:
    n·u ≈ 3·10⁻⁴ nats at n = 4810 (the digits MLP; ``tests/test_exponent_auto.py`` checks
    |Δ log-weight| ≤ 8·n·u, ``benchmarks/RESULTS.md`` has the measured change). The unit
    direction P g/|P g| is rounded to the model's dtype afterwards anyway. When float32
    products may use reduced precision (``torch.get_float32_matmul_precision()`` other than
    "highest": TF32 or bfloat16 matrix units), the map is applied in float64 instead. The
    float32 products always run on blocks of 64 rows (zero-padded), so that a direction's
    result does not depend on the other directions mapped with it.

    Parameters
    ----------
    eigenvalues : array-like (n,)
    eigenvectors : array-like (n, n)
        Orthonormal columns.
    eps, exponent : float
    dtype : torch.dtype, default=torch.float64
        The dtype the products are computed in (float64 or float32).

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners import EigenMap
    >>> V = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    >>> P = EigenMap(torch.tensor([1.0, 16.0]), V, eps=0.0, exponent=0.5)
    >>> Q = P.with_exponent(0.25)  # the same eigenbasis, d ∝ |λ|^(-1/4)
    >>> [round(x, 6) for x in Q.d.tolist()], Q.eigenvectors is P.eigenvectors
    ([1.414214, 0.707107], True)
    >>> G = torch.randn(3, 2, dtype=torch.float64)
    >>> single = EigenMap(P.eigenvalues, V, eps=0.0, exponent=0.5, dtype=torch.float32)
    >>> bool(torch.allclose(single.apply(G), P.apply(G), rtol=1e-6, atol=1e-6))
    True
    """

    def __init__(self, eigenvalues, eigenvectors, eps, exponent, dtype=torch.float64):
        self.eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
        self.eigenvectors = torch.as_tensor(eigenvectors, dtype=torch.float64)
        self.eps, self.exponent = float(eps), float(exponent)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"EigenMap dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.log_d = diagonal_scales(self.eigenvalues, eps, exponent)
        _check_log_det(self.log_d)
        self.d = self.log_d.exp()
        self.n = self.log_d.numel()
        # the eigenvectors cast to (dtype, device): n² numbers, shared with the maps made from
        # this one by with_eps/with_exponent (the eps pilot makes one per eps tried)
        self._cast = {}

    def _remade(self, eps, exponent) -> EigenMap:
        out = EigenMap(self.eigenvalues, self.eigenvectors, eps, exponent, self.dtype)
        out._cast = self._cast
        return out

    def with_eps(self, eps) -> EigenMap:
        return self._remade(eps, self.exponent)

    def with_exponent(self, exponent) -> EigenMap:
        return self._remade(self.eps, exponent)

    def _compute_dtype(self):
        if self.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return torch.float64  # TF32/bfloat16 products would round to ~1e-3
        return self.dtype

    def _eigenvectors_on(self, dtype, device):
        if dtype == torch.float64 and device.type == "cpu":
            return self.eigenvectors
        key = (dtype, str(device))
        if key not in self._cast:
            self._cast.clear()  # one cast copy at a time
            self._cast[key] = self.eigenvectors.to(device=device, dtype=dtype)
        return self._cast[key]

    def apply(self, G):
        dtype = self._compute_dtype()
        V = self._eigenvectors_on(dtype, G.device)
        d = self.d.to(device=G.device, dtype=dtype)
        if dtype == torch.float64:
            return ((G.to(dtype) @ V) * d) @ V.T
        rows = G.shape[0]
        X = G.to(dtype)
        pad = -rows % APPLY_ROWS
        if pad:
            X = torch.cat([X, X.new_zeros(pad, X.shape[1])])
        out = torch.cat([((block @ V) * d) @ V.T for block in X.split(APPLY_ROWS)])
        return out[:rows].to(torch.float64)


class IdentityMap(BoundPreconditioner):
    """P = I; ``is_identity`` lets sampling skip the map and eps selection skip its pilot."""

    is_identity = True

    def __init__(self, n):
        self.n = n

    def with_eps(self, eps):
        return self

    def with_exponent(self, exponent):
        return self

    def apply(self, G):
        return G

    def apply_block(self, G, start, stop):
        return G
