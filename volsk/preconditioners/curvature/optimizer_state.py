"""Adam's bias-corrected moments read from an optimizer's state, mapped to the model's parameters.

The state is matched to parameters by identity (``optimizer.state[p]``) or, for a
``state_dict()``, by param-group order checked against the parameters' shapes; never guessed
from values.
"""

from __future__ import annotations

import math

import torch

__all__ = ["optimizer_moment"]


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
    >>> from volsk.preconditioners.curvature.optimizer_state import optimizer_moment
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
