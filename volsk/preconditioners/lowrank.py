"""Low-rank + diagonal: a preconditioner from the GGN's top eigenpairs and the rest's diagonal.

Between the diagonal preconditioners and the full matrix: the top r eigenpairs (λ_j, v_j) of
the Gauss–Newton matrix H by randomized subspace iteration on GGN-vector products (never the
n × n matrix), and on the orthogonal complement of V = [v_1 … v_r] a diagonal curvature ρ.
The map is

    P = c · ( V diag(p) Vᵀ + Π diag(s) Π ),   Π = I − V Vᵀ,
    p_j = 1/(|λ_j|^exponent + eps),   s_i = 1/(|ρ_i|^exponent + eps),

symmetric positive-definite (it maps span V and its complement to themselves). ρ_i is the
complement's curvature along coordinate i, the Rayleigh quotient of Π H Π along Π e_i:
diag(Π H Π)_i / (1 − |V_i|²). Its determinant is exact in the log domain (the matrix
determinant lemma, in the form det(V⊥ᵀ S V⊥) = det S · det(Vᵀ S⁻¹ V)), and c makes it 1.
Applying P costs O(n·r) per direction.

With r = n it is the full-matrix map V (|Λ|^exponent + eps)⁻¹ Vᵀ; on a GGN that is
isotropic off a rank-r subspace (δ I + U Λ Uᵀ) it is exactly ∝ H^(−exponent) at eps = 0.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import is_integer
from .context import PreconditionerContext
from .curvature.ggn import ggn_diagonal
from .curvature.ggn_products import projected_ggn_diagonal, top_eigenpairs
from .curvature.kronecker import exact_outputs
from .curvature.target import curvature_target
from .kfac import _repr
from .maps import BoundPreconditioner

__all__ = ["LowRank", "LowRankMap"]


def _log_scales(h, eps, exponent):
    """−log(|h|^exponent + eps), not normalised; ValueError where it is infinite."""
    h = torch.as_tensor(h, dtype=torch.float64).abs()
    with np.errstate(divide="ignore"):
        scaled = torch.ones_like(h) if exponent == 0 else h.pow(exponent)
    log_p = -torch.log(scaled + eps)
    if not torch.isfinite(log_p).all():
        raise ValueError(
            "preconditioner curvature has zero entries and preconditioner_eps=0: P would be "
            "infinite there; use preconditioner_eps > 0"
        )
    return log_p


_INSIDE = 1e-8  # |Π e_i|² below which coordinate i counts as inside span V


def _complement(rho, V):
    """ρ with the coordinates inside span V (Π e_i ≈ 0) set to the others' median: P does not
    depend on their entry (Π diag(s) Π never reads it), so any finite value keeps det exact."""
    inside = (1.0 - (V * V).sum(1)) < _INSIDE
    if inside.any() and not inside.all():
        rho = rho.clone()
        rho[inside] = rho[~inside].median()
    return rho


class LowRankMap(BoundPreconditioner):
    """P = c (V diag(p) Vᵀ + Π diag(s) Π), Π = I − V Vᵀ, with det P = 1 (see the module).

    Parameters
    ----------
    eigenvalues : torch.Tensor
        (r,) curvature along the orthonormal columns of ``eigenvectors``.
    eigenvectors : torch.Tensor
        (n, r), orthonormal columns.
    complement_curvature : torch.Tensor or None
        (n,) curvature ρ on the complement of span V (None when r = n).
    eps, exponent : float

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners import LowRankMap
    >>> V = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    >>> P = LowRankMap(torch.tensor([100.0]), V, torch.ones(3), eps=0.0, exponent=0.5)
    >>> dense = P.apply(torch.eye(3, dtype=torch.float64))
    >>> [round(v, 6) for v in torch.diag(dense).tolist()]  # H = diag(100, 1, 1): ∝ H^(-1/2)
    [0.215443, 2.154435, 2.154435]
    >>> abs(float(torch.linalg.slogdet(dense).logabsdet)) < 1e-12  # det P = 1
    True
    """

    def __init__(self, eigenvalues, eigenvectors, complement_curvature, eps, exponent):
        self.eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64).cpu()
        self.eigenvectors = torch.as_tensor(eigenvectors, dtype=torch.float64).cpu()
        n, r = self.eigenvectors.shape
        self.n = int(n)
        self.complement = r < n
        self.complement_curvature = (
            None if complement_curvature is None
            else torch.as_tensor(complement_curvature, dtype=torch.float64).cpu())
        self.eps, self.exponent = float(eps), float(exponent)
        log_p = _log_scales(self.eigenvalues, eps, exponent)
        log_det = float(log_p.sum())
        if self.complement:
            if self.complement_curvature is None:
                raise ValueError("a LowRankMap of rank r < n needs the complement's curvature")
            log_s = _log_scales(_complement(self.complement_curvature, self.eigenvectors), eps,
                                exponent)
            # det of Π S Π on the complement = det S · det(Vᵀ S⁻¹ V); factor out the largest
            # entry of S⁻¹ so that the r × r matrix stays in range
            top = float((-log_s).max())
            inner = self.eigenvectors.T @ (self.eigenvectors * (-log_s - top).exp()[:, None])
            chol = torch.linalg.cholesky(0.5 * (inner + inner.T))
            log_det += float(log_s.sum()) + r * top + 2.0 * float(chol.diagonal().log().sum())
        shift = log_det / self.n
        self.log_p = log_p - shift
        self.p = self.log_p.exp()
        self.log_s = log_s - shift if self.complement else None
        self.s = None if self.log_s is None else self.log_s.exp()
        self._cache = {}

    def with_eps(self, eps) -> LowRankMap:
        return LowRankMap(self.eigenvalues, self.eigenvectors, self.complement_curvature, eps,
                          self.exponent)

    def with_exponent(self, exponent) -> LowRankMap:
        return LowRankMap(self.eigenvalues, self.eigenvectors, self.complement_curvature,
                          self.eps, exponent)

    def _on(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            def cast(t):
                return None if t is None else t.to(device=device, dtype=dtype)

            self._cache = {key: (cast(self.eigenvectors), cast(self.p), cast(self.s))}
        return self._cache[key]

    def apply(self, G):
        V, p, s = self._on(G.dtype, G.device)
        GV = G @ V  # (B, r)
        out = (GV * p) @ V.T
        if self.complement:
            Sg = (G - GV @ V.T) * s
            out += Sg - (Sg @ V) @ V.T
        return out


class LowRank:
    """Low-rank + diagonal Gauss–Newton curvature: top eigenpairs plus the rest's diagonal.

    The top ``rank`` eigenpairs of the cost's GGN/Fisher by randomized subspace iteration
    (Halko, Martinsson & Tropp 2011) on GGN-vector products — a JVP through the model, the
    cost's output-space factor, a VJP back: (power_iterations + 2)·(rank + oversampling)
    products, never the n × n matrix — and on their orthogonal complement the diagonal of the
    projected GGN Π H Π (exact from per-example Jacobians when an example has at most
    ``max_exact_outputs`` outputs, Hutchinson's estimate with ``probes`` products otherwise).
    See :class:`LowRankMap` for the map; det P = 1 exactly. Between "diag_hessian" and
    "hessian", for models of any size: memory n·(rank + oversampling), application O(n·rank)
    per direction. With rank ≥ n it is the full Gauss–Newton map (:class:`Fisher`).

    Parameters
    ----------
    rank : int, default=64
    oversampling : int, default=8
    power_iterations : int, default=2
    probes : int, default=64
    max_exact_outputs : int, default=256
    dtype : torch.dtype or None, default=torch.float64
        Precision of the curvature computation (None: the model's dtype).

    Examples
    --------
    >>> import torch
    >>> from volsk import LocalVolumeEstimator
    >>> from volsk.preconditioners import LowRank
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner=LowRank(rank=5),
    ...                            random_state=0).fit(net, torch.randn(16, 3))
    >>> bool(est.log_volume_ < 0)
    True
    """

    name = "lowrank"

    def __init__(self, rank=64, oversampling=8, power_iterations=2, probes=64,
                 max_exact_outputs=256, dtype=torch.float64):
        self.rank = rank
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.probes = probes
        self.max_exact_outputs = max_exact_outputs
        self.dtype = dtype

    def __repr__(self):
        return _repr(self)

    def _check(self):
        for name, least in (("rank", 1), ("oversampling", 0), ("power_iterations", 0),
                            ("probes", 1), ("max_exact_outputs", 1)):
            value = getattr(self, name)
            if not is_integer(value, least):
                raise ValueError(f"LowRank {name} must be an integer >= {least}, got {value!r}")

    def curvature(self, ctx: PreconditionerContext):
        """(eigenvalues (r,), eigenvectors (n_active, r), complement curvature (n_active,) or
        None), float64 on the CPU."""
        self._check()
        target = curvature_target(ctx, self.dtype)
        seed = target.random_state
        values, V, HV = top_eigenpairs(target, self.rank, self.oversampling,
                                       self.power_iterations, seed=seed)
        if V.shape[1] == target.n_active:
            return values.cpu(), V.cpu(), None
        if exact_outputs(target, self.max_exact_outputs):
            # diag(Π H Π) = diag H − 2 diag(V (HV)ᵀ) + diag(V VᵀHV Vᵀ), VᵀHV = diag(λ)
            diagonal = ggn_diagonal(target) - 2 * (V * HV).sum(1) + (V * V * values).sum(1)
        else:
            diagonal = projected_ggn_diagonal(target, V, self.probes, seed=seed)
        outside = 1.0 - (V * V).sum(1)  # |Π e_i|²
        rho = diagonal.clamp_min(0) / outside.clamp_min(_INSIDE)
        return values.cpu(), V.cpu(), rho.cpu()

    def bind(self, ctx: PreconditionerContext) -> BoundPreconditioner:
        values, V, rho = self.curvature(ctx)
        pieces = [values, V] + ([] if rho is None else [rho])
        if not all(torch.isfinite(t).all() for t in pieces):
            raise ValueError(f"{self!r} produced a curvature with NaN or infinite entries")
        return LowRankMap(values, V, rho, ctx.eps, ctx.exponent)
