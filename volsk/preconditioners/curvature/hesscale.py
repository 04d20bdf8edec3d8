"""HesScale (Elsayed & Mahmood 2022): a diagonal Hessian from one backward recursion.

For ``nn.Sequential`` stacks (nested allowed) of Linear, Conv1d/2d/3d, Flatten and elementwise
activations, with an optional final Softmax/LogSoftmax folded into the loss. Exact for the last
layer's weights; an approximation (off-diagonal terms dropped) below it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

__all__ = ["hesscale_diagonal"]

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
    output = part.cost.output

    def cost(z):
        return part.weight * part.cost(z if head is None else head(z))

    g = jacrev(cost)(out)
    logits = (
        (head is None and output == "logits")
        or (type(head) is nn.Softmax and output == "probabilities")
        or (type(head) is nn.LogSoftmax and output == "log_probabilities")
    )
    closed = part.cost.output_hessian_diagonal(out, part.weight, logits=logits,
                                               folded=head is not None)
    if closed is not None:
        return g, closed
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

    Backward recursion of diagonals (Elsayed & Mahmood 2022): exact output-Hessian
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
