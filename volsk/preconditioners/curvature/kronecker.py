"""Kronecker factors of the Gauss–Newton matrix per layer (K-FAC), from captured activations.

For a layer s = W̃ ã applied at positions x (examples, tokens, convolution patches), with
ã = [a; 1] when it has a trainable bias, the GGN block of W̃ is Σ_x Σ_k g_{x,k} g_{x,k}ᵀ ⊗
ã_x ã_xᵀ, where g_{x,k} = root_k ∂t_k/∂s_x are the output-side gradients for the cost's
output-space factor (``BoundCost.ggn_factor``: t the output transform, root² its weights).
K-FAC (Martens & Grosse 2015; its "expand" form for weight sharing over tokens, Eschenhagen
et al. 2023) factorises it as

    G ⊗ A,   G = Σ_x Σ_k g_{x,k} g_{x,k}ᵀ,   A = Σ_x π_x ã_x ã_xᵀ / Σ_x π_x,

with π_x the weight the cost gives position x. In flat coordinates W̃[o, i] is row-major
(o slow), so the block is kron(G, A) on the (d_out, d_in + 1) matrix of coordinates.

The g's come from backward passes with output-space cotangents: one per output entry of an
example (all examples at once; exact) when an example has at most ``max_exact_outputs``
outputs, otherwise ``samples`` passes with Rademacher-signed roots (unbiased: E[c cᵀ] =
diag(root²)). The twin model's layers are observed by swapping their ``_call_impl`` for a
recorder (hooks do not run on volsk's private copies), restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["KroneckerLayer", "kronecker_layers", "kronecker_factors", "corrected_eigenvalues",
           "exact_outputs"]


@dataclass
class KroneckerLayer:
    """A layer whose active coordinates form the Kronecker block of the GGN.

    Attributes
    ----------
    name : str
        The module's path in the model.
    module : torch.nn.Module
        The module in the curvature twin.
    index : torch.Tensor
        (d_g, d_a) int64: the position among the active coordinates of W̃[o, i] (rows: output
        units, columns: inputs then the bias' 1), restricted to the active rows and columns.
    rows, cols : torch.Tensor
        Boolean masks of the kept output units (d_out,) and inputs (d_in (+1),).
    bias : bool
        Whether a trainable bias is the last input column.
    """

    name: str
    module: nn.Module
    index: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    bias: bool


def _hf_conv1d(module) -> bool:
    # transformers' Conv1D (GPT-2): y = x W + b with W (d_in, d_out); matched by name, so that
    # transformers stays an optional dependency
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and \
        getattr(module, "weight", None) is not None and module.weight.ndim == 2


def _weight_grid(module, offset):
    """Flat indices of the weight as a (d_out, d_in) grid, or None for unsupported layers."""
    w = module.weight
    flat = offset + torch.arange(w.numel())
    if isinstance(module, nn.Linear):
        return flat.reshape(w.shape)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return flat.reshape(w.shape[0], -1)
    if _hf_conv1d(module):
        return flat.reshape(w.shape).T
    return None


def kronecker_layers(target):
    """The layers of the twin whose active coordinates get a Kronecker block, and the rest.

    Supported: ``nn.Linear`` (also inside Hugging Face blocks), ``nn.Conv1d``/``nn.Conv2d``
    with ``groups=1``, transformers' ``Conv1D``; with a trainable weight that no other module
    shares. A layer whose active coordinates are not a product set (rows × columns: whole
    output units or whole inputs integrated out are fine) is left to the rest.

    Returns
    -------
    layers : list of KroneckerLayer
    rest : torch.Tensor
        (m,) int64 positions among the active coordinates not in any layer's block.
    """
    ev = target.evaluator
    space = ev.space
    offsets = dict(zip(space.names, space.offsets()[:-1].tolist(), strict=True))
    module = ev.module
    names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    uses = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    n_active = target.n_active
    position = torch.full((space.n,), -1, dtype=torch.int64)
    position[target.cols.cpu()] = torch.arange(n_active)
    covered = torch.zeros(n_active, dtype=torch.bool)
    layers = []
    for path, m in module.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is None or names.get(id(w)) not in offsets or uses[id(w)] > 1:
            continue
        grid = _weight_grid(m, offsets[names[id(w)]])
        if grid is None:
            continue
        b = m._parameters.get("bias")
        bias = b is not None and names.get(id(b)) in offsets
        if bias:
            if uses[id(b)] > 1:
                continue
            grid = torch.cat([grid, offsets[names[id(b)]] + torch.arange(grid.shape[0])[:, None]],
                             dim=1)
        full = position[grid]  # (d_out, d_in (+1))
        active = full >= 0
        rows, cols = active.any(1), active.any(0)
        if not rows.any() or not torch.equal(active, rows[:, None] & cols[None, :]):
            continue
        index = full[rows][:, cols]
        covered[index.reshape(-1)] = True
        layers.append(KroneckerLayer(path, m, index, rows, cols, bias))
    return layers, torch.nonzero(~covered).flatten()


# ------------------------------------------------------------------------ activations


class _Recorder:
    """``module(...)`` on the twin: its forward, with the input and output kept."""

    def __init__(self, module, records):
        self.module = module
        self.records = records

    def __call__(self, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        out = self.module.forward(*args, **kwargs)
        self.records.append((x.detach(), out))
        return out


class _recording:
    """Within the block, each layer's (input, output) pairs of every forward are recorded."""

    def __init__(self, layers):
        self.layers = layers
        self.records = {id(layer): [] for layer in layers}

    def __enter__(self):
        self.saved = [(layer.module, layer.module.__dict__.get("_call_impl"))
                      for layer in self.layers]
        for layer in self.layers:
            layer.module.__dict__["_call_impl"] = _Recorder(layer.module, self.records[id(layer)])
        return self.records

    def __exit__(self, *exc):
        for module, impl in self.saved:
            if impl is None:
                module.__dict__.pop("_call_impl", None)
            else:
                module.__dict__["_call_impl"] = impl


def _patches(module, x):
    """Convolution inputs as rows of patches: (N, L, C_in·Πkernel), L output locations."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)  # (N, C, 1, L): a conv1d is a conv2d of height 1
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        stride, padding = (1, module.stride[0]), module.padding
        padding = padding if isinstance(padding, str) else (0, padding[0])
        reversed_padding = (*module._reversed_padding_repeated_twice, 0, 0)
    else:
        kernel, dilation = module.kernel_size, module.dilation
        stride, padding = module.stride, module.padding
        reversed_padding = module._reversed_padding_repeated_twice
    if module.padding_mode != "zeros":
        x = F.pad(x, reversed_padding, mode=module.padding_mode)
        padding = (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        x = F.pad(x, reversed_padding)  # torch's own split of the 'same' padding
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def _inputs(layer, x):
    """The layer's inputs as rows (P, d_a) float64 (the bias' 1 appended, restricted to the
    active columns), and the shape of its P applications (examples, tokens, patches)."""
    m = layer.module
    a = _patches(m, x) if isinstance(m, (nn.Conv1d, nn.Conv2d)) else x  # (..., d_in)
    lead = tuple(a.shape[:-1])
    a = a.reshape(-1, a.shape[-1]).to(torch.float64)
    if layer.bias:
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
    return a[:, layer.cols.to(a.device)], lead


def _output_grads(layer, grad):
    """The gradients at the layer's outputs as rows (P, d_g) float64 (active rows only)."""
    if isinstance(layer.module, (nn.Conv1d, nn.Conv2d)):
        grad = grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)  # (N, L, C_out)
    g = grad.reshape(-1, grad.shape[-1]).to(torch.float64)
    return g[:, layer.rows.to(g.device)]


