"""skorch and scikit-learn adapters: what ``fit(model, X)`` accepts besides a plain module.

- a fitted skorch net: its ``module_`` is estimated, its ``optimizer_`` serves "adam", and its
  criterion says what the module outputs (``NLLLoss`` → probabilities, ``CrossEntropyLoss`` →
  logits);
- a fitted :class:`sklearn.pipeline.Pipeline` ending in a skorch net: X goes through the
  earlier steps first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ResolvedModel", "resolve_model"]


@dataclass
class ResolvedModel:
    module: torch.nn.Module
    X: object
    output: str  # what the module outputs when the estimator's output="auto"
    optimizer: object = None


def _is_skorch_net(obj) -> bool:
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a dependency
        return False
    return isinstance(obj, NeuralNet)


def _output_of_criterion(criterion) -> str:
    if isinstance(criterion, type):
        cls = criterion
    else:
        cls = type(criterion)
    if issubclass(cls, torch.nn.NLLLoss):
        return "probabilities"
    return "logits"


def resolve_model(model, X) -> ResolvedModel:
    """Unwrap a skorch net or a Pipeline ending in one; pass modules through.

    Examples
    --------
    >>> import torch
    >>> from volsk.skorch import resolve_model
    >>> resolve_model(torch.nn.Linear(2, 3), torch.zeros(1, 2)).output
    'logits'
    """
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline):
        if not _is_skorch_net(model.steps[-1][1]):
            raise TypeError(
                "model is a Pipeline whose last step is not a skorch net; volsk needs the "
                "network itself (a torch.nn.Module or a fitted skorch net)"
            )
        if len(model.steps) > 1:
            X = model[:-1].transform(X)
        return resolve_model(model.steps[-1][1], X)
    if _is_skorch_net(model):
        if not getattr(model, "initialized_", False):
            raise ValueError("the skorch net is not fitted or initialized; call net.fit first")
        criterion = getattr(model, "criterion_", getattr(model, "criterion", None))
        return ResolvedModel(
            module=model.module_,
            X=X,
            output=_output_of_criterion(criterion),
            optimizer=getattr(model, "optimizer_", None),
        )
    if isinstance(model, torch.nn.Module):
        return ResolvedModel(module=model, X=X, output="logits")
    raise TypeError(
        f"model must be a torch.nn.Module, a fitted skorch net or a Pipeline ending in one; got "
        f"{type(model).__name__}"
    )
