"""Costs: how far a perturbed network's behaviour is from the anchor's on the data.

A cost here is a callable ``outputs -> scalar tensor`` with the anchor's outputs (and labels, and
the token mask) bound in. Every cost is a mean over examples (and unmasked tokens), is >= 0 and
is 0 at the anchor for "kl" and "mse"; "cross_entropy" measures the increase of the loss over
the anchor's. The "kl" (on logits) and "mse" costs of (N, out) outputs also carry
``cost.features_first``: the same cost for a batch of B transposed outputs (B, out, N) → (B,),
as the plain-MLP fast path (``volsk._stacked``) produces them, without ``vmap``.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["OUTPUT_KINDS", "COSTS", "make_cost", "to_log_probs", "check_token_mask"]

OUTPUT_KINDS = ("logits", "probabilities", "log_probabilities")
COSTS = ("kl", "cross_entropy", "mse")


def to_log_probs(outputs: torch.Tensor, output: str) -> torch.Tensor:
    """Log-probabilities over the last axis from logits, probabilities or log-probabilities.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import to_log_probs
    >>> to_log_probs(torch.tensor([[0.25, 0.75]]), "probabilities").exp()
    tensor([[0.2500, 0.7500]])
    """
    if output == "logits":
        return torch.log_softmax(outputs, dim=-1)
    if output == "probabilities":
        # clamp: a softmax output can underflow to exactly 0, whose log would poison the mean
        return torch.log(outputs.clamp_min(torch.finfo(outputs.dtype).tiny))
    if output == "log_probabilities":
        return outputs
    raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")


IGNORE_INDEX = -100  # labels equal to this are ignored, as in torch.nn.CrossEntropyLoss


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs are compared in float32: a 1e-3-nat cutoff is below their ulp."""
    if t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
        return t.float()
    return t


def _masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Mean over all leading axes of ``values`` where ``mask`` is 1 (mask shape = values shape)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def check_token_mask(mask, anchor_outputs, name="attention_mask"):
    """The token mask the cost averages with, or None.

    For sequence outputs (N, T, V) the mask must be (N, T) and keep some token. For outputs
    with one row per example (N, V) — a sequence classifier — the mask only served the forward
    pass: the cost averages over examples and None is returned.
    """
    if mask is None or anchor_outputs.ndim <= 2:
        return None
    if tuple(mask.shape) != tuple(anchor_outputs.shape[:-1]):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not fit the model's outputs of shape "
            f"{tuple(anchor_outputs.shape)}: it must be (N, T) for sequence outputs (N, T, V)"
        )
    if not bool((mask != 0).any()):
        raise ValueError(f"{name} is 0 everywhere: no token is left to compare outputs on")
    return mask


def kl_cost(anchor_outputs, output, mask=None):
    """KL(p_anchor ‖ p_θ') averaged over examples (and unmasked tokens): the paper's cost."""
    log_p0 = to_log_probs(_upcast(anchor_outputs), output).detach()
    p0 = log_p0.exp()
    if output == "logits":
        # KL = lse(z) − lse(z₀) − ⟨p₀, z − z₀⟩ (Σ p₀ = 1): no log_softmax of the perturbed
        # logits (it costs ~5× a logsumexp over a short last axis on the CPU), and exactly 0
        # at the anchor
        z0 = _upcast(anchor_outputs).detach()
        lse0 = torch.logsumexp(z0, -1)
        # the mean over examples (tokens) as weighted sums with the per-row weights w; plain
        # elementwise products and sums (not torch.dot, whose batched kernel rounds differently
        # for different numbers of directions)
        w = torch.ones_like(lse0) if mask is None else mask.to(lse0.dtype)
        w = w / w.sum()
        w_p0 = w.unsqueeze(-1) * p0

        def cost_from_logits(outputs):
            z = _upcast(outputs)
            shift = (w * (torch.logsumexp(z, -1) - lse0)).sum()
            return shift - (w_p0 * (z - z0)).sum()

        if z0.ndim == 2:
            z0_t, w_p0_t = z0.t().contiguous(), w_p0.t().contiguous()

            def features_first(outputs_t):
                z = _upcast(outputs_t)
                shift = ((torch.logsumexp(z, 1) - lse0) * w).sum(1)
                return shift - ((z - z0_t) * w_p0_t).sum((1, 2))

            cost_from_logits.features_first = features_first
        return cost_from_logits

    def cost(outputs):
        log_p = to_log_probs(_upcast(outputs), output)
        # p0 = 0 entries contribute 0 even where log_p = -inf (0·inf would be NaN)
        terms = torch.where(p0 > 0, p0 * (log_p0 - log_p), torch.zeros_like(log_p))
        return _masked_mean(terms.sum(-1), mask)

    return cost


