"""Curvature of the cost at the anchor: what the preconditioners are built from.

Everything here is computed on the active coordinates (flat coordinates integrated out are left
out before any matrix is formed) and returned in float64:

- :func:`ggn_diagonal` / :func:`ggn_matrix`: the generalised Gauss–Newton matrix
  Σ_x Jᵀ H_out J of the cost. For "kl" and "cross_entropy" it is the Fisher information of the
  predictive distribution, Σ_x w_x Σ_c p_c ∇log q_c ∇log q_cᵀ (w_x the cost's weight of example
  or token x, 1/N for a plain mean); at the anchor it *equals* the Hessian of the KL cost
  (DESIGN §2) and of "mse" (the residual term vanishes where outputs = anchor outputs).
- :func:`hessian_diagonal` / :func:`hessian_matrix`: the exact Hessian of any cost from
  Hessian-vector products (forward-over-reverse), or Hutchinson's estimate of its diagonal.
- :func:`hesscale_diagonal`: HesScale (Elsayed & Mahmood 2022) for nn.Sequential stacks.
- :func:`optimizer_moment`: Adam's bias-corrected moments, mapped to parameters by identity.

By default curvature is computed on a float64 twin of the model (``curvature_target``), so that
float32 rounding does not swamp small eigenvalues; the estimator still measures the model in its
own dtype.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from ._evaluate import BatchedCost, FunctionalModel, memory_budget
from .costs import make_cost, to_log_probs

__all__ = [
    "CurvatureTarget",
    "curvature_target",
    "exact_hessian_diagonal",
    "ggn_diagonal",
    "ggn_matrix",
    "hessian_diagonal",
    "hessian_matrix",
    "hesscale_diagonal",
    "optimizer_moment",
]


# ------------------------------------------------------------------------------ the target


@dataclass
class CostPart:
    """One data batch's share of the cost: C = Σ_parts weight · cost(outputs on the batch)."""

    batch: int
    cost: object
    weight: float
    token_mask: object = None


@dataclass
class CurvatureTarget:
    """The cost as a function of the active coordinates, on a (float64) twin of the model.

    Attributes
    ----------
    evaluator : FunctionalModel
        The model whose curvature is taken (a float64 twin of the estimator's evaluator).
    parts : list of CostPart
        The cost per data batch, C = Σ_b w_b C_b (one part when X is not batched).
    cost_name : str or callable
    output : str
    cols : torch.Tensor
        (n_active,) indices of the active coordinates.
    random_state : int
    """

    evaluator: FunctionalModel
    parts: list
    cost_name: object
    output: str
    cols: torch.Tensor
    random_state: int = 0

    @property
    def n_active(self) -> int:
        return int(self.cols.numel())

    @property
    def anchor(self) -> torch.Tensor:
        """The active coordinates of θ, (n_active,) in the evaluator's precision."""
        return self.evaluator.theta[self.cols].to(self.evaluator.model_dtype)

    def flat(self, active: torch.Tensor) -> torch.Tensor:
        """The full parameter vector with the active coordinates replaced by ``active``."""
        theta = self.evaluator.theta.to(active.dtype)
        if self.cols.numel() == theta.numel():
            return active
        return theta.index_copy(0, self.cols, active)

    def part_cost_of(self, part: CostPart, active: torch.Tensor) -> torch.Tensor:
        return part.cost(self.evaluator.outputs(self.flat(active), part.batch))

    def cost_of(self, active: torch.Tensor) -> torch.Tensor:
        return sum(part.weight * self.part_cost_of(part, active) for part in self.parts)


