"""Adam's bias-corrected moments read from an optimizer's state, mapped to the model's parameters.

The state comes as the optimizer object, its ``state_dict()``, or a file holding one
(``torch.save(optimizer.state_dict(), path)``, a Hugging Face ``Trainer`` checkpoint's
``optimizer.pt``). It is matched to parameters by identity (``optimizer.state[p]``) or, for a
state_dict, by the parameter names it records, else by param-group order checked against the
parameters' shapes (:func:`in_model_order`); never guessed from values.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["optimizer_moment", "load_optimizer_state", "in_model_order"]

# Hugging Face Trainer.get_decay_parameter_names: parameters of LayerNorm modules and those
# whose lower-cased name matches one of these get no weight decay (its second param group)
_NO_DECAY_PATTERNS = [re.compile(p) for p in
                      (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                       r"_norm(?:$|\.)")]


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
    optimizer : torch.optim.Optimizer, dict, str or os.PathLike
        The optimizer object (state mapped by parameter identity), its ``state_dict()`` or a
        file holding one, or a checkpoint folder holding ``optimizer.pt`` (read by
        :func:`load_optimizer_state`; mapped to ``module.parameters()`` by
        :func:`in_model_order`).
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
            "fit(model, X, optimizer=<the torch optimizer, its state_dict(), or the path of a "
            "saved state_dict such as a Trainer checkpoint's optimizer.pt>), or a fitted "
            "skorch net (its optimizer_ is used)"
        )
    if isinstance(optimizer, (str, os.PathLike)):
        optimizer = load_optimizer_state(optimizer)
    trainable = _trainable(module)
    if isinstance(optimizer, dict):
        ordered = in_model_order(_checked_state_dict(optimizer), module)
        return _moment_from_state_dict(ordered, module, trainable, moment, what)
    if not (hasattr(optimizer, "state") and hasattr(optimizer, "param_groups")):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, its state_dict() or the path of a file "
            f"holding one, got {type(optimizer).__name__}"
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
    out = torch.empty(sum(p.numel() for _, p, _, _ in pairs), dtype=torch.float64)
    at = 0
    for name, p, i, g in pairs:
        state = sd["state"].get(i, sd["state"].get(str(i), {}))
        if state and any(torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != tuple(p.shape)
                         for v in state.values()):
            raise ValueError(
                f"optimizer state_dict entry {i} does not match parameter {name!r} (shape "
                f"{tuple(p.shape)}): the state_dict's param-group order is not "
                "model.parameters() order. Pass the optimizer object instead"
            )
        out[at : at + p.numel()] = _moment_from_state(state, g, name, p.shape, moment,
                                                      what).reshape(-1)
        at += p.numel()
    return out


def _checked_state_dict(sd, source="optimizer given as a dict"):
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{source} must be an optimizer state_dict() (keys 'state' and "
                         "'param_groups'): save it with torch.save(optimizer.state_dict(), path)")
    return sd


def load_optimizer_state(path) -> dict:
    """An optimizer ``state_dict`` read from a file, as the optimizer saved it.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.save(optimizer.state_dict(), path)`` — a Hugging Face
        ``Trainer`` checkpoint's ``optimizer.pt`` is one — or a checkpoint folder holding
        ``optimizer.pt``. Read with ``torch.load(path, map_location="cpu",
        weights_only=True, mmap=True)`` (without ``mmap`` for torch's legacy format): tensors
        and plain values only, no code runs, and only the tensors read are paged in.

    Returns
    -------
    dict
        The state_dict (keys ``state`` and ``param_groups``), in the optimizer's own order:
        :func:`in_model_order` maps it to a model's parameters.

    Examples
    --------
    >>> import tempfile, torch
    >>> from volsk.preconditioners.curvature.optimizer_state import load_optimizer_state
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(net.parameters())
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     torch.save(opt.state_dict(), f"{folder}/optimizer.pt")
    ...     sorted(load_optimizer_state(folder)["state"][0])
    ['exp_avg', 'exp_avg_sq', 'step']
    """
    p = Path(os.fspath(path))
    if p.is_dir():
        if not (p / "optimizer.pt").is_file():
            raise ValueError(f"optimizer folder {str(path)!r} has no optimizer.pt: pass the file "
                             "written by torch.save(optimizer.state_dict(), path)")
        p = p / "optimizer.pt"
    if not p.is_file():
        raise ValueError(f"optimizer state file {str(path)!r} does not exist")
    try:
        try:
            # memory-mapped: only the moment that is read (exp_avg_sq) is paged in, not
            # exp_avg nor anything else the optimizer saved (a language model's are ~its size)
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise ValueError(f"cannot read optimizer state {str(path)!r}: {exc}") from None
    return _checked_state_dict(state, repr(str(path)))


def in_model_order(state_dict, module):
    """The state_dict with one param group per trainable parameter, in ``module.parameters()``
    order.

    An optimizer numbers its state group by group; when its param groups are not one list in
    the model's order (Hugging Face's ``Trainer`` puts the weights that get weight decay in
    one group and biases and normalisation weights in another, each in
    ``named_parameters()`` order), the entries are matched to the parameters by the first rule
    that applies:

    1. the groups record parameter names (``param_names``: an optimizer built from
       ``model.named_parameters()``, torch ≥ 2.6): by name;
    2. one group: as it is (``optimizer_moment`` checks its shapes);
    3. each group in the model's order (as Trainer builds them), the groups interleaved back
       by the parameters' shapes: the interleaving, where the shapes allow only one;
    4. several allowed, and the state has Trainer's two groups (the second without weight
       decay): the one Trainer's rule makes — a parameter of a LayerNorm, or whose name
       contains "bias", "layernorm", "rmsnorm" or a "norm" component, in the second group —
       if the shapes allow it.

    Otherwise (no interleaving, or several and none of them Trainer's) it raises ValueError:
    two same-shaped parameters in different groups could be swapped and nothing in the file
    says which is which.

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners.curvature.optimizer_state import in_model_order
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> w, b = [net[0].weight, net[1].weight], [net[0].bias, net[1].bias]
    >>> opt = torch.optim.Adam([{"params": w}, {"params": b, "weight_decay": 0.0}])
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> [g["params"] for g in in_model_order(opt.state_dict(), net)["param_groups"]]
    [[0], [2], [1], [3]]
    """
    groups = state_dict["param_groups"]
    trainable = _trainable(module)
    if groups and all("param_names" in g for g in groups):
        return _by_name(state_dict, trainable)
    if len(groups) <= 1:
        return state_dict
    shapes = {}
    for i, entry in state_dict["state"].items():
        tensors = [v for v in entry.values() if hasattr(v, "shape") and len(v.shape) > 0]
        if tensors:
            shapes[int(i)] = tuple(tensors[0].shape)
    ids = [[int(i) for i in g["params"]] for g in groups]
    targets = [tuple(p.shape) for _, p in trainable]
    if sum(map(len, ids)) != len(targets):
        return state_dict  # optimizer_moment reports the count mismatch
    missing = [i for g in ids for i in g if i not in shapes]
    if missing:
        raise ValueError(
            f"the optimizer state has no moments for entry {missing[0]} (a parameter that never "
            "had a gradient), so its param groups cannot be matched to the model's parameters "
            "by shape. Pass the optimizer object instead")
    order = _interleaving(ids, shapes, targets)
    if order is None:
        order = _trainers_grouping(groups, ids, shapes, trainable, module)
    if order is None:
        raise ValueError(
            f"the optimizer state's {len(ids)} param groups can be matched to the model's "
            "parameters in more than one way by shape, and not by Hugging Face Trainer's "
            "weight-decay grouping: the order is ambiguous. Pass the optimizer object, build "
            "the optimizer from model.named_parameters() (its state_dict then names them), or "
            "save the optimizer state with one param group in model.parameters() order")
    new_groups = [{**groups[g], "params": [i]} for i, g in order]
    return {"state": state_dict["state"], "param_groups": new_groups}


def _by_name(state_dict, trainable):
    where = {name: (i, g) for g, group in enumerate(state_dict["param_groups"])
             for name, i in zip(group["param_names"], group["params"], strict=True)}
    names = {name for name, _ in trainable}
    unknown = sorted(set(where) - names)
    absent = [name for name, _ in trainable if name not in where]
    if unknown or absent:
        raise ValueError(
            "the optimizer state names parameters "
            + (f"the model does not have ({', '.join(map(repr, unknown[:3]))})" if unknown
               else f"but not the model's {', '.join(map(repr, absent[:3]))}")
            + ": it does not belong to this model (or the model's trainable parameters changed)")
    groups = state_dict["param_groups"]
    new_groups = []
    for name, _ in trainable:
        i, g = where[name]
        new_groups.append({**groups[g], "params": [i], "param_names": [name]})
    return {"state": state_dict["state"], "param_groups": new_groups}


def _interleaving(ids, shapes, targets):
    """The one way to interleave the groups (each kept in order) into ``targets``' shapes as
    [(entry, group), ...]; None if there are several; ValueError if there is none."""
    # paths through (position in each group), parameter by parameter; counts capped at 2:
    # only "none", "one" or "more" matters
    layer = {(0,) * len(ids): 1}
    came_from = {}
    for target in targets:
        following = {}
        for pos, count in layer.items():
            for g, at in enumerate(pos):
                if at < len(ids[g]) and shapes[ids[g][at]] == target:
                    nxt = pos[:g] + (at + 1,) + pos[g + 1:]
                    following[nxt] = min(2, following.get(nxt, 0) + count)
                    came_from.setdefault(nxt, (pos, ids[g][at], g))
        layer = following
    n_ways = sum(layer.values())
    if n_ways == 0:
        raise ValueError(
            f"the optimizer state's {len(ids)} param groups can be matched to the model's "
            "parameters in no way by shape: the state does not belong to this model")
    if n_ways > 1:
        return None
    pos, order = next(iter(layer)), []
    while any(pos):
        pos, i, g = came_from[pos]
        order.append((i, g))
    order.reverse()
    return order


def _trainers_grouping(groups, ids, shapes, trainable, module):
    """Hugging Face Trainer's (decay, no decay) interleaving if the state has its two groups
    and the shapes allow it, else None."""
    if len(groups) != 2 or float(groups[1].get("weight_decay", 0.0)) != 0.0:
        return None
    in_norm = {f"{prefix}.{name}" if prefix else name
               for prefix, m in module.named_modules() if isinstance(m, nn.LayerNorm)
               for name, _ in m.named_parameters(recurse=False)}
    order, at = [], [0, 0]
    for name, p in trainable:
        no_decay = name in in_norm or any(r.search(name.lower()) for r in _NO_DECAY_PATTERNS)
        g = int(no_decay)
        if at[g] >= len(ids[g]) or shapes[ids[g][at[g]]] != tuple(p.shape):
            return None
        order.append((ids[g][at[g]], g))
        at[g] += 1
    return order
