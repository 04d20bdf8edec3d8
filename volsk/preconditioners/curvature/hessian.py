"""The Hessian of the cost at the anchor: exactly from Hessian-vector products, its diagonal
exactly or by Monte Carlo (the Gauss–Newton diagonal where it equals the Hessian's).

Hessian-vector products are forward-over-reverse (``jvp`` of ``jacrev``), vmapped over a block
of vectors and summed over data batches with the cost's weights.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import jacrev, jvp, vmap

from ..._evaluate import memory_budget
from .ggn import GGN_METHODS, gauss_newton_diagonal

__all__ = ["hessian_matrix", "hessian_diagonal", "anchor_hessian_diagonal"]


def _hvp_batches(target, vectors_fn, total):
    """Apply H to ``total`` vectors, produced block by block by ``vectors_fn(start, stop)``.

    H v = Σ_b w_b H_b v over data batches; forward-over-reverse, vmapped over a block of v.
    """
    ev = target.evaluator
    per = max(1, 4 * ev.bytes_per_direction())
    block = int(max(1, min(total, 512, memory_budget(ev.device) // per)))
    a0 = target.anchor
    products = []
    for part in target.parts:
        # jacrev, not grad: grad's double backward through mse_loss trips on ZeroTensors in jvp
        gradient = jacrev(lambda a, part=part: target.part_cost_of(part, a))
        products.append((part.weight,
                         vmap(lambda v, gradient=gradient: jvp(gradient, (a0,), (v,))[1])))
    for start in range(0, total, block):
        stop = min(total, start + block)
        V = vectors_fn(start, stop)
        yield start, stop, V, sum(w * hvp(V).to(torch.float64) for w, hvp in products)


def hessian_matrix(target) -> torch.Tensor:
    """The exact Hessian of the cost on the active coordinates, symmetrised, float64."""
    n_a = target.n_active
    eye = torch.eye(n_a, dtype=target.anchor.dtype, device=target.cols.device)
    H = torch.empty(n_a, n_a, dtype=torch.float64, device=target.cols.device)
    for start, stop, _V, HV in _hvp_batches(target, lambda a, b: eye[a:b], n_a):
        H[start:stop] = HV
    return 0.5 * (H + H.T)


def hessian_diagonal(target, probes=None) -> torch.Tensor:
    """diag of the cost's Hessian: exact (n_active HVPs) or Hutchinson with ``probes`` vectors.

    Hutchinson: diag H ≈ mean over Rademacher z of z ⊙ H z (unbiased; relative error
    ~ sqrt(Σ_j H_ij² / H_ii²) / sqrt(probes)).
    """
    n_a = target.n_active
    dtype = target.anchor.dtype
    device = target.cols.device
    out = torch.zeros(n_a, dtype=torch.float64, device=device)
    if probes is None:
        eye = torch.eye(n_a, dtype=dtype, device=device)
        for start, stop, _V, HV in _hvp_batches(target, lambda a, b: eye[a:b], n_a):
            idx = torch.arange(start, stop, device=device)
            out[start:stop] = HV[torch.arange(stop - start, device=device), idx]
        return out
    gen = torch.Generator(device="cpu").manual_seed(target.random_state)
    Z = (torch.randint(0, 2, (int(probes), n_a), generator=gen) * 2 - 1).to(dtype).to(device)
    for _start, _stop, V, HV in _hvp_batches(target, lambda a, b: Z[a:b], int(probes)):
        out += (V.to(torch.float64) * HV).sum(0)
    return out / int(probes)


def anchor_hessian_diagonal(target, probes=None, max_exact=5000, *, method="auto",
                            samples=64) -> torch.Tensor:
    """The diagonal of the cost's Hessian at the anchor, (n_active,) float64.

    "kl" (with normalised probabilities) and "mse": the Gauss–Newton diagonal, which equals the
    Hessian's at the anchor, by :func:`~.ggn.gauss_newton_diagonal` (``method``: "exact" from
    per-example Jacobians, "sampled" by Monte Carlo with ``samples`` backward passes per data
    batch, "auto" exact while one example's Jacobian fits in memory); ``probes`` and
    ``max_exact`` do not apply. Anything else ("cross_entropy", callables): Hessian-vector
    products — "exact": n_active of them; "sampled": Hutchinson's estimate with ``probes``
    (default ``samples``) Rademacher vectors; "auto": exact when ``probes`` is None and
    n_active ≤ ``max_exact``, Hutchinson otherwise (with a warning when ``probes`` was not
    given).
    """
    if method not in GGN_METHODS:
        raise ValueError(f"method must be one of {GGN_METHODS}, got {method!r}")
    if all(part.cost.hessian_equals_ggn() for part in target.parts):
        return gauss_newton_diagonal(target, method, samples)
    if method == "exact":
        return hessian_diagonal(target, None)
    if method == "sampled":
        return hessian_diagonal(target, samples if probes is None else probes)
    if probes is None and target.n_active > max_exact:
        warnings.warn(
            f"the exact Hessian diagonal would take {target.n_active} Hessian-vector products "
            f"(> max_exact={max_exact}); using Hutchinson's estimate with {samples} probes",
            RuntimeWarning,
            stacklevel=3,
        )
        probes = samples
    return hessian_diagonal(target, probes)