def curvature_target(ctx, dtype=torch.float64) -> CurvatureTarget:
    """The cost of ``ctx`` on a twin of the model in ``dtype`` (None: the model's own dtype).

    The twin is a deep copy of the evaluator's private copy cast to ``dtype``, on the same data
    batches, with the estimator's per-batch cost weights. "kl" and "mse" are re-bound to the
    twin's anchor outputs; other costs (whose anchor enters only as a constant, or which need
    labels) are used as the estimator bound them. If the model cannot run in ``dtype`` (a
    forward that hard-codes float32 tensors), the model's own precision is used with a warning.
    """
    ev = ctx.evaluator
    cols = torch.nonzero(ctx.mask).flatten().to(ev.device)
    cost = ctx.cost
    pieces = list(zip(cost.parts, cost.weights)) if isinstance(cost, BatchedCost) else [(cost, 1.0)]
    if len(pieces) != len(ev.batches):
        raise ValueError(f"the cost has {len(pieces)} data batch(es), the model {len(ev.batches)}")
    twin = ev
    if dtype is not None and ev.model_dtype != dtype and ev.model_dtype.is_floating_point:
        try:
            module = copy.deepcopy(ev.module).to(dtype)
            twin = FunctionalModel(module, None, ev.device, batches=ev.batches)
            twin.anchor_outputs(0)
        except (RuntimeError, TypeError) as exc:
            warnings.warn(
                f"could not evaluate the model in {dtype} for its curvature ({exc}); using "
                f"{ev.model_dtype}",
                RuntimeWarning,
                stacklevel=3,
            )
            twin = ev
    parts = []
    for b, (part_cost, weight) in enumerate(pieces):
        mask = twin.batches[b].token_mask()
        if twin is not ev and ctx.cost_name in ("kl", "mse"):
            # re-anchored on the twin's own outputs, so that the gradient at θ vanishes to
            # float64 rounding and the KL Hessian equals the Fisher exactly
            part_cost = make_cost(ctx.cost_name, twin.anchor_outputs(b), output=ctx.output,
                                  mask=mask)
        parts.append(CostPart(b, part_cost, float(weight), mask))
    return CurvatureTarget(twin, parts, ctx.cost_name, ctx.output, cols, int(ctx.random_state))


# --------------------------------------------------------------- Gauss–Newton / Fisher (exact)


def _position_weights(part, anchor):
    """Each example/token position's weight in the whole cost (shape anchor.shape[:-1])."""
    mask = part.token_mask
    if mask is not None and anchor.ndim >= 3 and tuple(mask.shape) == tuple(anchor.shape[:-1]):
        m = mask.to(anchor.dtype)
        return part.weight * m / m.sum()
    shape = anchor.shape[:-1]
    return torch.full(shape, part.weight / max(1, math.prod(shape)), dtype=anchor.dtype,
                      device=anchor.device)


def _ggn_factor(target, part):
    """(transform, root): part's GGN = Σ_x J_xᵀ diag(root_x²) J_x, J_x = ∂transform(out_x)/∂θ.

    None when the cost has no known output-space factorisation (callables).
    """
    anchor = target.evaluator.anchor_outputs(part.batch)
    name = target.cost_name
    if isinstance(name, str) and name in ("kl", "cross_entropy"):
        log_p = to_log_probs(anchor, target.output).to(torch.float64)
        root = (_position_weights(part, log_p)[..., None] * log_p.exp()).sqrt()
        return (lambda out: to_log_probs(out, target.output)), root
    if isinstance(name, str) and name == "mse":
        root = torch.full(anchor.shape, math.sqrt(2.0 * part.weight / anchor.numel()),
                          dtype=torch.float64, device=anchor.device)
        return (lambda out: out), root
    return None