def cross_entropy_cost(anchor_outputs, output, y, mask=None):
    """Mean cross-entropy minus the anchor's: negative where the loss decreases.

    Labels equal to -100 are ignored (as in :class:`torch.nn.CrossEntropyLoss`), and so are
    tokens whose mask is 0.
    """
    if y is None:
        raise ValueError(
            'cost="cross_entropy" needs labels: call fit(model, X, y) with y the class indices.'
        )
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise ValueError("y must hold integer class indices for cost='cross_entropy'")
    y = y.long()
    if tuple(y.shape) != tuple(anchor_outputs.shape[:-1]):
        raise ValueError(
            f"y of shape {tuple(y.shape)} does not fit the model's outputs of shape "
            f"{tuple(anchor_outputs.shape)}: cost='cross_entropy' needs one class index per "
            "example (per token for sequence outputs)"
        )
    keep = y != IGNORE_INDEX
    n_classes = anchor_outputs.shape[-1]
    if bool(((y[keep] < 0) | (y[keep] >= n_classes)).any()):
        raise ValueError(f"y must hold class indices in [0, {n_classes}) (or -100 to ignore)")
    weights = keep if mask is None else keep & (mask != 0)
    if not bool(weights.any()):
        raise ValueError("every label is ignored (y = -100 or masked): nothing to compare")
    index = torch.where(keep, y, torch.zeros_like(y)).unsqueeze(-1)

    def loss(outputs):
        log_p = to_log_probs(_upcast(outputs), output)
        nll = -log_p.gather(-1, index).squeeze(-1)
        return _masked_mean(nll, weights)

    base = loss(anchor_outputs).detach()

    def cost(outputs):
        return loss(outputs) - base

    return cost


def mse_cost(anchor_outputs, mask=None):
    """``torch.nn.functional.mse_loss(outputs, anchor_outputs)``: mean over examples and units.

    With a token mask (N, T), the mean runs over unmasked tokens (and all units).
    """
    anchor = _upcast(anchor_outputs).detach()

    def cost(outputs):
        outputs = _upcast(outputs)
        if mask is None:
            return torch.nn.functional.mse_loss(outputs, anchor)
        return _masked_mean((outputs - anchor).pow(2).mean(-1), mask)

    if mask is None and anchor.ndim == 2:
        anchor_t = anchor.t().contiguous()

        def features_first(outputs_t):
            return (_upcast(outputs_t) - anchor_t).pow(2).mean((1, 2))

        cost.features_first = features_first
    return cost


def _callable_arity(fn):
    """(positional parameters accepted, required; accepts a ``mask`` keyword)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume (outputs, anchor[, y])
        return 3, 2, False
    accepted = required = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            accepted = 3
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            accepted += 1
            required += p.default is p.empty
    takes_mask = "mask" in sig.parameters or any(
        p.kind == p.VAR_KEYWORD for p in sig.parameters.values()
    )
    return accepted, required, takes_mask


def user_cost(fn, anchor_outputs, y=None, mask=None):
    """Bind a user callable ``fn(outputs, anchor_outputs[, y][, mask=...])``."""
    accepted, required, takes_mask = _callable_arity(fn)
    if accepted < 2:
        raise TypeError("a cost callable must take (outputs, anchor_outputs[, y])")
    if required >= 3 and y is None:
        raise ValueError("the cost callable takes labels y, but fit got y=None: pass y")
    anchor = anchor_outputs.detach()
    args = (anchor, y) if (y is not None and accepted >= 3) else (anchor,)
    kwargs = {"mask": mask} if (mask is not None and takes_mask) else {}

    def cost(outputs):
        value = fn(outputs, *args, **kwargs)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"the cost callable returned {type(value).__name__}; it must return a scalar "
                "torch.Tensor computed with torch operations (it runs under torch.func.vmap)"
            )
        if value.ndim != 0:
            raise ValueError(
                f"the cost callable returned a tensor of shape {tuple(value.shape)}; it must "
                "return a scalar (reduce over examples, e.g. with .mean())"
            )
        return value

    return cost


def make_cost(cost, anchor_outputs, *, output="logits", y=None, mask=None):
    """Bind a cost specification to the anchor's outputs.

    Parameters
    ----------
    cost : {"kl", "cross_entropy", "mse"} or callable
        "kl": KL(anchor ‖ perturbed) averaged over examples (and unmasked tokens); "mse": the
        mean squared difference from the anchor's outputs (over unmasked tokens with a mask);
        "cross_entropy": the mean cross-entropy against ``y`` minus the anchor's (negative
        where the loss decreases; labels -100 are ignored). A callable is called as
        ``cost(outputs, anchor_outputs)``, with ``y`` as a third argument when it accepts one
        and ``y`` is given, and with ``mask=`` when it has a ``mask`` parameter and a token
        mask is given; it must return a scalar tensor built with torch operations (it is
        evaluated under :func:`torch.func.vmap`).
    anchor_outputs : torch.Tensor
        (N, V), or (N, T, V) for sequence models.
    output : {"logits", "probabilities", "log_probabilities"}
    y : torch.Tensor, optional
        Class indices, (N,) or (N, T).
    mask : torch.Tensor, optional
        (N, T) token mask for sequence outputs (N, T, V): tokens where it is 0 are ignored.

    Returns
    -------
    callable
        ``outputs -> scalar tensor``.

    Examples
    --------
    >>> import torch
    >>> from volsk.costs import make_cost
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> kl = make_cost("kl", logits)
    >>> float(kl(logits))
    0.0
    >>> ce = make_cost("cross_entropy", logits, y=torch.tensor([0, 0]))
    >>> round(float(ce(torch.zeros(2, 2))), 4)  # uniform predictions lower this loss
    -0.0269
    """
    mask = check_token_mask(mask, anchor_outputs)
    if callable(cost):
        return user_cost(cost, anchor_outputs, y=y, mask=mask)
    if cost == "kl":
        return kl_cost(anchor_outputs, output, mask)
    if cost == "cross_entropy":
        return cross_entropy_cost(anchor_outputs, output, y, mask)
    if cost == "mse":
        return mse_cost(anchor_outputs, mask)
    raise ValueError(f"cost must be one of {COSTS} or a callable, got {cost!r}")
