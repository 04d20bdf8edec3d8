"""Costs: how far a perturbed network's behaviour is from the anchor's on the data.

A cost here is a callable ``outputs -> scalar tensor`` with the anchor's outputs (and labels, and
the token mask) bound in. Every cost is a mean over examples (and unmasked tokens), is >= 0 and
is 0 at the anchor for "kl" and "mse"; "cross_entropy" measures the increase of the loss over
the anchor's.
"""

from __future__ import annotations

import torch

__all__ = ["OUTPUT_KINDS", "COSTS", "make_cost", "to_log_probs"]

OUTPUT_KINDS = ("logits", "probabilities", "log_probabilities")
COSTS = ("kl", "cross_entropy", "mse")


def to_log_probs(outputs: torch.Tensor, output: str) -> torch.Tensor:
    """Log-probabilities over the last axis from logits, probabilities or log-probabilities."""
    if output == "logits":
        return torch.log_softmax(outputs, dim=-1)
    if output == "probabilities":
        # clamp: a softmax output can underflow to exactly 0, whose log would poison the mean
        return torch.log(outputs.clamp_min(torch.finfo(outputs.dtype).tiny))
    if output == "log_probabilities":
        return outputs
    raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")


def _masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Mean over all leading axes of ``values`` where ``mask`` is 1 (mask shape = values shape)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def kl_cost(anchor_outputs, output, mask=None):
    """KL(p_anchor ‖ p_θ') averaged over examples (and unmasked tokens): the paper's cost."""
    log_p0 = to_log_probs(anchor_outputs, output).detach()
    p0 = log_p0.exp()

    def cost(outputs):
        log_p = to_log_probs(outputs, output)
        # p0 = 0 entries contribute 0 even where log_p = -inf (0·inf would be NaN)
        terms = torch.where(p0 > 0, p0 * (log_p0 - log_p), torch.zeros_like(log_p))
        return _masked_mean(terms.sum(-1), mask)

    return cost


def cross_entropy_cost(anchor_outputs, output, y, mask=None):
    """Mean cross-entropy minus the anchor's: may be negative where the loss decreases."""
    if y is None:
        raise ValueError(
            'cost="cross_entropy" needs labels: call fit(model, X, y) with y the class indices.'
        )
    y = y.long()

    def loss(outputs):
        log_p = to_log_probs(outputs, output)
        nll = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return _masked_mean(nll, mask)

    base = loss(anchor_outputs).detach()

    def cost(outputs):
        return loss(outputs) - base

    return cost


def mse_cost(anchor_outputs):
    """``torch.nn.functional.mse_loss(outputs, anchor_outputs)``: mean over examples and units."""
    anchor = anchor_outputs.detach()

    def cost(outputs):
        return torch.nn.functional.mse_loss(outputs, anchor)

    return cost


def make_cost(cost, anchor_outputs, *, output="logits", y=None, mask=None):
    """Bind a cost specification to the anchor's outputs.

    Parameters
    ----------
    cost : {"kl", "cross_entropy", "mse"} or callable
        A callable is called as ``cost(outputs, anchor_outputs)`` (or with ``y`` as a third
        argument when ``y`` is given) and must return a scalar tensor built with torch
        operations (it is evaluated under :func:`torch.func.vmap`).
    anchor_outputs : torch.Tensor
    output : {"logits", "probabilities", "log_probabilities"}
    y : torch.Tensor, optional
    mask : torch.Tensor, optional
        (N, T) token mask for sequence outputs (N, T, V).

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
    """
    if callable(cost):
        anchor = anchor_outputs.detach()
        if y is not None:
            return lambda outputs: cost(outputs, anchor, y)
        return lambda outputs: cost(outputs, anchor)
    if cost == "kl":
        return kl_cost(anchor_outputs, output, mask)
    if cost == "cross_entropy":
        return cross_entropy_cost(anchor_outputs, output, y, mask)
    if cost == "mse":
        return mse_cost(anchor_outputs)
    raise ValueError(f"cost must be one of {COSTS} or a callable, got {cost!r}")