def _application_weights(position_weights, lead):
    """π for each layer application (shape ``lead``) from the cost's position weights."""
    numel = math.prod(lead)
    if tuple(lead) == tuple(position_weights.shape):
        return position_weights.reshape(-1)
    if len(lead) == 1 and numel == position_weights.numel():  # positions flattened (N·T,)
        return position_weights.reshape(-1)
    n = position_weights.shape[0]
    if len(lead) >= 1 and lead[0] == n:  # an example's weight spread over its applications
        per_example = position_weights.reshape(n, -1).sum(1)
        return (per_example / (numel // n))[:, None].expand(n, numel // n).reshape(-1)
    return torch.full((numel,), float(position_weights.sum()) / numel,
                      dtype=position_weights.dtype, device=position_weights.device)


def exact_outputs(target, max_exact_outputs) -> bool:
    """Whether every data batch has at most ``max_exact_outputs`` outputs per example."""
    ev = target.evaluator
    return all(
        ev.anchor_outputs(part.batch).numel() // max(1, ev.batches[part.batch].n)
        <= max_exact_outputs
        for part in target.parts
    )


def _cotangents(root, exact, samples, generator):
    """Output-space cotangents c with Σ c cᵀ = diag(root²) (exact: one per output entry of an
    example, all examples at once) or E[c cᵀ] = diag(root²) (Rademacher signs)."""
    n = root.shape[0]
    flat = root.reshape(n, -1)
    if exact:
        for k in range(flat.shape[1]):
            c = torch.zeros_like(flat)
            c[:, k] = flat[:, k]
            yield c.reshape(root.shape)
        return
    scale = 1.0 / math.sqrt(samples)
    for _ in range(samples):
        signs = torch.randint(0, 2, root.shape, generator=generator).to(root) * 2 - 1
        yield root * signs * scale


def _backward_passes(target, layers, what, *, exact, samples, seed):
    """For each data batch and cotangent: ``(first, position_weights, pairs, grads)`` — whether
    this is the batch's first cotangent, the cost's weight of each output position, every
    recorded (layer, input, output) and the output gradients for this cotangent."""
    ev = target.evaluator
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    theta = ev.theta.to(ev.model_dtype).detach().requires_grad_(True)
    for part in target.parts:
        transform, root = target.ggn_factor(part, what)
        position_weights = root.pow(2).sum(-1)
        with torch.enable_grad(), _recording(layers) as records:
            t = transform(ev.outputs(theta, part.batch))
        pairs = [(layer, x, out) for layer in layers for x, out in records[id(layer)]
                 if torch.is_tensor(out) and out.requires_grad]
        outs = [out for _, _, out in pairs]
        for j, c in enumerate(_cotangents(root, exact, samples, generator)):
            grads = torch.autograd.grad(t, outs, grad_outputs=c.to(t.dtype), retain_graph=True,
                                        allow_unused=True)
            yield j == 0, position_weights, pairs, grads
        del t, records, pairs, outs


def kronecker_factors(target, layers, *, max_exact_outputs=256, samples=16, max_factor_size=4096,
                      seed=0, what="preconditioner 'kfac'"):
    """A and G of each layer (restricted to its active rows and columns), float64.

    A factor larger than ``max_factor_size`` on a side is kept as its diagonal (a vector):
    a vocabulary-sized unembedding's G (50 304² for Pythia) would not fit.

    Returns
    -------
    list of (A, G)
        A: (d_a, d_a) or (d_a,); G: (d_g, d_g) or (d_g,).

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import FunctionalModel
    >>> from volsk.costs import make_cost
    >>> from volsk.preconditioners import PreconditionerContext
    >>> from volsk.preconditioners.curvature.kronecker import kronecker_factors, kronecker_layers
    >>> from volsk.preconditioners.curvature.target import curvature_target
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> ev = FunctionalModel(torch.nn.Linear(2, 3, bias=False).double(), X, "cpu")
    >>> ctx = PreconditionerContext(ev, make_cost("mse", ev.anchor_outputs()),
    ...                             torch.ones(6, dtype=torch.bool))
    >>> target = curvature_target(ctx)
    >>> layers, rest = kronecker_layers(target)
    >>> (A, G), = kronecker_factors(target, layers)  # mse: G = (2/D)·I, A = XᵀX / N
    >>> A.tolist(), torch.allclose(G, torch.eye(3, dtype=torch.float64) * 2 / 3)
    ([[0.5, 0.0], [0.0, 2.0]], True)
    """
    exact = exact_outputs(target, max_exact_outputs)
    device = target.cols.device

    def zeros(d):
        shape = (d,) if d > max_factor_size else (d, d)
        return torch.zeros(shape, dtype=torch.float64, device=device)

    A = [zeros(int(layer.cols.sum())) for layer in layers]
    G = [zeros(int(layer.rows.sum())) for layer in layers]
    weight_sum = [0.0 for _ in layers]
    position = {id(layer): i for i, layer in enumerate(layers)}
    for first, position_weights, pairs, grads in _backward_passes(
            target, layers, what, exact=exact, samples=samples, seed=seed):
        for layer, x, _out in pairs if first else ():  # the same for every cotangent
            i = position[id(layer)]
            a, lead = _inputs(layer, x)
            pi = _application_weights(position_weights, lead).to(a)
            A[i] += (a * a * pi[:, None]).sum(0) if A[i].ndim == 1 else (a * pi[:, None]).T @ a
            weight_sum[i] += float(pi.sum())
        for (layer, _x, _out), grad in zip(pairs, grads, strict=True):
            if grad is not None:
                i = position[id(layer)]
                g = _output_grads(layer, grad)
                G[i] += (g * g).sum(0) if G[i].ndim == 1 else g.T @ g
    for i in range(len(layers)):
        if weight_sum[i] > 0:
            A[i] /= weight_sum[i]
    return list(zip(A, G, strict=True))


def corrected_eigenvalues(target, layers, bases, *, max_exact_outputs=256, samples=16, seed=0,
                          what="preconditioner 'kfac'"):
    """Eigenvalue-corrected K-FAC (George et al. 2018): the GGN's second moments in each
    layer's Kronecker eigenbasis, Σ_x Σ_k ((U_Gᵀ g)_o (U_Aᵀ ã)_i)², (d_g, d_a) per layer.

    ``bases``: (U_A, U_G) per layer, None for a factor kept diagonal (the identity basis).
    Per-position products (the "expand" form over tokens); exact for per-example layers.
    """
    exact = exact_outputs(target, max_exact_outputs)
    device = target.cols.device
    out = [torch.zeros(int(layer.rows.sum()), int(layer.cols.sum()), dtype=torch.float64,
                       device=device) for layer in layers]
    position = {id(layer): i for i, layer in enumerate(layers)}
    projected = []
    for first, _weights, pairs, grads in _backward_passes(target, layers, what, exact=exact,
                                                          samples=samples, seed=seed):
        if first:  # the inputs in the eigenbasis, squared: the same for every cotangent
            projected = []
            for layer, x, _out in pairs:
                a, _lead = _inputs(layer, x)
                U_A = bases[position[id(layer)]][0]
                projected.append((a if U_A is None else a @ U_A).pow(2))
        for (layer, _x, _out), grad, a2 in zip(pairs, grads, projected, strict=True):
            if grad is None:
                continue
            i = position[id(layer)]
            g = _output_grads(layer, grad)
            U_G = bases[i][1]
            g = g if U_G is None else g @ U_G
            out[i] += (g * g).T @ a2
    return out
