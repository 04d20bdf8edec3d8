"""volsk's private copy of a user's model: deep-copied, no hook runs on it, and every computed
weight a plain function of the parameters it is computed from.

Hooks
    A forward (pre-)hook or backward hook registered on the user's model, and torch's
    process-wide module hooks (``torch.nn.modules.module.register_module_forward_hook`` and
    friends), would otherwise run on every forward volsk makes — vmapped over directions,
    inside forward-mode AD — and be fed batched tensors that escape into user code (a hook
    that stores activations). On the copy every module's hook registries are emptied and
    ``module(...)`` calls ``forward`` directly, which is what ``nn.Module.__call__`` does when
    no hook is registered: no hook of any kind runs there. The user's model keeps its hooks.
    volsk thus measures ``forward`` alone: a hook that changes a module's inputs or outputs
    is not part of it (FunctionalModel warns when the model has forward hooks).

Computed weights
    Some torch utilities make a module's weight a function of other parameters:
    ``torch.nn.utils.parametrizations.weight_norm`` (and any ``torch.nn.utils.parametrize``
    parametrization), and the legacy ``torch.nn.utils.weight_norm``, ``spectral_norm`` and
    ``torch.nn.utils.prune``, which recompute the weight in a forward pre-hook and keep it as a
    plain attribute. On the copy each such weight is a property computed, at every access,
    from the parameters as :func:`torch.func.functional_call` passes them. The trainable
    parameters (what volsk perturbs) are the originals, under the user's names —
    ``parametrizations.weight.original0``/``original1`` (g, v), ``weight_g``/``weight_v``,
    ``weight_orig`` — and the weight follows them. Weight normalisation is computed as
    v·g/‖v‖ with composite ops: torch's fused ``_weight_norm`` kernel has no forward-mode AD
    and no vmap rule. Unlike torch's parametrized modules, the copy pickles (joblib's process
    workers).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

__all__ = ["calls_forward_directly", "computed_name", "deep_copy", "forward_hooks",
           "observing_outputs", "private_copy"]

# hooks a forward or backward pass runs (the *_with_kwargs/always_called dicts mark entries
# of the others)
HOOK_REGISTRIES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks",
)
# volsk never saves or loads the copy's state; these often hold local functions (torch's
# weight_norm registers one) that would keep the copy from pickling
STATE_DICT_HOOK_REGISTRIES = (
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


# torch.nn.utils exports functions under these modules' names: import the modules by path
LegacyWeightNorm = importlib.import_module("torch.nn.utils.weight_norm").WeightNorm
LegacySpectralNorm = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm
TorchWeightNorm = importlib.import_module("torch.nn.utils.parametrizations")._WeightNorm


def computed_name(hook):
    """The attribute a legacy reparametrising pre-hook computes, or None for other hooks."""
    if isinstance(hook, (LegacyWeightNorm, LegacySpectralNorm)):
        return hook.name
    if isinstance(hook, BasePruningMethod):
        return hook._tensor_name
    return None


def deep_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, also when a legacy reparametrising pre-hook (weight_norm,
    spectral_norm, prune) left its computed weight attribute as a non-leaf tensor, which
    deepcopy refuses: the copy gets it detached and cloned (never sharing the user's storage)."""
    memo = {}
    for m in module.modules():
        for hook in m._forward_pre_hooks.values():
            name = computed_name(hook)
            value = m.__dict__.get(name) if name is not None else None
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with plain computed weights, on which no hook runs."""
    work = deep_copy(module)
    for m in work.modules():
        _plain_computed_weights(m)
    for m in work.modules():
        for registry in HOOK_REGISTRIES + STATE_DICT_HOOK_REGISTRIES:
            hooks = getattr(m, registry, None)
            if hooks:
                hooks.clear()
        m.__dict__["_call_impl"] = _Forward(m)
    return work


def forward_hooks(module: nn.Module) -> list:
    """Names of ``module``'s submodules with forward hooks or forward pre-hooks (other than
    the reparametrising pre-hooks above, which the copy computes as properties): what the
    private copy does not run although it could change the outputs."""
    names = []
    for name, m in module.named_modules():
        pre = [h for h in m._forward_pre_hooks.values() if computed_name(h) is None]
        if pre or m._forward_hooks:
            names.append(name or "<root>")
    return names


def calls_forward_directly(module: nn.Module) -> bool:
    """Whether ``module(...)`` runs its forward and nothing else (a private copy's module)."""
    return isinstance(module.__dict__.get("_call_impl"), _Forward)


@contextlib.contextmanager
def observing_outputs(module: nn.Module, callback):
    """Within the block, ``callback(output)`` after every forward of ``module`` and of each of
    its submodules: the private copy's stand-in for a forward hook (which would not run)."""
    saved = {m: m.__dict__.get("_call_impl") for m in module.modules()}
    for m in saved:
        m.__dict__["_call_impl"] = _Observed(m, callback)
    try:
        yield
    finally:
        for m, impl in saved.items():
            if impl is None:
                m.__dict__.pop("_call_impl", None)
            else:
                m.__dict__["_call_impl"] = impl


class _Forward:
    """``module(...)`` on the private copy: the module's forward, no hooks."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module.forward(*args, **kwargs)


class _Observed(_Forward):
    def __init__(self, module, callback):
        super().__init__(module)
        self.callback = callback

    def __call__(self, *args, **kwargs):
        out = self.module.forward(*args, **kwargs)
        self.callback(out)
        return out


# ------------------------------------------------------------------------- computed weights
def weight_norm(g, v, dim):
    """w = v·g/‖v‖, the norm over every axis of v but ``dim`` (None or -1: the whole tensor),
    as ``torch._weight_norm`` computes it, in ops that forward-mode AD and vmap support (its
    fused kernel and ``torch.norm_except_dim`` have neither a forward derivative nor a
    batching rule)."""
    if dim is None or dim == -1:
        norm = torch.linalg.vector_norm(v)
    else:
        others = [i for i in range(v.ndim) if i != dim % v.ndim]
        norm = torch.linalg.vector_norm(v, dim=others, keepdim=True) if others else v.abs()
    return v * (g / norm)


class WeightNormFormula(nn.Module):
    """torch's ``_WeightNorm`` parametrization (originals g, v) computed by :func:`weight_norm`."""

    def __init__(self, dim):
        super().__init__()
        self.dim = -1 if dim is None else dim

    def forward(self, weight_g, weight_v):
        return weight_norm(weight_g, weight_v, self.dim)

    def right_inverse(self, weight):
        return torch.norm_except_dim(weight, 2, self.dim), weight  # as _WeightNorm's


def _parametrized(module, name):
    return module.parametrizations[name]()


def _legacy_weight_norm(module, name, dim):
    return weight_norm(getattr(module, name + "_g"), getattr(module, name + "_v"), dim)


def _legacy_spectral_norm(module, hook):
    # the copy is in eval mode, where the legacy hook does no power iteration either
    return hook.compute_weight(module, do_power_iteration=False)


def _pruned(module, hook):
    return hook.apply_mask(module)


def _compute(module, name):
    return module.__dict__["_volsk_computed"][name](module)


@functools.cache
def _computing_class(base, names):
    """``base`` with a property per computed weight name (cached: one class per pair)."""
    namespace = {name: property(functools.partial(_compute, name=name)) for name in names}
    namespace["__reduce_ex__"] = _reduce
    namespace["_volsk_computed_base"] = base
    return type(f"Computed{base.__name__}", (base,), namespace)


def _reduce(self, protocol):
    # pickled by (base class, names), which are importable, unlike the generated class
    cls = type(self)
    names = tuple(sorted(self.__dict__["_volsk_computed"]))
    return _rebuild, (cls._volsk_computed_base, names), self.__dict__


def _rebuild(base, names):
    cls = _computing_class(base, names)
    return cls.__new__(cls)


def _plain_computed_weights(m: nn.Module):
    """Turn ``m``'s parametrized or hook-computed weights into properties (see module doc)."""
    if getattr(type(m), "_volsk_computed_base", None) is not None:
        return  # a copy of a private copy
    computed = {}
    base = type(m)
    if parametrize.is_parametrized(m):
        base = parametrize.type_before_parametrizations(m)
        for name, chain in m.parametrizations.items():
            for i, step in enumerate(chain):
                if type(step) is TorchWeightNorm:
                    chain[i] = WeightNormFormula(step.dim)
            computed[name] = functools.partial(_parametrized, name=name)
    for key, hook in list(m._forward_pre_hooks.items()):
        name = computed_name(hook)
        if name is None:
            continue
        if isinstance(hook, LegacyWeightNorm):
            computed[name] = functools.partial(_legacy_weight_norm, name=name, dim=hook.dim)
        elif isinstance(hook, LegacySpectralNorm):
            computed[name] = functools.partial(_legacy_spectral_norm, hook=hook)
        else:
            computed[name] = functools.partial(_pruned, hook=hook)
        del m._forward_pre_hooks[key]
        m.__dict__.pop(name, None)  # the last computed value; the property replaces it
    if computed:
        m.__class__ = _computing_class(base, tuple(sorted(computed)))
        m.__dict__["_volsk_computed"] = computed
