"""What ``fit`` accepts: modules, skorch nets, Pipelines, arrays, tensors and DataLoaders.

- a ``torch.nn.Module`` is estimated as it is (what its outputs are is read from their shape
  unless told: see ``volsk.costs.resolve_output``);
- a fitted skorch net: its ``module_`` is estimated, its ``optimizer_`` serves "adam", and its
  criterion says what the module outputs (``NLLLoss`` → probabilities, ``CrossEntropyLoss`` →
  logits, ``BCEWithLogitsLoss`` → one binary logit, ``BCELoss`` → one binary probability);
- a fitted :class:`sklearn.pipeline.Pipeline` ending in a skorch net: X goes through the earlier
  steps first;
- X: an array-like, a tensor, a dict or tuple of them (keyword or positional model inputs), or
  a non-shuffling ``DataLoader`` whose batches are used as they come.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._evaluate import DataBatch

__all__ = ["ResolvedModel", "resolve_model", "as_input", "batches_from_loader", "n_examples"]


@dataclass
class ResolvedModel:
    """The network behind what ``fit`` was given, and what it tells about the network."""

    module: torch.nn.Module
    X: object
    output: str | None  # what the module outputs (output="auto"); None: from their shape
    optimizer: object = None


def _is_skorch_net(obj) -> bool:
    from skorch import NeuralNet  # import time: skorch is only needed when one is passed

    return isinstance(obj, NeuralNet)


_CRITERION_OUTPUTS = (
    (torch.nn.NLLLoss, "probabilities"),  # skorch's classifier default: a module ending in softmax
    (torch.nn.CrossEntropyLoss, "logits"),
    (torch.nn.BCEWithLogitsLoss, "binary_logits"),
    (torch.nn.BCELoss, "binary_probabilities"),
)


def _output_of_criterion(criterion) -> str | None:
    cls = criterion if isinstance(criterion, type) else type(criterion)
    for loss, output in _CRITERION_OUTPUTS:
        if isinstance(cls, type) and issubclass(cls, loss):
            return output
    return None


def resolve_model(model, X) -> ResolvedModel:
    """Unwrap a skorch net or a Pipeline ending in one; pass modules through.

    Examples
    --------
    >>> import torch
    >>> from volsk._inputs import resolve_model
    >>> resolve_model(torch.nn.Linear(2, 3), torch.zeros(1, 2)).output is None  # from the shape
    True
    """
    if isinstance(model, torch.nn.Module):
        return ResolvedModel(module=model, X=X, output=None)
    from sklearn.pipeline import Pipeline  # import time: only for Pipelines

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
    raise TypeError(
        f"model must be a torch.nn.Module, a fitted skorch net or a Pipeline ending in one; got "
        f"{type(model).__name__}"
    )


def as_input(X):
    """Check X (non-empty, finite) and turn it into tensors; dicts/tuples of arrays allowed."""
    if isinstance(X, dict):
        return {k: as_input(v) for k, v in X.items()}
    if isinstance(X, tuple):
        return tuple(as_input(v) for v in X)
    if not isinstance(X, torch.Tensor):
        try:
            arr = np.asarray(X)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad X
            raise TypeError(f"X must be an array-like or a torch.Tensor ({exc})") from None
        if arr.dtype == object:
            raise TypeError("X must be a numeric array-like or a torch.Tensor")
        X = torch.as_tensor(arr.astype(np.float32) if arr.dtype == np.float64 else arr)
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(f"X must hold at least one example, got shape {tuple(X.shape)}")
    if torch.is_floating_point(X) and not torch.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X


def batches_from_loader(loader):
    """Materialise a DataLoader's batches once (CPU tensors) so every evaluation sees the same
    data: items are tensors, ``(x, y)`` pairs or dicts (Hugging Face style; ``"labels"`` is
    taken as y, ``"attention_mask"`` is passed to the model and masks the cost)."""
    batches, ys = [], []
    for item in loader:
        y = None
        if isinstance(item, dict):
            item = dict(item)
            y = item.pop("labels", None)
            x = {k: as_input(v) for k, v in item.items()}
        elif isinstance(item, (tuple, list)):
            x = as_input(item[0])
            y = item[1] if len(item) > 1 else None
        else:
            x = as_input(item)
        batches.append(DataBatch(x, {}, n_examples(x)))
        ys.append(None if y is None else torch.as_tensor(y))
    if not batches:
        raise ValueError("X is an empty DataLoader: it must yield at least one batch")
    if any(v is None for v in ys) and not all(v is None for v in ys):
        raise ValueError("the DataLoader yields labels for some batches and not for others")
    return batches, ys


def n_examples(X) -> int:
    """Number of examples in X (a tensor, or a dict/tuple of tensors sharing axis 0)."""
    if isinstance(X, dict):
        return int(next(iter(X.values())).shape[0])
    if isinstance(X, tuple):
        return int(X[0].shape[0])
    return int(X.shape[0])
