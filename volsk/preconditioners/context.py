"""What a preconditioner may look at when it is bound to an anchor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._evaluate import FunctionalModel

__all__ = ["PreconditionerContext"]


@dataclass
class PreconditionerContext:
    """What a preconditioner may look at when it is bound to an anchor.

    Attributes
    ----------
    evaluator : volsk._evaluate.FunctionalModel
        The private eval-mode copy of the model with the inputs X (None is enough for
        :class:`Identity`).
    cost : volsk.costs.BoundCost or BatchedCost
        ``outputs -> scalar`` bound to the anchor; it knows what the outputs are and its own
        curvature (see :mod:`volsk.costs`).
    mask : torch.Tensor (n,) bool
        Coordinates directions move in (flat coordinates integrated out are False).
    eps, exponent : float
        P ∝ 1/(|h|^exponent + eps).
    user_module : torch.nn.Module or None
        The user's module, read only (to map optimizer state by parameter identity).
    optimizer : torch.optim.Optimizer or dict or None
        The optimizer that trained the model, or its ``state_dict()`` (for :class:`Adam`).
    random_state : int
        Seed of randomised curvature estimates (Hutchinson's probes).

    Examples
    --------
    >>> import torch
    >>> from volsk.preconditioners import Identity, PreconditionerContext
    >>> ctx = PreconditionerContext(None, None, torch.tensor([True, False, True]))
    >>> ctx.n, Identity().bind(ctx).n
    (2, 2)
    """

    evaluator: FunctionalModel
    cost: Callable[[torch.Tensor], torch.Tensor]
    mask: torch.Tensor
    eps: float = 1e-3
    exponent: float = 0.5
    user_module: nn.Module | None = None
    optimizer: torch.optim.Optimizer | dict | None = None
    random_state: int = 0

    @property
    def n(self) -> int:
        """The number of active coordinates."""
        return int(torch.count_nonzero(self.mask))  # mask.sum() would copy it to int64
