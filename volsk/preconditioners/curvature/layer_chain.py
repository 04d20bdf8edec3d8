"""A model's forward as a chain of layers, traced with torch.fx: what HesScale's recursion walks.

:func:`trace_chain` traces the forward with :func:`torch.fx.symbolic_trace` and accepts it when,
as a graph, it is a chain: each operation takes the previous one's output and nothing else but
its own parameters (and shape arithmetic such as ``x.size(0)``). Supported operations: Linear
and Conv1d/2d/3d (modules, or ``F.linear``/``F.conv*d`` on the module's own parameters),
elementwise activations (modules, ``torch.relu``, ``F.gelu``, ``x.tanh()``, …), reshapes
(Flatten, ``x.flatten(1)``, ``x.view(x.size(0), -1)``, …), Identity and Dropout in eval mode,
and a final Softmax/LogSoftmax. Anything else raises a ValueError naming the first offending
node (its name, op and the module it sits in).
"""

from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Chain", "Layer", "chain_refusal", "describe_node", "trace_chain"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish, nn.LogSigmoid,
)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Flatten, nn.Unflatten)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HEADS = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax"}
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.sin, torch.cos, torch.special.expit,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.tanh,
    F.sigmoid, F.softplus, F.softsign, F.tanhshrink, F.hardtanh, F.hardsigmoid, F.hardswish,
    F.logsigmoid,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "exp", "sin", "cos"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout}
_HEAD_FUNCTIONS = {F.softmax: "softmax", torch.softmax: "softmax",
                   F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax"}
_HEAD_METHODS = {"softmax": "softmax", "log_softmax": "log_softmax"}
_LINEAR_FUNCTIONS = {F.linear}
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}
# shape arithmetic (x.size(0), x.shape[1] * 2): integers, not part of the chain
_META_METHODS = {"size", "dim", "numel"}
_META_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_META_FUNCTIONS = {operator.getitem, operator.mul, operator.floordiv, operator.add,
                   operator.sub, operator.neg, len}
_SUPPORTED = (
    "Linear, Conv1d/2d/3d, Flatten/view/reshape, Dropout, Identity, elementwise activations "
    "(modules or their functional forms) and a final Softmax/LogSoftmax"
)


@dataclass
class Layer:
    """One link of the chain: ``kind`` is "linear", "conv", "elementwise" or "reshape"."""

    kind: str
    input: fx.Node  # the node whose value the layer reads (its activation a)
    weight: torch.Tensor | None = None
    weight_key: str | None = None  # parameter names, as named_parameters() spells them
    bias_key: str | None = None
    fn: object = None  # elementwise f(v), or conv(u, W) without bias


@dataclass
class Chain:
    """A traced forward as a chain: layers in order, an optional final normaliser."""

    module: fx.GraphModule
    layers: list = field(default_factory=list)
    last: fx.Node | None = None  # the node whose value the cost (or the head) reads
    output: fx.Node | None = None  # the value forward returns
    head: tuple | None = None  # (node, "softmax" | "log_softmax", fn, dim)


def chain_refusal(reason) -> ValueError:
    """The error refusing a model for HesScale, ``reason`` naming the offending node."""
    return ValueError(
        "preconditioner='hesscale' needs a model whose forward is a chain of layers, each "
        "taking the previous one's output (the composition of its layers, as in an "
        f"nn.Sequential), made of {_SUPPORTED}; {reason}. Use 'diag_hessian' or 'kfac' for "
        "this model."
    )


def describe_node(node, gm) -> str:
    """A node as a user reads it: its layer path and class, or its name, op and the module
    whose forward made it."""
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    what = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", repr(node.target))
    text = f"node {node.name!r} ({node.op} {what})"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        text += f" in {path!r} ({getattr(cls, '__name__', cls)})"
    return text