def _is_normalised(target) -> bool:
    """Whether the model's probabilities sum to one (then Fisher = KL Hessian at the anchor)."""
    for part in target.parts:
        log_p = to_log_probs(target.evaluator.anchor_outputs(part.batch), target.output)
        if not bool((torch.logsumexp(log_p.to(torch.float64), dim=-1).abs() < 1e-6).all()):
            return False
    return True


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
        factor = _ggn_factor(target, part)
        if factor is None:
            raise ValueError(
                f"{what} needs cost 'kl', 'cross_entropy' or 'mse' (a known output-space "
                f"curvature); got cost={target.cost_name!r}. Use preconditioner='hessian' or "
                "'diag_hessian' for a callable cost."
            )
        transform, root = factor
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
    >>> from volsk._curvature import curvature_target, ggn_diagonal
    >>> from volsk._evaluate import FunctionalModel
    >>> from volsk.costs import make_cost
    >>> from volsk.preconditioners import PreconditionerContext
    >>> model = torch.nn.Linear(3, 2, bias=False).double()
    >>> ev = FunctionalModel(model, torch.eye(3, dtype=torch.float64), "cpu")
    >>> cost = make_cost("mse", ev.anchor_outputs())
    >>> ctx = PreconditionerContext(ev, cost, torch.ones(6, dtype=torch.bool), cost_name="mse")
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


# ----------------------------------------------------------------- Hessian-vector products


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


def exact_hessian_diagonal(target, probes=None, max_exact=5000) -> torch.Tensor:
    """The exact diagonal of the cost's Hessian at the anchor, by the cheapest exact route.

    "kl" (with normalised probabilities) and "mse": the Gauss–Newton diagonal, which equals the
    Hessian's at the anchor; anything else ("cross_entropy", callables): Hessian-vector
    products — n_active of them when ``probes`` is None and n_active ≤ ``max_exact``,
    otherwise Hutchinson with ``probes`` (default 64) Rademacher vectors.
    """
    name = target.cost_name
    if isinstance(name, str) and (name == "mse" or (name == "kl" and _is_normalised(target))):
        return ggn_diagonal(target)
    if probes is None and target.n_active > max_exact:
        warnings.warn(
            f"the exact Hessian diagonal would take {target.n_active} Hessian-vector products "
            f"(> max_exact={max_exact}); using Hutchinson's estimate with 64 probes",
            RuntimeWarning,
            stacklevel=3,
        )
        probes = 64
    return hessian_diagonal(target, probes)


# ------------------------------------------------------------------------------- HesScale

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish, nn.LogSigmoid,
)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED = (
    "Linear, Conv1d/2d/3d, Flatten, Dropout, Identity, elementwise activations and a final "
    "Softmax/LogSoftmax"
)


def _leaf_layers(module, prefix=""):
    """(name, layer) of an nn.Sequential, nested Sequentials flattened, in execution order."""
    out = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out.extend(_leaf_layers(child, path + "."))
        else:
            out.append((path, child))
    return out


