"""A fast path for the batched cost of plain MLPs.

For an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free pointwise activations, the
outputs at B parameter vectors are computed with one ``baddbmm`` per layer on the stacked
weights, instead of ``vmap(functional_call)``: the same kernels on the same numbers (results
are bit-identical to the vmapped path, see ``tests/test_stacked.py``), without vmap's
unflattening and dispatch per parameter and with the bias added inside the matrix product.
On the digits MLP the network part of a cost evaluation drops from ~1.1 to ~0.8 plain forward
passes per direction.

Anything else — other layer types, subclasses of ``nn.Linear``, forward hooks, frozen
parameters, buffers, inputs that are not one (N, features) tensor — takes the general path.
Only cost evaluations (no gradients, no forward-mode AD) use it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StackedMLP"]

# parameter-free modules that act elementwise on any shape (Dropout: the model is in eval mode)
POINTWISE = (
    nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
)


def _has_hooks(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
    return any(getattr(m, h, None) for m in module.modules() for h in hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as mod

    return any(getattr(mod, name, None) for name in
               ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"))


class StackedMLP:
    """Outputs of an eligible ``nn.Sequential`` at many flat parameter vectors at once.

    Build with :meth:`of`, which returns None when the module is not eligible.
    """

    def __init__(self, layers, numels, dtype):
        self.layers = layers  # ("linear", out, in, has_bias) or ("pointwise", module)
        self.numels = numels
        self.dtype = dtype

    @classmethod
    def of(cls, module, space, fixed, inputs):
        """The fast path for ``module`` (a FunctionalModel's private copy), or None.

        ``space``: its ParameterSpace; ``fixed``: frozen parameters and buffers (must be
        empty); ``inputs``: every data batch's (X, forward kwargs).
        """
        if type(module) is not nn.Sequential or fixed or _has_hooks(module) or _global_hooks():
            return None
        if len(set(space.dtypes)) != 1:
            return None
        for X, kwargs in inputs:
            if kwargs or not isinstance(X, torch.Tensor) or X.ndim != 2:
                return None
            if not X.is_floating_point() or X.dtype != space.dtypes[0]:
                return None
        layers, expected = [], []
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                has_bias = child.bias is not None
                layers.append(("linear", child.out_features, child.in_features, has_bias))
                expected += [f"{name}.weight"] + ([f"{name}.bias"] if has_bias else [])
            elif type(child) in POINTWISE:
                layers.append(("pointwise", child))
            else:
                return None
        if expected != list(space.names) or not any(kind == "linear" for kind, *_ in layers):
            return None
        return cls(layers, list(space.numels), space.dtypes[0])

    def outputs(self, rows: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs (B, N, out) at the flat parameter vectors ``rows`` (B, n), on X (N, in)."""
        B = rows.shape[0]
        pieces = iter(torch.split(rows.to(self.dtype), self.numels, dim=1))
        h = X.unsqueeze(0).expand(B, *X.shape)
        for layer in self.layers:
            if layer[0] == "pointwise":
                h = layer[1](h)
                continue
            _, out, inp, has_bias = layer
            weight_t = next(pieces).reshape(B, out, inp).transpose(1, 2)
            if has_bias:
                bias = next(pieces).reshape(B, 1, out)
                h = torch.baddbmm(bias, h, weight_t)
            else:
                h = torch.bmm(h, weight_t)
        return h
