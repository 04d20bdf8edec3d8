"""A fast path for the batched cost of plain MLPs.

For an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free pointwise activations, the
outputs at B parameter vectors are computed with one ``baddbmm`` per layer on the stacked
weights, instead of ``vmap(functional_call)`` (no unflattening and dispatch per parameter, the
bias added inside the matrix product). Activations are kept transposed, (B, features, N): the
weight is the left factor of every product, as it is stored, and the last layer's (B, classes,
N) output makes the cost's reductions over a short class axis run along the long example axis.
The cost receives the usual (B, N, out) layout, as a view. (What it saves is measured by
``benchmarks/radius_search.py``; see benchmarks/RESULTS.md.)

The numbers differ from the vmapped path by float rounding only (both are checked against a
float64 evaluation in ``tests/test_stacked.py``). A direction's numbers do not depend on
which other directions share its batch, or on the batch size: each direction's activations
are padded to whole vector-kernel rows, so none of its numbers falls in a kernel's scalar tail.

Anything else — other layer types, subclasses of ``nn.Linear`` (torch's parametrized modules,
weight normalisation among them, are such subclasses), layers with hooks that could run,
frozen parameters, buffers, inputs that are not one (N, features) tensor — takes the general
path. Only cost evaluations (no gradients, no forward-mode AD) use it. On a FunctionalModel's
private copy no hook runs (see volsk._private_copy), so a model whose user registered hooks
takes this path as the same model without them would, with the same numbers.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._private_copy import HOOK_REGISTRIES, calls_forward_directly

__all__ = ["StackedMLP"]

# parameter-free modules that act elementwise on any shape (Dropout: the model is in eval mode)
POINTWISE = (
    nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
)


# A direction's activations are padded to a multiple of this many numbers. torch's CPU kernels
# run an elementwise op over a whole (B, features, N) tensor in vector chunks and finish the
# last few numbers with scalar code, whose transcendental functions (GELU, sigmoid, tanh...) may
# round differently: unpadded, which numbers of a direction fall in that tail depends on how
# many directions share the batch. The vmapped path has the same exposure (seen on small nets).
ROW_ALIGN = 64


def _global_hooks() -> bool:
    from torch.nn.modules import module as mod

    return any(getattr(mod, name, None) for name in
               ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks"))


def _runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` could run a hook: one of its modules' own, or a process-wide
    one on a module that does not call its forward directly (as a private copy's do)."""
    for m in module.modules():
        if any(getattr(m, registry, None) for registry in HOOK_REGISTRIES):
            return True
        if not calls_forward_directly(m) and _global_hooks():
            return True
    return False


def _computes_weights(module: nn.Module) -> bool:
    """Whether some weight is computed from other parameters (parametrizations, legacy
    weight_norm/spectral_norm/prune): the stacked products would read the wrong tensors."""
    return any(parametrize.is_parametrized(m) or "_volsk_computed" in m.__dict__
               for m in module.modules())


def _identity(h):
    return h


def _gelu_(h, approximate):
    return torch.ops.aten.gelu_(h, approximate=approximate)


def _silu_(h):
    return torch.nn.functional.silu(h, inplace=True)


def _in_place(module: nn.Module):
    """``module`` as a function that may overwrite its input (a fresh activation nobody else
    holds): the same kernel without allocating a second (B, features, N) tensor, which halves
    the memory a batch moves through. Module-level functions, so that a problem still
    pickles (joblib's process workers)."""
    kind = type(module)
    if kind in (nn.Identity, nn.Dropout):
        return _identity
    if kind is nn.GELU:
        return functools.partial(_gelu_, approximate=module.approximate)
    if kind is nn.SiLU:
        return _silu_
    return {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_}.get(
        kind, module)


def _pad(t: torch.Tensor) -> torch.Tensor:
    """A batch of one as two equal rows: a single matrix product may be dispatched to other
    kernels (rounding differently) than a batched one, and a direction's numbers must not
    depend on the batch it shares."""
    return t.expand(2, *t.shape[1:]) if t.shape[0] == 1 else t