def _joined(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _check_layers(module):
    if isinstance(module, (nn.Linear, *_CONV)):
        return [("", module)]  # a one-layer stack
    if not isinstance(module, nn.Sequential):
        raise ValueError(
            f"preconditioner='hesscale' needs the model to be an nn.Sequential (possibly nested) "
            f"of {_SUPPORTED}; got {type(module).__name__}. Use 'diag_hessian' for other models."
        )
    layers = _leaf_layers(module)
    if not layers:
        raise ValueError("preconditioner='hesscale' got an empty nn.Sequential")
    for i, (name, layer) in enumerate(layers):
        if i == len(layers) - 1 and type(layer) in (nn.Softmax, nn.LogSoftmax):
            continue  # a final normaliser is folded into the loss
        if not isinstance(layer, (nn.Linear, *_CONV, nn.Flatten, *_ELEMENTWISE, *_PASS_THROUGH)):
            raise ValueError(
                f"preconditioner='hesscale' does not support layer {name!r} "
                f"({type(layer).__name__}); supported: {_SUPPORTED} in nn.Sequential. Use "
                "'diag_hessian' for this model."
            )
    return layers


def _output_derivatives(target, part, out, head):
    """Gradient and Hessian diagonal of one part's weighted cost with respect to ``out``.

    ``head`` is a final Softmax/LogSoftmax split off the stack (or None): the cost is then a
    function of its input. The gradient is exact (autograd). The Hessian diagonal is exact:
    closed forms where ``out`` are logits of "kl"/"cross_entropy" (diag ∂²C/∂z² = w (q − q²),
    w the position's weight) and for "mse" (2/numel); otherwise autograd (numel
    Hessian-vector products in output space, chunked).
    """
    name = target.cost_name
    output = target.output

    def cost(z):
        return part.weight * part.cost(z if head is None else head(z))

    g = jacrev(cost)(out)
    logits = (
        (head is None and output == "logits")
        or (type(head) is nn.Softmax and output == "probabilities")
        or (type(head) is nn.LogSoftmax and output == "log_probabilities")
    )
    if isinstance(name, str) and name in ("kl", "cross_entropy") and logits:
        q = torch.softmax(out, dim=-1)
        return g, _position_weights(part, q)[..., None] * (q - q * q)
    if isinstance(name, str) and name == "mse" and head is None:
        return g, torch.full_like(out, 2.0 * part.weight / out.numel())
    flat_n = out.numel()
    h = torch.empty(flat_n, dtype=out.dtype, device=out.device)
    block = max(1, min(flat_n, (64 << 20) // max(1, 8 * flat_n)))

    def hvp(v):
        return jvp(jacrev(cost), (out,), (v.reshape(out.shape),))[1].reshape(-1)

    for start in range(0, flat_n, block):
        stop = min(flat_n, start + block)
        idx = torch.arange(start, stop, device=out.device)
        E = torch.zeros(stop - start, flat_n, dtype=out.dtype, device=out.device)
        E[idx - start, idx] = 1.0
        h[start:stop] = vmap(hvp)(E)[idx - start, idx]
    return g, h.reshape(out.shape)


def _is_final_normaliser(layer, ndim) -> bool:
    """A Softmax/LogSoftmax over the last axis: not elementwise, folded into the loss."""
    if type(layer) not in (nn.Softmax, nn.LogSoftmax):
        return False
    return layer.dim in (-1, ndim - 1) or (layer.dim is None and ndim == 2)


def _elementwise_derivatives(layer, z):
    """f'(z) and f''(z) of an elementwise activation, by nested forward-mode AD."""
    ones = torch.ones_like(z)

    def first(u):
        return jvp(lambda v: layer(v.clone()), (u,), (ones,))[1]

    return first(z), jvp(first, (z,), (ones,))[1]


def _accumulate(diag, key, value):
    diag[key] = value if key not in diag else diag[key] + value


def _hesscale_batch(target, part, layers, diag):
    """Add one data batch's HesScale diagonal (weighted as the cost weights it) to ``diag``."""
    ev = target.evaluator
    batch = ev.batches[part.batch]
    if not torch.is_tensor(batch.X) or batch.kwargs:
        raise ValueError(
            "preconditioner='hesscale' needs a single tensor input X (an nn.Sequential takes "
            "one argument); use 'diag_hessian'"
        )
    with torch.no_grad():
        acts = [batch.X]
        for _name, layer in layers:
            acts.append(layer(acts[-1].clone()))
        if not torch.allclose(acts[-1], ev.anchor_outputs(part.batch)):
            raise ValueError(
                f"the {type(ev.module).__name__}'s forward is not the composition of its layers; "
                "preconditioner='hesscale' needs a plain nn.Sequential"
            )
    head = None
    if _is_final_normaliser(layers[-1][1], acts[-1].ndim):
        layers, head, acts = layers[:-1], layers[-1][1], acts[:-1]
    g, h = _output_derivatives(target, part, acts[-1], head)
    with torch.no_grad():
        for (name, layer), a in zip(reversed(layers), reversed(acts[:-1]), strict=True):
            if isinstance(layer, nn.Linear):
                W = layer.weight
                hz, gz = h.reshape(-1, W.shape[0]), g.reshape(-1, W.shape[0])
                _accumulate(diag, _joined(name, "weight"), hz.T @ a.reshape(-1, W.shape[1]).pow(2))
                if layer.bias is not None:
                    _accumulate(diag, _joined(name, "bias"), hz.sum(0))
                h = (hz @ W.pow(2)).reshape(a.shape)
                g = (gz @ W).reshape(a.shape)
            elif isinstance(layer, _CONV):
                # the conv is linear in its weight and in its input: transposes by vjp give
                # Σ h_z a² (weights), Σ W² h_z and Σ W g (inputs), whatever stride/padding
                W = layer.weight
                _, pull_w = vjp(lambda w, layer=layer, a=a: layer._conv_forward(a.pow(2), w, None),
                                W)
                _accumulate(diag, _joined(name, "weight"), pull_w(h)[0])
                if layer.bias is not None:
                    _accumulate(diag, _joined(name, "bias"),
                                h.transpose(0, 1).reshape(W.shape[0], -1).sum(1))
                W2 = W.pow(2)
                _, pull_h = vjp(lambda u, layer=layer, W2=W2: layer._conv_forward(u, W2, None), a)
                _, pull_g = vjp(lambda u, layer=layer, W=W: layer._conv_forward(u, W, None), a)
                h, g = pull_h(h)[0], pull_g(g)[0]
            elif isinstance(layer, _ELEMENTWISE):
                d1, d2 = _elementwise_derivatives(layer, a)
                h = d1.pow(2) * h + d2 * g
                g = d1 * g
            else:  # Flatten, Identity, Dropout in eval mode: reshapes only
                h, g = h.reshape(a.shape), g.reshape(a.shape)


def hesscale_diagonal(target) -> torch.Tensor:
    """HesScale's diagonal Hessian estimate, (n,) float64 over *all* trainable coordinates.

    Backward recursion of diagonals (Elsayed & Mahmood 2022; DESIGN §2): exact output-Hessian
    diagonal; Linear/Conv weights Σ h_z·a², biases Σ h_z; inputs h_a ≈ Σ_o W[o,i]² h_z;
    activations h_z ≈ f'(z)² h_a + f''(z)·∂C/∂a. Exact for the last layer's weights.
    """
    ev = target.evaluator
    layers = _check_layers(ev.module)
    diag = {}
    for part in target.parts:
        _hesscale_batch(target, part, layers, diag)
    pieces = []
    for name, shape in zip(ev.space.names, ev.space.shapes, strict=True):
        if name not in diag:
            raise ValueError(f"hesscale found no layer for trainable parameter {name!r}")
        pieces.append(diag[name].reshape(shape).reshape(-1).to(torch.float64))
    return torch.cat(pieces)


# ------------------------------------------------------------------------- optimizer state


def _betas(group, what):
    betas = group.get("betas")
    if betas is None:
        raise ValueError(
            f"the optimizer's param group has no 'betas'; preconditioner {what} needs Adam-style "
            "state (exp_avg, exp_avg_sq, step, betas) from torch.optim.Adam/AdamW"
        )
    return float(betas[0]), float(betas[1])


def _moment_from_state(state, group, name, shape, moment, what):
    key = "exp_avg" if moment == 1 else "exp_avg_sq"
    if moment == 2 and group.get("amsgrad") and "max_exp_avg_sq" in state:
        key = "max_exp_avg_sq"  # the denominator AMSGrad actually uses
    if not state or key not in state or "step" not in state:
        raise ValueError(
            f"the optimizer has no {key!r} state for parameter {name!r}; preconditioner {what} "
            "needs the state of an Adam-style optimizer that has taken at least one step "
            "(optimizer.step())"
        )
    value = torch.as_tensor(state[key])
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"optimizer state {key!r} has shape {tuple(value.shape)} but parameter {name!r} has "
            f"shape {tuple(shape)}: the optimizer state does not belong to this model"
        )
    step = float(torch.as_tensor(state["step"]).item())
    if step < 1:
        raise ValueError(f"optimizer state for {name!r} has step {step}; no step was taken")
    beta = _betas(group, what)[moment - 1]
    correction = -math.expm1(step * math.log(beta)) if 0 < beta < 1 else 1.0  # 1 − β^t
    value = value.detach().to("cpu", torch.float64)
    return (value.abs() if moment == 1 else value) / correction


def _trainable(module):
    return [(k, p) for k, p in module.named_parameters() if p.requires_grad]


def optimizer_moment(optimizer, module, moment=2, what="'adam'") -> torch.Tensor:
    """Adam's bias-corrected second moment v̂ (``moment=2``) or |first moment| |m̂| (``moment=1``).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer or dict
        The optimizer object (state mapped by parameter identity) or its ``state_dict()``
        (mapped by param-group order against ``module.parameters()``, checked by shape).
    module : torch.nn.Module
        The user's module (read only).
    moment : {1, 2}

    Returns
    -------
    torch.Tensor
        (n,) float64 over the trainable parameters in ``named_parameters()`` order.

    Examples
    --------
    >>> import torch
    >>> from volsk._curvature import optimizer_moment
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> [round(v, 6) for v in optimizer_moment(opt, net).tolist()]  # v̂ = g² = 1 after one step
    [1.0, 1.0, 1.0]
    """
    if optimizer is None:
        raise ValueError(
            f"preconditioner {what} needs the optimizer state: pass "
            "fit(model, X, optimizer=<the torch optimizer or its state_dict()>), or a fitted "
            "skorch net (its optimizer_ is used)"
        )
    trainable = _trainable(module)
    if isinstance(optimizer, dict):
        return _moment_from_state_dict(optimizer, module, trainable, moment, what)
    if not (hasattr(optimizer, "state") and hasattr(optimizer, "param_groups")):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or its state_dict(), got "
            f"{type(optimizer).__name__}"
        )
    pieces = []
    for name, p in trainable:
        group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError(
                f"parameter {name!r} is not in any of the optimizer's param groups: the optimizer "
                f"did not train it. Preconditioner {what} needs the optimizer that trained every "
                "trainable parameter (freeze the others with requires_grad_(False))"
            )
        state = optimizer.state.get(p, {})
        pieces.append(_moment_from_state(state, group, name, p.shape, moment, what).reshape(-1))
    return torch.cat(pieces)


def _moment_from_state_dict(sd, module, trainable, moment, what):
    if "state" not in sd or "param_groups" not in sd:
        raise ValueError("optimizer given as a dict must be an optimizer state_dict() "
                         "(keys 'state' and 'param_groups')")
    order = [(i, g) for g in sd["param_groups"] for i in g["params"]]
    everything = list(module.named_parameters())
    if len(order) == len(everything):
        pairs = [(name, p, i, g) for (name, p), (i, g) in zip(everything, order, strict=True)
                 if p.requires_grad]
    elif len(order) == len(trainable):
        pairs = [(name, p, i, g) for (name, p), (i, g) in zip(trainable, order, strict=True)]
    else:
        raise ValueError(
            f"the optimizer state_dict holds {len(order)} parameters but the model has "
            f"{len(everything)} ({len(trainable)} trainable): its param-group order cannot be "
            "matched to model.parameters(). Pass the optimizer object instead"
        )
    pieces = []
    for name, p, i, g in pairs:
        state = sd["state"].get(i, sd["state"].get(str(i), {}))
        if state and any(torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(p.shape)
                         for v in state.values()):
            raise ValueError(
                f"optimizer state_dict entry {i} does not match parameter {name!r} (shape "
                f"{tuple(p.shape)}): the state_dict's param-group order is not "
                "model.parameters() order. Pass the optimizer object instead"
            )
        pieces.append(_moment_from_state(state, g, name, p.shape, moment, what).reshape(-1))
    return torch.cat(pieces)
