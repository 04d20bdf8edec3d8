"""HesScale (Elsayed & Mahmood 2022): a diagonal Hessian from one backward recursion along a chain.

The model's forward must be, as a graph, a chain of Linear/Conv layers, elementwise
activations and reshapes with an optional final Softmax/LogSoftmax folded into the loss (see
:mod:`.layer_chain`, which traces it with torch.fx): an ``nn.Sequential``, a custom module calling
``self.fc1``, ``self.act``, ``self.fc2`` in turn, or skorch's module classes. Anything else
(residual connections, concatenations, attention, normalisation layers, a parameter used twice,
a forward torch.fx cannot trace) is refused with a ValueError naming the first offending node.
Exact for the last layer's weights; an approximation (off-diagonal terms dropped) below it.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.func import jacrev, jvp, vjp, vmap

from .layer_chain import chain_refusal, describe_node, trace_chain

__all__ = ["hesscale_diagonal"]


def _output_derivatives(part, out, head):
    """Gradient and Hessian diagonal of one part's weighted cost with respect to ``out``.

    ``head`` is a final Softmax/LogSoftmax ``(kind, fn)`` split off the chain (or None): the
    cost is then a function of its input. The gradient is exact (autograd). The Hessian
    diagonal is exact: closed forms where ``out`` are logits of "kl"/"cross_entropy"
    (diag ∂²C/∂z² = w (q − q²), w the position's weight) and for "mse" (2/numel); otherwise
    autograd (numel Hessian-vector products in output space, chunked).
    """
    output = part.cost.output
    kind, fn = head if head is not None else (None, None)

    def cost(z):
        return part.weight * part.cost(z if head is None else fn(z))

    g = jacrev(cost)(out)
    logits = (
        (head is None and output == "logits")
        or (kind == "softmax" and output == "probabilities")
        or (kind == "log_softmax" and output == "log_probabilities")
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


def _elementwise_derivatives(fn, z):
    """f'(z) and f''(z) of an elementwise activation, by nested forward-mode AD (reverse over
    forward for the second where an op has no forward-mode second derivative, e.g. SiLU)."""
    ones = torch.ones_like(z)

    def first(u):
        return jvp(lambda v: fn(v.clone()), (u,), (ones,))[1]

    try:
        second = jvp(first, (z,), (ones,))[1]
    except NotImplementedError:
        # elementwise: the gradient of Σ f'(z) is f''(z)
        with torch.enable_grad():
            second = vjp(first, z)[1](ones)[0]
    return first(z), second


def _accumulate(diag, key, value):
    diag[key] = value if key not in diag else diag[key] + value


def _hesscale_batch(part, ev, chain, diag):
    """Add one data batch's HesScale diagonal (weighted as the cost weights it) to ``diag``."""
    batch = ev.batches[part.batch]
    if not torch.is_tensor(batch.X) or batch.kwargs:
        raise ValueError(
            "preconditioner='hesscale' needs a single tensor input X (the chain takes one "
            "argument, as an nn.Sequential does); use 'diag_hessian' or 'kfac'"
        )
    with torch.no_grad():
        interpreter = fx.Interpreter(chain.module, garbage_collect_values=False)
        interpreter.run(batch.X)
        values = interpreter.env
        if not torch.allclose(values[chain.output], ev.anchor_outputs(part.batch)):
            raise ValueError(
                f"the {type(ev.module).__name__}'s traced forward does not reproduce its "
                "outputs (is its forward not the composition of its layers?); "
                "preconditioner='hesscale' needs a chain of layers. Use 'diag_hessian'"
            )
    head = None
    if chain.head is not None:
        node, kind, fn, dim = chain.head
        ndim = values[chain.last].ndim
        if not (dim in (-1, ndim - 1) or (dim is None and ndim == 2)):
            raise chain_refusal(f"{describe_node(node, chain.module)} normalises over axis "
                                f"{dim}, not the last one")
        head = (kind, fn)
    g, h = _output_derivatives(part, values[chain.last], head)
    with torch.no_grad():
        for layer in reversed(chain.layers):
            a = values[layer.input]
            if layer.kind == "linear":
                W = layer.weight
                hz, gz = h.reshape(-1, W.shape[0]), g.reshape(-1, W.shape[0])
                _accumulate(diag, layer.weight_key, hz.T @ a.reshape(-1, W.shape[1]).pow(2))
                if layer.bias_key is not None:
                    _accumulate(diag, layer.bias_key, hz.sum(0))
                h = (hz @ W.pow(2)).reshape(a.shape)
                g = (gz @ W).reshape(a.shape)
            elif layer.kind == "conv":
                # the conv is linear in its weight and in its input: transposes by vjp give
                # Σ h_z a² (weights), Σ W² h_z and Σ W g (inputs), whatever stride/padding
                W, conv = layer.weight, layer.fn
                _, pull_w = vjp(lambda w, conv=conv, a=a: conv(a.pow(2), w), W)
                _accumulate(diag, layer.weight_key, pull_w(h)[0])
                if layer.bias_key is not None:
                    _accumulate(diag, layer.bias_key,
                                h.transpose(0, 1).reshape(W.shape[0], -1).sum(1))
                W2 = W.pow(2)
                _, pull_h = vjp(lambda u, conv=conv, W2=W2: conv(u, W2), a)
                _, pull_g = vjp(lambda u, conv=conv, W=W: conv(u, W), a)
                h, g = pull_h(h)[0], pull_g(g)[0]
            elif layer.kind == "elementwise":
                d1, d2 = _elementwise_derivatives(layer.fn, a)
                h = d1.pow(2) * h + d2 * g
                g = d1 * g
            else:  # Flatten, view, Identity, Dropout in eval mode: reshapes only
                h, g = h.reshape(a.shape), g.reshape(a.shape)


def hesscale_diagonal(target) -> torch.Tensor:
    """HesScale's diagonal Hessian estimate, (n,) float64 over *all* trainable coordinates.

    Backward recursion of diagonals (Elsayed & Mahmood 2022) along the traced chain of
    layers: exact output-Hessian diagonal; Linear/Conv weights Σ h_z·a², biases Σ h_z; inputs
    h_a ≈ Σ_o W[o,i]² h_z; activations h_z ≈ f'(z)² h_a + f''(z)·∂C/∂a. Exact for the last
    layer's weights.
    """
    ev = target.evaluator
    chain = trace_chain(ev.module)
    diag = {}
    for part in target.parts:
        _hesscale_batch(part, ev, chain, diag)
    pieces = []
    for name, shape in zip(ev.space.names, ev.space.shapes, strict=True):
        if name not in diag:
            raise ValueError(f"hesscale found no layer for trainable parameter {name!r}")
        pieces.append(diag[name].reshape(shape).reshape(-1).to(torch.float64))
    return torch.cat(pieces)