class StackedMLP:
    """Outputs of an eligible ``nn.Sequential`` at many flat parameter vectors at once.

    Build with :meth:`of`, which returns None when the module is not eligible.
    """

    def __init__(self, lead, layers, numels, dtype):
        self.lead = lead  # pointwise modules before the first Linear (applied to X once)
        # ("linear", out, in, has_bias) or ("pointwise", function that may work in place)
        self.layers = layers
        self.numels = numels
        self.dtype = dtype
        self._inputs = {}  # id(X) -> (X, lead(X) transposed and padded)
        # examples are padded to a multiple of this (see ROW_ALIGN)
        self.pad_to = 1
        for before, after in zip(layers, layers[1:]):
            if before[0] == "linear" and after[0] == "pointwise":
                self.pad_to = math.lcm(self.pad_to, ROW_ALIGN // math.gcd(before[1], ROW_ALIGN))

    @classmethod
    def of(cls, module, space, fixed, inputs):
        """The fast path for ``module`` (a FunctionalModel's private copy), or None.

        ``space``: its ParameterSpace; ``fixed``: frozen parameters and buffers (must be
        empty); ``inputs``: every data batch's (X, forward kwargs).
        """
        if type(module) is not nn.Sequential or fixed or _runs_hooks(module):
            return None
        if _computes_weights(module):
            return None
        if len(set(space.dtypes)) != 1:
            return None
        for X, kwargs in inputs:
            if kwargs or not isinstance(X, torch.Tensor) or X.ndim != 2:
                return None
            if not X.is_floating_point() or X.dtype != space.dtypes[0]:
                return None
        lead, layers, expected = [], [], []
        # every entry, repeats included (named_children() yields a module used twice once)
        for name, child in module._modules.items():
            if type(child) is nn.Linear:
                has_bias = child.bias is not None
                layers.append(("linear", child.out_features, child.in_features, has_bias))
                expected += [f"{name}.weight"] + ([f"{name}.bias"] if has_bias else [])
            elif type(child) in POINTWISE:
                if layers:  # on a fresh activation: may work in place
                    layers.append(("pointwise", _in_place(child)))
                else:  # on X itself, once
                    lead.append(child)
            else:
                return None
        if expected != list(space.names) or not layers:
            return None
        return cls(lead, layers, list(space.numels), space.dtypes[0])

    def _transposed_input(self, X: torch.Tensor) -> torch.Tensor:
        """lead(X)ᵀ (in, N'), contiguous, computed once per data tensor; N' ≥ N pads with
        zero columns so that every activation a pointwise module sees has a multiple of
        ``ROW_ALIGN`` numbers per direction (see :data:`ROW_ALIGN`)."""
        key = id(X)
        if key not in self._inputs or self._inputs[key][0] is not X:
            h = X
            for module in self.lead:
                h = module(h)
            n = h.shape[0]
            padded = h.new_zeros(h.shape[1], -(-n // self.pad_to) * self.pad_to)
            padded[:, :n] = h.t()
            self._inputs[key] = (X, padded)
        return self._inputs[key][1]

    def outputs(self, rows: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs (B, N, out) at the flat parameter vectors ``rows`` (B, n), on X (N, in):
        a transposed view of :meth:`features_first`."""
        return self.features_first(rows, X).transpose(1, 2)

    def features_first(self, rows: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs transposed, (B, out, N), at the flat parameter vectors ``rows`` (B, n).

        A view of a contiguous (B, out, N') tensor; B = 1 is padded to two rows.
        """
        rows = _pad(rows)
        B = rows.shape[0]
        pieces = iter(torch.split(rows.to(self.dtype), self.numels, dim=1))
        Xt = self._transposed_input(X)
        h = Xt.expand(B, *Xt.shape)
        for layer in self.layers:
            if layer[0] == "pointwise":
                h = layer[1](h)
                continue
            _, out, inp, has_bias = layer
            weight = next(pieces).reshape(B, out, inp)
            if has_bias:
                h = torch.baddbmm(next(pieces).reshape(B, out, 1), weight, h)
            else:
                h = torch.bmm(weight, h)
        return h[:, :, : X.shape[0]]
