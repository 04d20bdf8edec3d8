"""Priors read off a model's own initialisation (``sigma="init"``, ``bounds="init"``).

The prior a network is "sampled at random" from is, most naturally, the distribution it was
initialised from. volsk recovers it empirically: it deep-copies the model, re-runs the model's
own initialisation code on the copy several times with fixed seeds, and records, per parameter
tensor, the mean and the spread of the values drawn.

Which code initialises a parameter
    PyTorch modules: ``reset_parameters()`` (``_reset_parameters()`` for ``nn.MultiheadAttention``
    and ``nn.Transformer``), called children first, parents last — the order of construction,
    so a parent that overrides its children's init (``MultiheadAttention`` zeroing
    ``out_proj.bias``) has the last word. Inside a Hugging Face ``PreTrainedModel`` the model's
    ``_init_weights(module)`` is used instead (what ``post_init()`` runs): ``nn.Linear`` there is
    N(0, initializer_range²), not PyTorch's default. A trainable parameter that none of these
    writes is an error naming it (give its module a ``reset_parameters()`` or pass the prior
    explicitly, e.g. as a ``{parameter name: value}`` dict).

What is recorded, per tensor
    *Random* tensors (the draws differ): the spread is the root-mean-square deviation of all
    drawn values from the tensor's mean. The mean is 0 unless the draws' mean is more than
    4 standard errors from 0 (an init such as N(1, 0.02²)): PyTorch's and Hugging Face's inits
    are zero-mean, and a noisy estimate of 0 would shift the prior by a little in every one of
    millions of coordinates. Enough draws are taken that every tensor has ``min_values`` values
    (at most 2000 re-initialisations), so spreads are accurate to about 0.5 % (1 % for a
    single-element tensor).

    *Deterministic* tensors (every draw identical: LayerNorm/BatchNorm weight = 1, zero biases,
    ``eye_``/``dirac_`` inits): the mean is the initial value itself, elementwise, and the
    spread — zero for the initialisation, but a prior needs a positive one — is floored at the
    median spread of the model's random tensors (for a Hugging Face model, initializer_range):
    the constant-initialised parameters are treated as being as uncertain as a typical weight.
    A :class:`InitPriorWarning` names them.

From spread to prior
    ``kind="gaussian"``: σ = the spread (the std of the initialisation; for ``nn.Linear(fan_in,
    ·)``, whose init is U(−1/√fan_in, 1/√fan_in), σ = 1/√(3·fan_in)). ``kind="uniform"``: the
    half-width b = √3·spread, the box with the init's variance. For a uniform init this recovers
    the init's own box (b = 1/√fan_in for ``nn.Linear``), from the variance rather than the
    largest draw: the sample maximum would be slightly short of b for a uniform init and would
    grow with the number of draws for a Gaussian one.

The user's model is never touched: a copy is re-initialised.

Thread safety
    The prior is a pure function of (model, ``seed``). Every random draw of the
    re-initialisations (``torch.nn.init``, ``Tensor.uniform_``, ``torch.randn``, ...) is routed
    to generators of the prior's own, seeded as listed above, by a dispatch mode that is local
    to the computing thread: priors computed in concurrent threads are those computed one at a
    time, and torch's global generators are neither read nor advanced — other threads' draws
    are unaffected and the caller's generator states (CPU and CUDA) stay as they were. The
    values are those of seeding torch's global CPU generator instead (the draws are the same
    kernels on the same stream). Exception: the few random kernels that take no generator at
    all (dropout, recurrent layers, fused attention — not initialisation code) draw from the
    global generator of their device with its state swapped for the prior's and restored,
    under a process-wide lock, for the duration of that one kernel.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ._private_copy import computed_name, deep_copy
from ._private_draws import PrivateDraws

__all__ = ["InitPrior", "InitPriorWarning", "init_prior", "init_spread"]

KINDS = ("gaussian", "uniform")
UNIFORM_FACTOR = math.sqrt(3.0)  # half-width / std of a uniform distribution
MEAN_Z = 4.0  # a random tensor's mean counts as non-zero beyond this many standard errors


class InitPriorWarning(UserWarning):
    """Some parameters are initialised to constants; their prior spread was floored."""


@dataclass
class InitPrior:
    """A per-tensor prior derived from the model's initialisation.

    Attributes
    ----------
    kind : {"gaussian", "uniform"}
    mean : dict of str to torch.Tensor
        Prior mean per parameter name (float64, the parameter's shape).
    spread : dict of str to float
        σ (gaussian) or half-width b (uniform) per parameter name.
    constant : list of str
        Parameters whose initialisation is deterministic; their spread is ``floor``.
    floor : float
        Spread given to the deterministic parameters.
    draws : dict of str to int
        Number of re-initialisations each parameter's statistics come from.
    """

    kind: str
    mean: dict
    spread: dict
    constant: list = field(default_factory=list)
    floor: float = math.nan
    draws: dict = field(default_factory=dict)

    def flat(self, names, what="spread") -> torch.Tensor:
        """``spread`` or ``mean`` as one float64 vector in the order of ``names``."""
        values = getattr(self, what)
        pieces = []
        for name in names:
            v = values[name]
            if what == "spread":
                v = torch.full((self.mean[name].numel(),), float(v), dtype=torch.float64)
            pieces.append(torch.as_tensor(v, dtype=torch.float64).reshape(-1))
        return torch.cat(pieces)


# ------------------------------------------------------------------------------ reset plan
def _hf_model_class():
    module = sys.modules.get("transformers")
    return getattr(module, "PreTrainedModel", None) if module is not None else None


def _post_order(module, hf_owner, hf_class, seen):
    """(module, reset callable or None) with children before parents, shared modules once."""
    if hf_class is not None and isinstance(module, hf_class):
        hf_owner = module
    for child in module.children():
        if id(child) not in seen:
            seen.add(id(child))
            yield from _post_order(child, hf_owner, hf_class, seen)
    yield module, _reset_of(module, hf_owner)


def _reset_of(module, hf_owner):
    if hf_owner is not None:
        return lambda: hf_owner._init_weights(module)
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _clear_hf_flags(module):
    """Hugging Face skips tensors marked as loaded; on our copy everything must be re-drawn."""
    for obj in [*module.modules(), *module.parameters(), *module.buffers()]:
        if "_is_hf_initialized" in getattr(obj, "__dict__", {}):
            delattr(obj, "_is_hf_initialized")


def _run_reset(module, reset, rng):
    try:
        with rng:  # only the reset's own ops pay for the routing
            reset()
    except Exception as exc:  # noqa: BLE001 - any failure of user init code is reported the same way
        raise ValueError(
            f'"init" prior: re-initialising {type(module).__name__} failed ({exc!r}). Pass the '
            "prior explicitly (a float, an array or a {parameter name: value} dict)."
        ) from exc


class _Stats:
    """float64 sums over the draws of one tensor, and whether all draws agreed.

    Draws are buffered and reduced in blocks: one reduction per draw would cost more than the
    re-initialisation itself for small tensors.
    """

    BLOCK = 1 << 20  # values buffered before a reduction

    def __init__(self, first):
        self.first = first.detach().to(torch.float64).reshape(-1).clone()
        self.count = 1
        self.total = float(self.first.sum())
        self.total_sq = float(self.first.pow(2).sum())
        self.deterministic = True
        self._buffer = []

    def add(self, values):
        self._buffer.append(values.detach().reshape(-1).clone())
        self.count += 1
        if len(self._buffer) * self.first.numel() >= self.BLOCK:
            self.flush()

    def flush(self):
        if not self._buffer:
            return
        v = torch.stack(self._buffer).to(torch.float64)  # (draws, numel)
        self._buffer = []
        self.total += float(v.sum())
        self.total_sq += float(v.pow(2).sum())
        if self.deterministic and not bool((v == self.first).all()):
            self.deterministic = False

    def mean_and_spread(self):
        """Per-tensor mean (snapped to 0 unless significant) and RMS deviation from it."""
        self.flush()
        m = self.count * self.first.numel()
        mean = self.total / m
        var = max(self.total_sq / m - mean * mean, 0.0)
        if abs(mean) <= MEAN_Z * math.sqrt(var / m):
            mean = 0.0
        second = max(self.total_sq / m - 2.0 * mean * self.total / m + mean * mean, 0.0)
        return mean, math.sqrt(second)


def _draw_seed(seed, owner, draw=0):
    return int(np.random.SeedSequence([int(seed), int(owner) + 1, int(draw)]).generate_state(1)[0])


def init_prior(module, kind="gaussian", *, names=None, seed=0, min_values=20_000,
               max_copies=2000, max_elements=50_000_000, floor="median", warn=True):
    """Per-tensor prior mean and spread from re-initialising copies of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        The model; it is deep-copied and never modified.
    kind : {"gaussian", "uniform"}, default="gaussian"
        "gaussian": spread = σ (the init's std); "uniform": spread = half-width √3·σ.
    names : list of str, optional
        Parameters to describe (default: every trainable parameter, ``named_parameters()``
        order).
    seed : int, default=0
        The re-initialisations of the module that owns a parameter draw from a generator
        seeded by (seed, owner).
    min_values : int, default=20000
        Values per tensor the statistics should rest on (sets the number of re-initialisations).
    max_copies : int, default=2000
        Most re-initialisations of one module.
    max_elements : int, default=5e7
        Most values drawn for one module; at least two draws are always taken.
    floor : "median" or float, default="median"
        Spread of deterministically initialised tensors: the median spread of the random
        tensors, or the value given.
    warn : bool, default=True
        Warn (:class:`InitPriorWarning`) naming deterministically initialised tensors.

    Returns
    -------
    InitPrior

    Raises
    ------
    ValueError
        If some parameter is written by no initialisation code, or no tensor is random and
        ``floor="median"``.

    Examples
    --------
    >>> import torch
    >>> from volsk.priors import init_prior
    >>> prior = init_prior(torch.nn.Linear(48, 100), "gaussian")
    >>> round(prior.spread["weight"] * (3 * 48) ** 0.5, 2)  # σ = 1/sqrt(3·fan_in)
    1.0
    >>> round(init_prior(torch.nn.Linear(48, 100), "uniform").spread["bias"] * 48 ** 0.5, 2)
    1.0
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if names is None:
        names = [k for k, p in module.named_parameters() if p.requires_grad]
    work = deep_copy(module).to("cpu")
    _clear_hf_flags(work)
    params = dict(work.named_parameters())
    missing = [k for k in names if k not in params]
    if missing:
        raise ValueError(f"the model has no parameters {missing}")
    of_tensor = {id(params[k]): k for k in names}

    plan = list(_post_order(work, None, _hf_model_class(), {id(work)}))
    subtree = []  # per plan entry: names of the described parameters below that module
    for m, _ in plan:
        subtree.append([of_tensor[id(p)] for p in m.parameters() if id(p) in of_tensor])

    owner = {}
    rng = PrivateDraws()  # this thread's random draws, from generators of the prior's own
    with torch.no_grad():
        for k in names:
            params[k].fill_(math.nan)
        # first pass: every reset in construction order; the last one to change a tensor owns it
        rng.manual_seed(_draw_seed(seed, -1, 0))
        for i, (m, reset) in enumerate(plan):
            if reset is None or not subtree[i]:
                continue
            before = [params[k].clone() for k in subtree[i]]
            _run_reset(m, reset, rng)
            for k, old in zip(subtree[i], before, strict=True):
                if not _same(old, params[k]):
                    owner[k] = i
        unset = [k for k in names if k not in owner or torch.isnan(params[k]).any()]
        derived = [k for k in unset if _weight_computed_from(work, k)]
        if derived:
            raise ValueError(
                f'"init" prior: the parameters {derived} are the originals a computed weight '
                "is derived from (weight normalisation's g and v, a parametrization's "
                "originals, spectral normalisation or pruning); the module's initialisation "
                "writes the weight itself, not them, so their initial distribution is not "
                "known. Pass the prior explicitly: a float, an array, or a {parameter name: "
                "value} dict (volsk.priors.init_prior(model, names=...) gives the others)."
            )
        if unset:
            raise ValueError(
                f'"init" prior: no initialisation code writes the parameters {unset} (their '
                "modules have no reset_parameters()). Give those modules a reset_parameters() "
                "method, or pass the prior explicitly: a float, an array, or a {parameter name: "
                "value} dict (volsk.priors.init_prior(model, names=...) gives the others)."
            )
        stats = {k: _Stats(params[k]) for k in names}
        below = [{id(m) for m in entry.modules()} for entry, _ in plan]

        # further draws: re-run each owner's subtree (children first). Draw 1 tells random
        # tensors from deterministic ones; the random ones get draws until each has min_values
        # values (within max_copies and max_elements).
        for i in sorted(set(owner.values())):
            owned = [k for k in names if owner[k] == i]
            members = [j for j in range(i + 1) if id(plan[j][0]) in below[i]]
            size = max(1, sum(p.numel() for p in plan[i][0].parameters()))
            copies = 2
            draw = 1
            rng.manual_seed(_draw_seed(seed, i, 1))
            while draw < copies:
                for j in members:
                    if plan[j][1] is not None and subtree[j]:
                        _run_reset(plan[j][0], plan[j][1], rng)
                for k in owned:
                    stats[k].add(params[k])
                if draw == 1:
                    for k in owned:
                        stats[k].flush()
                    owned = [k for k in owned if not stats[k].deterministic]
                    if owned:
                        smallest = min(params[k].numel() for k in owned)
                        copies = max(2, min(max_copies, math.ceil(min_values / smallest),
                                            max_elements // size))
                draw += 1

    mean, spread, constant, random_spreads = {}, {}, [], []
    for k in names:
        st = stats[k]
        if st.deterministic:
            mean[k] = st.first.reshape(params[k].shape)
            constant.append(k)
        else:
            m, s = st.mean_and_spread()
            mean[k] = torch.full(params[k].shape, m, dtype=torch.float64)
            spread[k] = s
            random_spreads.append(s)
    factor = UNIFORM_FACTOR if kind == "uniform" else 1.0
    spread = {k: factor * s for k, s in spread.items()}
    if constant:
        why = "the floor given"
        if isinstance(floor, str):
            why = "the median spread of the randomly initialised tensors"
            if floor != "median":
                raise ValueError(f'floor must be "median" or a float > 0, got {floor!r}')
            if not random_spreads:
                raise ValueError(
                    '"init" prior: every parameter is initialised to a constant, so the '
                    "initialisation has no scale to borrow; pass sigma/bounds explicitly"
                )
            floor = factor * float(np.median(random_spreads))
        floor = float(floor)
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        for k in constant:
            spread[k] = floor
        if warn:
            shown = ", ".join(constant[:8]) + (f" and {len(constant) - 8} more"
                                               if len(constant) > 8 else "")
            warnings.warn(
                f'"init" prior: {len(constant)} parameter tensor(s) are initialised to '
                f"constants ({shown}); their prior is centred on the initial value with spread "
                f"{floor:.4g} ({why}). Pass the prior as a {{parameter name: value}} dict to "
                "choose otherwise.",
                InitPriorWarning,
                stacklevel=2,
            )
    draws = {k: stats[k].count for k in names}
    return InitPrior(kind=kind, mean=mean, spread={k: spread[k] for k in names},
                     constant=constant, floor=float(floor) if constant else math.nan, draws=draws)


def _weight_computed_from(module, name):
    """Whether parameter ``name`` is an original that a computed weight is derived from
    (volsk._private_copy lists the kinds)."""
    path, _, leaf = name.rpartition(".")
    if ".parametrizations." in f".{path}.":
        return True
    owner = module.get_submodule(path) if path else module
    computed = [*owner.__dict__.get("_volsk_computed", ()),
                *(computed_name(hook) for hook in owner._forward_pre_hooks.values())]
    return any(c is not None and leaf != c and leaf.startswith(c) for c in computed)


def _same(old, new):
    """Equal elementwise, NaN matching NaN (a reset that leaves a NaN-filled tensor alone)."""
    return bool(((old == new) | (torch.isnan(old) & torch.isnan(new))).all())


def init_spread(ctx, kind="gaussian"):
    """The "init" prior's spread for a measure's context, one float64 entry per parameter.

    Parameters
    ----------
    ctx : volsk.measures.MeasureContext
        ``ctx.module`` (the evaluator's private copy) is deep-copied again before resetting.
    kind : {"gaussian", "uniform"}

    Returns
    -------
    torch.Tensor of shape (n,)
        σ (gaussian) or half-width (uniform) per trainable parameter coordinate.

    Examples
    --------
    >>> import torch
    >>> from volsk._evaluate import ParameterSpace
    >>> from volsk.measures import MeasureContext
    >>> from volsk.priors import init_spread
    >>> net = torch.nn.Linear(12, 2)
    >>> theta = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()])
    >>> ctx = MeasureContext(theta, torch.ones(26, dtype=bool), ParameterSpace.of(net), net)
    >>> init_spread(ctx, "uniform").shape
    torch.Size([26])
    """
    return prior_for_context(ctx, kind).flat(ctx.space.names, "spread").to(ctx.theta.device)


def prior_for_context(ctx, kind):
    """:func:`init_prior` of ``ctx.module`` for the context's parameters (cached on ``ctx``)."""
    if ctx.module is None or ctx.space is None:
        raise ValueError('an "init" prior needs the model (MeasureContext.module and .space)')
    cache = getattr(ctx, "_init_priors", None)
    if cache is None:
        cache = {}
        try:
            ctx._init_priors = cache
        except AttributeError:  # pragma: no cover - a frozen context: no caching
            pass
    if kind not in cache:
        cache[kind] = init_prior(ctx.module, kind, names=list(ctx.space.names))
    return cache[kind]