def _argument(node, position, name, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _out_of_place(node):
    """Turn a functional activation's ``inplace=True`` off in the traced graph (ours): an
    in-place op would overwrite the recorded activation the recursion needs."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a Python signature has no inplace
        return
    if bound.arguments.get("inplace"):
        bound.arguments["inplace"] = False
        node.args, node.kwargs = bound.args, bound.kwargs


def _nodes_in(value):
    found = []
    fx.node.map_arg(value, found.append)
    return found


def _is_meta(node, meta, chain_values):
    """Whether ``node`` computes shape information (integers), not a tensor of the chain."""
    inputs = node.all_input_nodes
    if not inputs:
        return False
    first = node.args[0] if node.args else None
    if node.op == "call_method" and node.target in _META_METHODS:
        return first in chain_values or first in meta
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _META_ATTRIBUTES
    if node.op == "call_function" and node.target in _META_FUNCTIONS:
        return all(i in meta for i in inputs)
    return False


def _parameter(gm, node, what, seen):
    """The parameter (or buffer) a get_attr ``node`` reads; refuse one used twice."""
    if node is None:
        return None, None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise chain_refusal(f"{what} takes a weight that is not one of the model's own "
                            "parameters")
    tensor = functools.reduce(getattr, node.target.split("."), gm)
    _claim(tensor, node.target, what, seen)
    return tensor, node.target


def _claim(tensor, key, what, seen):
    if id(tensor) in seen:
        raise chain_refusal(f"{what} uses the parameter {seen[id(tensor)]!r} a second time "
                            "(shared weights)")
    seen[id(tensor)] = key


def _link(node, gm, current, seen, meta):
    """The chain link ``node`` is (a _Layer, or a head tuple), else a refusal naming it."""
    what = describe_node(node, gm)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if node.args != (current,) or node.kwargs:
            read = [n.name for n in node.all_input_nodes if n is not current]
            raise chain_refusal(
                f"{what} is not called on the previous layer's output ({current.name!r}) alone"
                + (f" but on {read[0]!r}: a branch, a residual connection or a concatenation "
                   "is not a chain" if read else ""))
        if isinstance(module, nn.Linear):
            _claim(module.weight, f"{node.target}.weight", what, seen)
            bias = None if module.bias is None else f"{node.target}.bias"
            return Layer("linear", current, module.weight, f"{node.target}.weight", bias)
        if isinstance(module, _CONV):
            _claim(module.weight, f"{node.target}.weight", what, seen)
            bias = None if module.bias is None else f"{node.target}.bias"
            return Layer("conv", current, module.weight, f"{node.target}.weight", bias,
                          fn=lambda u, W, module=module: module._conv_forward(u, W, None))
        if isinstance(module, _ELEMENTWISE):
            return Layer("elementwise", current, fn=module)
        if isinstance(module, _PASS_THROUGH):
            return Layer("reshape", current)
        if type(module) in _HEADS:
            return (node, _HEADS[type(module)], module, module.dim)
        raise chain_refusal(f"{what} is not one of them")
    inputs = [n for n in node.all_input_nodes if n not in meta and n.op != "get_attr"]
    if current not in inputs:
        raise chain_refusal(f"{what} does not take the previous layer's output "
                            f"({current.name!r}) as its input: a branch, a residual connection "
                            "or a concatenation is not a chain")
    if len(inputs) > 1:
        other = next(n for n in inputs if n is not current)
        raise chain_refusal(f"{what} combines the previous layer's output with another "
                            f"tensor ({other.name!r}): a residual connection, a branch or a "
                            "concatenation is not a chain")
    if node.args[0] is not current:
        raise chain_refusal(f"{what} does not take the previous layer's output as its first "
                            "argument")
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS | _CONV_FUNCTIONS:
        if _nodes_in((node.args[3:], {k: v for k, v in node.kwargs.items()
                                      if k not in ("weight", "bias")})):
            raise chain_refusal(f"{what} has a traced tensor among its settings")
        W, weight_key = _parameter(gm, _argument(node, 1, "weight"), what, seen)
        _, bias_key = _parameter(gm, _argument(node, 2, "bias"), what, seen)
        if node.target in _LINEAR_FUNCTIONS:
            return Layer("linear", current, W, weight_key, bias_key)
        settings = [_argument(node, i, name, default) for i, name, default in
                    [(3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)]]
        return Layer("conv", current, W, weight_key, bias_key,
                      fn=lambda u, W, conv=node.target, s=settings: conv(u, W, None, *s))
    if any(n.op == "get_attr" for n in node.all_input_nodes):
        raise chain_refusal(f"{what} combines the previous layer's output with a parameter or "
                            "buffer outside a Linear or Conv")
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            _out_of_place(node)
            rest, kwargs = node.args[1:], dict(node.kwargs)
            return Layer("elementwise", current,
                          fn=lambda v, f=node.target, r=rest, k=kwargs: f(v, *r, **k))
        if node.target in _RESHAPE_FUNCTIONS:
            return Layer("reshape", current)
        if node.target in _DROPOUT_FUNCTIONS:
            if _argument(node, 2, "training", True):
                raise chain_refusal(f"{what} is dropout in training mode (pass "
                                    "training=self.training and put the model in eval mode)")
            return Layer("reshape", current)
        if node.target in _HEAD_FUNCTIONS:
            return (node, _HEAD_FUNCTIONS[node.target],
                    lambda z, f=node.target, r=rest, k=kwargs: f(z, *r, **k),
                    _argument(node, 1, "dim"))
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return Layer("elementwise", current,
                          fn=lambda v, m=node.target, r=rest, k=kwargs: getattr(v, m)(*r, **k))
        if node.target in _RESHAPE_METHODS:
            return Layer("reshape", current)
        if node.target in _HEAD_METHODS:
            return (node, _HEAD_METHODS[node.target],
                    lambda z, m=node.target, r=rest, k=kwargs: getattr(z, m)(*r, **k),
                    _argument(node, 1, "dim"))
    raise chain_refusal(f"{what} is not one of them")


def trace_chain(module) -> Chain:
    """The model's forward as a chain of layers, or a refusal naming the first offending node.

    Parameters
    ----------
    module : torch.nn.Module
        Traced, not run; never modified (the graph and its edits are the tracer's copy).

    Returns
    -------
    Chain
        The layers in order (each with the node whose value it reads), the node the cost
        reads and an optional final Softmax/LogSoftmax.

    Raises
    ------
    ValueError
        The forward is not a chain of supported operations, or torch.fx cannot trace it.

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners.curvature.layer_chain import trace_chain
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2),
    ...                           torch.nn.Softmax(dim=-1))
    >>> chain = trace_chain(net)
    >>> [layer.kind for layer in chain.layers], chain.head[1]
    (['linear', 'elementwise', 'linear'], 'softmax')
    """
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises anything a forward can
        message = str(exc).strip().splitlines()
        raise chain_refusal(
            f"torch.fx cannot trace {type(module).__name__}.forward ({type(exc).__name__}: "
            f"{message[0] if message else ''})"
        ) from exc
    chain = Chain(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise chain_refusal(f"{type(module).__name__}.forward takes no input")
    for extra in placeholders[1:]:
        if extra.users:
            raise chain_refusal(f"its forward uses a second input {extra.target!r}")
    current = placeholders[0]
    chain_values, meta, seen = {current}, set(), {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise chain_refusal("its forward does not return the output of its last layer "
                                    "alone (a tuple, a dict or an earlier value)")
            chain.output = current
            break
        if _is_meta(node, meta, chain_values):
            meta.add(node)
            continue
        if chain.head is not None:
            raise chain_refusal(f"{describe_node(chain.head[0], gm)} is followed by "
                                f"{describe_node(node, gm)}: only a final Softmax/LogSoftmax is "
                                "folded into the loss")
        link = _link(node, gm, current, seen, meta)
        if isinstance(link, tuple):
            chain.head, chain.last = link, current
        else:
            chain.layers.append(link)
        current = node
        chain_values.add(node)
    if chain.head is None:
        chain.last = chain.output
    return chain
