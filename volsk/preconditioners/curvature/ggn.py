"""The exact generalised Gauss–Newton (Fisher) matrix of the cost, from per-example Jacobians.

GGN = Σ_x Jᵀ H_out J. For "kl" and "cross_entropy" it is the Fisher information of the
predictive distribution, Σ_x w_x Σ_c p_c ∇log q_c ∇log q_cᵀ (w_x the cost's weight of example
or token x, 1/N for a plain mean); at the anchor it *equals* the Hessian of the KL cost (its
gradient vanishes there) and of "mse" (the residual term vanishes where outputs = anchor
outputs).
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from ..._evaluate import memory_budget

__all__ = ["ggn_diagonal", "ggn_matrix"]


def _example_axes(X):
    """vmap in_dims of X (tensor, dict or tuple of tensors): every example along axis 0."""
    if isinstance(X, dict):
        return {k: 0 for k in X}
    if isinstance(X, tuple):
        return tuple(0 for _ in X)
    return 0


def _kwarg_axes(kwargs, n):
    """vmap in_dims of forward kwargs: per-example tensors along axis 0, the rest shared."""
    return {k: (0 if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else None)
            for k, v in kwargs.items()}


def _per_example(obj, axes, fn):
    """Apply ``fn`` to the tensors of ``obj`` (a tensor, tuple or dict) whose axis is 0 (one
    entry per example); shared values pass through."""
    if isinstance(obj, dict):
        return {k: _per_example(v, axes[k], fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_per_example(v, a, fn) for v, a in zip(obj, axes, strict=True))
    return fn(obj) if axes == 0 else obj


def _take(obj, axes, sl):
    return _per_example(obj, axes, lambda t: t[sl])


def _example(obj, axes, i):
    """Example i of a batch, without its leading axis (the inverse of _unsqueeze)."""
    return _per_example(obj, axes, lambda t: t[i])


def _unsqueeze(obj, axes):
    return _per_example(obj, axes, lambda t: t.unsqueeze(0))


def _outputs_on(ev, flat, X, kwargs):
    """Model outputs at the flat parameters ``flat`` on inputs X (one example, under vmap)."""
    params = ev.space.unflatten(flat)
    params.update(ev.fixed)
    return ev.call(params, X, kwargs)


def _ggn_rows(target, what):
    """Yield row blocks S (rows, n_active) float64 with Σ SᵀS = GGN, chunked over examples.

    Per-example Jacobians of the transformed outputs (vmap over examples of jacrev), each row
    scaled by its root weight: exact for any network whose examples do not interact in eval
    mode.
    """
    ev = target.evaluator
    n_a = target.n_active
    a0 = target.anchor
    for part in target.parts:
        transform, root = target.ggn_factor(part, what)
        batch = ev.batches[part.batch]
        x_axes = _example_axes(batch.X)
        kw_axes = _kwarg_axes(batch.kwargs, batch.n)
        chunk = max(1, min(batch.n, memory_budget(ev.device) // (24 * root[:1].numel() * n_a)))

        def one(active, x, kw, transform=transform, x_axes=x_axes, kw_axes=kw_axes):
            out = _outputs_on(ev, target.flat(active), _unsqueeze(x, x_axes),
                              _unsqueeze(kw, kw_axes))
            return transform(out).reshape(-1)  # (K,)

        jac = vmap(jacrev(one), in_dims=(None, x_axes, kw_axes))
        for start in range(0, batch.n, chunk):
            sl = slice(start, min(batch.n, start + chunk))
            X_sl, kw_sl = _take(batch.X, x_axes, sl), _take(batch.kwargs, kw_axes, sl)
            try:
                J = jac(a0, X_sl, kw_sl)
            except RuntimeError:
                # models with data-dependent control flow on their inputs (Hugging Face's
                # attention-mask checks) cannot be vmapped over examples: one example at a time
                J = torch.stack([
                    jacrev(one)(a0, _example(X_sl, x_axes, i), _example(kw_sl, kw_axes, i))
                    for i in range(sl.stop - sl.start)
                ])
            J = J.to(torch.float64) * root[sl].reshape(J.shape[0], -1, 1)  # (chunk, K, n_a)
            yield J.reshape(-1, n_a)


def ggn_diagonal(target) -> torch.Tensor:
    """Exact diagonal of the Gauss–Newton / Fisher matrix of the cost, (n_active,) float64.

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import FunctionalModel
    >>> from volsk.costs import make_cost
    >>> from volsk.preconditioners import PreconditionerContext
    >>> from volsk.preconditioners.curvature.ggn import ggn_diagonal
    >>> from volsk.preconditioners.curvature.target import curvature_target
    >>> model = torch.nn.Linear(3, 2, bias=False).double()
    >>> ev = FunctionalModel(model, torch.eye(3, dtype=torch.float64), "cpu")
    >>> cost = make_cost("mse", ev.anchor_outputs())
    >>> ctx = PreconditionerContext(ev, cost, torch.ones(6, dtype=torch.bool), )
    >>> d = ggn_diagonal(curvature_target(ctx))  # mse: 2/(N·D) Σ_n x_ni² = 1/3 per weight
    >>> bool(torch.allclose(d, torch.full((6,), 1 / 3, dtype=torch.float64)))
    True
    """
    out = torch.zeros(target.n_active, dtype=torch.float64, device=target.cols.device)
    with torch.no_grad():
        for S in _ggn_rows(target, "the Gauss–Newton diagonal"):
            out += S.pow(2).sum(0)
    return out


def ggn_matrix(target) -> torch.Tensor:
    """The Gauss–Newton / Fisher matrix of the cost, (n_active, n_active) float64."""
    n_a = target.n_active
    F = torch.zeros(n_a, n_a, dtype=torch.float64, device=target.cols.device)
    with torch.no_grad():
        for S in _ggn_rows(target, "the Fisher / Gauss–Newton matrix"):
            F.addmm_(S.T, S)
    return F
