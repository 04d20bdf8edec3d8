"""The generalised Gauss–Newton (Fisher) matrix of the cost: exactly, from per-example
Jacobians, or its diagonal by Monte Carlo over output-space cotangents.

GGN = Σ_x Jᵀ H_out J. For "kl" and "cross_entropy" it is the Fisher information of the
predictive distribution, Σ_x w_x Σ_c p_c ∇log q_c ∇log q_cᵀ (w_x the cost's weight of example
or token x, 1/N for a plain mean); at the anchor it *equals* the Hessian of the KL cost (its
gradient vanishes there) and of "mse" (the residual term vanishes where outputs = anchor
outputs).

The exact route holds one example's Jacobian, (outputs per example) × n_active entries: for
a language model, tokens × vocabulary × n_active. :func:`sampled_ggn_diagonal` needs one
backward pass per sample and memory for one data batch's activations and outputs;
:func:`gauss_newton_diagonal` chooses between the two.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vjp, vmap

from ..._checks import is_integer
from ..._evaluate import memory_budget

__all__ = ["ggn_diagonal", "ggn_matrix", "sampled_ggn_diagonal", "gauss_newton_diagonal",
           "ggn_route", "exact_jacobian_bytes", "GGN_METHODS"]

#: How :func:`gauss_newton_diagonal` may compute the diagonal.
GGN_METHODS = ("auto", "exact", "sampled")
# The exact route's smallest chunk is one example's Jacobian; "auto" takes it while that fits
# in this many bytes (or the device's memory budget, if larger).
EXACT_JACOBIAN_BYTES = 1 << 30
# bytes per Jacobian entry in the exact route: the model-dtype Jacobian, its float64 copy and
# the root-weighted rows
_JACOBIAN_ENTRY_BYTES = 24
# gradient entries squared at once in the sampled route: a float64 temporary of 512 KiB
_SQUARE_CHUNK = 1 << 16


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
        chunk = max(1, min(batch.n, memory_budget(ev.device)
                                // (_JACOBIAN_ENTRY_BYTES * root[:1].numel() * n_a)))

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


def _rademacher_cotangent(root, generator, signs, out):
    """root ⊙ v for v uniform on {−1, 1}^root.shape, written into ``out`` (root's shape, dtype
    and device), with no allocation.

    v = 1 − 2b for b the bits of ``torch.randint(0, 2, root.shape, generator=generator)`` (one
    draw per output, in order, from the CPU generator: the same numbers on every device and in
    every dtype), drawn straight into ``out`` (``signs`` None: ``out`` on the CPU), or into the
    CPU int8 buffer ``signs`` and copied (to another device); then one exact pass,
    root − 2·b·root.
    """
    if signs is None:
        out.random_(0, 2, generator=generator)
    else:
        out.copy_(signs.random_(0, 2, generator=generator))
    return torch.addcmul(root, out, root, value=-2, out=out)


class _ActiveSquares:
    """Adds g_i² of the active coordinates i to a float64 (n_active,) sum, straight from the
    per-tensor gradients g: no flat copy of g, and float64 squares a chunk at a time.

    Only parameter tensors with an active coordinate are differentiated (``names``); a tensor
    wholly active is added as it is, a partly active one through the local indices of its
    active coordinates. ``target.cols`` are distinct coordinates in any order: the sum is kept
    in increasing coordinate order and put back in ``cols``' order by :meth:`result`.
    """

    def __init__(self, target):
        space = target.evaluator.space
        cols = target.cols
        self.order = None
        if cols.numel() > 1 and not bool((cols[1:] > cols[:-1]).all()):
            self.order = torch.argsort(cols)
            cols = cols[self.order]
        offsets = space.offsets().tolist()
        bounds = torch.searchsorted(
            cols, torch.tensor(offsets, dtype=cols.dtype, device=cols.device)).tolist()
        self.n_active = int(cols.numel())
        self.device = cols.device
        self.pieces = []  # (name, lo, hi, local indices or None when the whole tensor is active)
        for name, start, numel, lo, hi in zip(space.names, offsets[:-1], space.numels,
                                              bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                local = None if hi - lo == numel else cols[lo:hi] - start
                self.pieces.append((name, lo, hi, local))
        self.names = [piece[0] for piece in self.pieces]

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.n_active, dtype=torch.float64, device=self.device)

    def add(self, total, grads) -> None:
        """total += g² over the active coordinates (``grads``: name → gradient tensor), squared
        in float64 a chunk at a time (an in-cache temporary; a gradient may be shared by two
        tensors or by the cotangent, so it is never squared in place)."""
        for name, lo, hi, local in self.pieces:
            g = grads[name].reshape(-1)
            # a float32 (or narrower) number's float64 square is exact: a fused multiply-add
            # rounds as the product then the sum do, in one pass fewer
            fused = torch.finfo(g.dtype).bits <= 32
            for start in range(0, hi - lo, _SQUARE_CHUNK):
                stop = min(hi - lo, start + _SQUARE_CHUNK)
                piece = g[start:stop] if local is None else g[local[start:stop]]
                x = piece.to(torch.float64, copy=True)
                if fused:
                    total[lo + start:lo + stop].addcmul_(x, x)
                else:
                    total[lo + start:lo + stop] += x.mul_(x)

    def result(self, total) -> torch.Tensor:
        """``total`` in the order of ``target.cols``."""
        if self.order is None:
            return total
        out = torch.empty_like(total)
        out[self.order] = total
        return out


def _gradient_samples(target, samples, seed, what, names):
    """Yield ``(part, grads)`` for each data batch (outer) and sample (inner): grads = name →
    the gradient of the parameter tensor ``name`` (those in ``names``) in g = J_bᵀ(root ⊙ v),
    v Rademacher over the batch's outputs. Each item is valid until the next is drawn.

    One forward pass per batch (its graph kept for the batch's samples), one backward pass per
    sample, into one cotangent buffer; the Rademacher signs come from one CPU generator seeded
    with ``seed``, in this order, so the numbers do not depend on the device or on anything but
    (seed, samples, data batches). The anchor's parameters are the primals as they are (views
    of θ in the model's dtype where θ is kept so): the graph holds no flat copy of θ.
    """
    ev = target.evaluator
    theta = ev.theta.to(ev.model_dtype)
    params = ev.space.unflatten(theta)
    primals = {name: params.pop(name) for name in names}
    constants = {**params, **ev.fixed}  # tensors without an active coordinate: not differentiated
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    for part in target.parts:
        transform, root = target.ggn_factor(part, what, output_dtype=True)
        if not primals:
            continue  # no active coordinate: nothing to differentiate
        batch = ev.batches[part.batch]

        def f(active, transform=transform, batch=batch):
            return transform(ev.call({**constants, **active}, batch.X, batch.kwargs))

        out, pull = vjp(f, primals)
        del out  # the graph keeps what the backward passes need
        cotangent = torch.empty_like(root)
        signs = (None if root.device.type == "cpu" else
                 torch.empty(root.shape, dtype=torch.int8))
        for _ in range(int(samples)):
            (grads,) = pull(_rademacher_cotangent(root, generator, signs, cotangent))
            yield part, grads
            del grads
        del pull, cotangent, signs, root


def sampled_ggn_diagonal(target, samples=64, seed=None) -> torch.Tensor:
    """Monte-Carlo diagonal of the Gauss–Newton / Fisher matrix, (n_active,) float64.

    The GGN of data batch b is G_b = J_bᵀ diag(root²) J_b, with J_b the Jacobian of the cost's
    output transform on all of the batch's K_b outputs (examples × tokens × classes) and root
    from ``BoundCost.ggn_factor`` (it carries the batch's weight in the cost and the token
    mask). For v uniform on {−1, 1}^{K_b} and g = J_bᵀ(root ⊙ v) — one backward pass —

        E[g_i²] = Σ_{k,l} J_ki root_k J_li root_l E[v_k v_l] = Σ_k J_ki² root_k² = (G_b)_ii,

    because E[v_k v_l] = 0 for k ≠ l: the cross terms between different outputs, classes,
    tokens *and examples* of the batch vanish in expectation, so squaring the gradient summed
    over the batch is unbiased (a v shared by the examples of a batch, or one sign per example,
    would not be: its cross terms between examples do not vanish). The estimate is
    (1/S) Σ_s Σ_b g_{b,s}², each batch's gradient squared on its own (squaring the sum over
    batches would add cross terms of mean zero: variance, no information).

    Variance: with a_k = J_ki root_k, Var(g_i²) = 2[(Σ_k a_k²)² − Σ_k a_k⁴] ≤ 2 (G_b)_ii², so
    every coordinate's relative standard error is at most sqrt(2/S), whatever the predictive
    distribution (a Gaussian v has exactly that; Rademacher is never worse). The alternative
    for the Fisher, one label per position sampled from the anchor's distribution, is unbiased
    too (its cross terms have mean Σ_c ∇q_c = 0 at the anchor), but its relative variance has
    no bound: a vocabulary row whose token has probability p is seen with probability ~p per
    position and sample, so its estimate is mostly 0 and its relative variance ~1/p.

    Memory: one data batch's forward graph, two buffers the size of its outputs in their dtype
    (root and the cotangent, reused by every sample), one backward pass's gradients and the
    float64 sum — never outputs × n_active, and nothing that grows with ``samples``. The
    numbers depend only on ``seed``, ``samples`` and the data batches.

    Parameters
    ----------
    target : CurvatureTarget
        Its cost must have a Gauss–Newton factor ("kl", "cross_entropy", "mse").
    samples : int, default=64
        Backward passes per data batch.
    seed : int, optional
        Seed of the Rademacher signs (default: ``target.random_state``).

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import FunctionalModel
    >>> from volsk.costs import make_cost
    >>> from volsk.preconditioners import PreconditionerContext
    >>> from volsk.preconditioners.curvature.ggn import ggn_diagonal, sampled_ggn_diagonal
    >>> from volsk.preconditioners.curvature.target import curvature_target
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))
    >>> ev = FunctionalModel(model, torch.randn(64, 3), "cpu")
    >>> ctx = PreconditionerContext(ev, make_cost("kl", ev.anchor_outputs()),
    ...                             torch.ones(41, dtype=torch.bool), random_state=0)
    >>> target = curvature_target(ctx)
    >>> estimate, exact = sampled_ggn_diagonal(target, samples=400), ggn_diagonal(target)
    >>> bool(((estimate - exact).abs() <= 0.36 * exact).all())  # 5 × sqrt(2/400) relative
    True
    """
    if not is_integer(samples, 1):
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    seed = target.random_state if seed is None else seed
    squares = _ActiveSquares(target)
    total = squares.zeros()
    for _part, grads in _gradient_samples(target, samples, seed,
                                          "the sampled Gauss–Newton diagonal", squares.names):
        squares.add(total, grads)
        del grads  # not held while the next sample's backward pass runs
    return squares.result(total).div_(samples)


def exact_jacobian_bytes(target) -> int:
    """Bytes the exact route needs at least: one example's Jacobian (outputs × n_active) with
    its float64 copies, for the data batch with the most outputs per example."""
    ev = target.evaluator
    outputs = max(ev.anchor_outputs(part.batch).numel() // max(1, ev.batches[part.batch].n)
                  for part in target.parts)
    return _JACOBIAN_ENTRY_BYTES * outputs * target.n_active


def ggn_route(target, method="auto") -> str:
    """The route :func:`gauss_newton_diagonal` takes: "exact" or "sampled".

    ``"auto"``: exact while one example's Jacobian (:func:`exact_jacobian_bytes`) fits in
    1 GiB or the device's memory budget, whichever is larger — a classifier's few outputs per
    example — sampled otherwise (a language model's tokens × vocabulary).
    """
    if method not in GGN_METHODS:
        raise ValueError(f"method must be one of {GGN_METHODS}, got {method!r}")
    if method != "auto":
        return method
    limit = max(EXACT_JACOBIAN_BYTES, memory_budget(target.cols.device))
    return "exact" if exact_jacobian_bytes(target) <= limit else "sampled"


def gauss_newton_diagonal(target, method="auto", samples=64, seed=None) -> torch.Tensor:
    """The Gauss–Newton diagonal, exactly or by Monte Carlo: (n_active,) float64.

    ``method="exact"``: :func:`ggn_diagonal` (per-example Jacobians); ``"sampled"``:
    :func:`sampled_ggn_diagonal` with ``samples`` backward passes per data batch; ``"auto"``:
    the route :func:`ggn_route` chooses from the memory one example's Jacobian needs.

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import FunctionalModel
    >>> from volsk.costs import make_cost
    >>> from volsk.preconditioners import PreconditionerContext
    >>> from volsk.preconditioners.curvature.ggn import ggn_diagonal, gauss_newton_diagonal
    >>> from volsk.preconditioners.curvature.target import curvature_target
    >>> model = torch.nn.Linear(3, 2)
    >>> ev = FunctionalModel(model, torch.randn(8, 3), "cpu")
    >>> ctx = PreconditionerContext(ev, make_cost("kl", ev.anchor_outputs()),
    ...                             torch.ones(8, dtype=torch.bool))
    >>> target = curvature_target(ctx)
    >>> bool(torch.equal(gauss_newton_diagonal(target), ggn_diagonal(target)))  # 2 outputs
    True
    """
    if ggn_route(target, method) == "exact":
        return ggn_diagonal(target)
    return sampled_ggn_diagonal(target, samples, seed)
