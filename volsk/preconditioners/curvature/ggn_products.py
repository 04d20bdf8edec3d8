"""Gauss–Newton-vector products, and what they give without the n × n matrix: top eigenpairs
and Hutchinson diagonals.

GGN v = Σ_x J_xᵀ diag(root_x²) J_x v, with J_x the Jacobian of the cost's output transform
(see ``BoundCost.ggn_factor``): a forward-mode JVP through the model, the output-space factor,
then a reverse-mode VJP — the cost of about three forward passes per vector, vmapped over a
block of vectors. Nothing of size n² is formed.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from ..._evaluate import memory_budget

__all__ = ["ggn_products", "projected_ggn_diagonal", "top_eigenpairs"]


def ggn_products(target, V: torch.Tensor, what="the Gauss–Newton products") -> torch.Tensor:
    """GGN · V for the columns of ``V`` (n_active, m): (n_active, m) float64.

    Parameters
    ----------
    target : CurvatureTarget
    V : torch.Tensor
        (n_active, m) vectors on the active coordinates.

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import FunctionalModel
    >>> from volsk.costs import make_cost
    >>> from volsk.preconditioners import PreconditionerContext
    >>> from volsk.preconditioners.curvature.ggn import ggn_matrix
    >>> from volsk.preconditioners.curvature.ggn_products import ggn_products
    >>> from volsk.preconditioners.curvature.target import curvature_target
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> ev = FunctionalModel(model, torch.randn(8, 3), "cpu")
    >>> ctx = PreconditionerContext(ev, make_cost("kl", ev.anchor_outputs()),
    ...                             torch.ones(26, dtype=torch.bool))
    >>> target = curvature_target(ctx)
    >>> V = torch.randn(26, 3, dtype=torch.float64)
    >>> bool(torch.allclose(ggn_products(target, V), ggn_matrix(target) @ V))
    True
    """
    ev = target.evaluator
    a0 = target.anchor
    n_a, m = V.shape
    out = torch.zeros(n_a, m, dtype=torch.float64, device=a0.device)
    if m == 0:
        return out
    per = max(1, 4 * ev.bytes_per_direction())
    block = int(max(1, min(m, 512, memory_budget(ev.device) // per)))
    rows = V.T.to(a0.dtype)  # (m, n_active)
    for part in target.parts:
        transform, root = target.ggn_factor(part, what)

        def f(active, part=part, transform=transform):
            return transform(ev.outputs(target.flat(active), part.batch))

        _, pull = vjp(f, a0)
        weight = root.pow(2)

        def gvp(v, f=f, pull=pull, weight=weight):
            tangent = jvp(f, (a0,), (v,))[1]
            return pull(tangent * weight.to(tangent.dtype))[0]

        for start in range(0, m, block):
            chunk = rows[start : start + block]
            try:
                prod = vmap(gvp)(chunk)
            except RuntimeError:
                # data-dependent control flow (Hugging Face's attention-mask checks) cannot be
                # vmapped: one vector at a time
                prod = torch.stack([gvp(v) for v in chunk])
            out[:, start : start + chunk.shape[0]] += prod.T.to(torch.float64)
    return out


def _orthonormal(Y):
    return torch.linalg.qr(Y, mode="reduced").Q


def top_eigenpairs(target, rank, oversampling=8, power_iterations=2, seed=0):
    """The top ``rank`` eigenpairs of the GGN by randomized subspace iteration.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4 followed by Rayleigh–Ritz: a Gaussian
    block of rank + oversampling columns, ``power_iterations`` rounds of GGN products with
    re-orthonormalisation, then the eigenpairs of the projected matrix QᵀHQ. Costs
    (power_iterations + 2)·(rank + oversampling) GGN-vector products. Exact when
    rank + oversampling ≥ n_active (then Q spans everything).

    Returns
    -------
    eigenvalues : torch.Tensor
        (r,) float64, descending, r = min(rank, n_active).
    eigenvectors : torch.Tensor
        (n_active, r) float64, orthonormal columns.
    products : torch.Tensor
        (n_active, r) float64, GGN · eigenvectors (as computed, not λ·v).
    """
    n_a = target.n_active
    k = int(min(n_a, rank + oversampling))
    r = int(min(rank, n_a))
    device = target.cols.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n_a, k, generator=gen, dtype=torch.float64).to(device)
    what = "preconditioner 'lowrank'"
    Y = ggn_products(target, omega, what)
    for _ in range(int(power_iterations)):
        Y = ggn_products(target, _orthonormal(Y), what)
    Q = _orthonormal(Y)
    Z = ggn_products(target, Q, what)  # (n_a, k)
    T = Q.T @ Z
    vals, vecs = torch.linalg.eigh(0.5 * (T + T.T))
    order = torch.argsort(vals, descending=True)[:r]
    E = vecs[:, order]
    return vals[order], Q @ E, Z @ E


def projected_ggn_diagonal(target, V, probes, seed=0, cols=None):
    """Hutchinson's estimate of diag(Π H Π), Π = I − V Vᵀ, H the GGN: (n_active,) float64.

    diag(M) ≈ mean over Rademacher z of z ⊙ M z (unbiased). Projecting out the top
    eigenvectors first removes the part of H that dominates its off-diagonal mass, which is
    what the estimate's variance grows with. ``V`` may have zero columns (Π = I). With
    ``cols`` (indices into the active coordinates) only those coordinates' diagonal is
    estimated, with probes supported on them.
    """
    n_a = target.n_active
    device = target.cols.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    support = torch.arange(n_a) if cols is None else torch.as_tensor(cols).cpu()
    out = torch.zeros(support.numel(), dtype=torch.float64, device=device)
    V = V.to(device=device, dtype=torch.float64)
    # a few float64 (n_active, block) matrices at a time
    block = int(max(1, min(64, memory_budget(device) // (32 * n_a))))
    for start in range(0, int(probes), block):
        m = min(int(probes), start + block) - start
        signs = torch.randint(0, 2, (support.numel(), m), generator=gen) * 2 - 1
        Z = torch.zeros(n_a, m, dtype=torch.float64, device=device)
        Z[support.to(device)] = signs.to(device=device, dtype=torch.float64)
        W = Z - V @ (V.T @ Z)
        HW = ggn_products(target, W, "a Hutchinson Gauss–Newton diagonal")
        PHW = HW - V @ (V.T @ HW)
        out += (Z * PHW)[support.to(device)].sum(1)
    return out / int(probes)
