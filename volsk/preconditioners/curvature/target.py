"""The cost as a function of the active coordinates, on a float64 twin of the model.

Every curvature kernel works on a :class:`CurvatureTarget`: flat coordinates integrated out are
left out before any matrix is formed, and by default the model is a float64 twin of the
estimator's copy (``curvature_target``), so that float32 rounding does not swamp small
eigenvalues; the estimator still measures the model in its own dtype.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from ..._evaluate import BatchedCost, FunctionalModel
from ...costs import BoundCost

__all__ = ["CostPart", "CurvatureTarget", "curvature_target"]


@dataclass
class CostPart:
    """One data batch's share of the cost: C = Σ_parts weight · cost(outputs on the batch)."""

    batch: int
    cost: BoundCost
    weight: float


@dataclass
class CurvatureTarget:
    """The cost as a function of the active coordinates, on a (float64) twin of the model.

    Attributes
    ----------
    evaluator : FunctionalModel
        The model whose curvature is taken (a float64 twin of the estimator's evaluator).
    parts : list of CostPart
        The cost per data batch, C = Σ_b w_b C_b (one part when X is not batched).
    cols : torch.Tensor
        (n_active,) indices of the active coordinates.
    random_state : int
    """

    evaluator: FunctionalModel
    parts: list
    cols: torch.Tensor
    random_state: int = 0

    @property
    def n_active(self) -> int:
        return int(self.cols.numel())

    @property
    def anchor(self) -> torch.Tensor:
        """The active coordinates of θ, (n_active,) in the evaluator's precision."""
        return self.evaluator.theta[self.cols].to(self.evaluator.model_dtype)

    def flat(self, active: torch.Tensor) -> torch.Tensor:
        """The full parameter vector with the active coordinates replaced by ``active``."""
        theta = self.evaluator.theta.to(active.dtype)
        if self.cols.numel() == theta.numel():
            return active
        return theta.index_copy(0, self.cols, active)

    def part_cost_of(self, part: CostPart, active: torch.Tensor) -> torch.Tensor:
        return part.cost(self.evaluator.outputs(self.flat(active), part.batch))

    def ggn_factor(self, part: CostPart, what: str, *, output_dtype: bool = False):
        """``(transform, root)`` of ``part``'s Gauss–Newton matrix at the anchor (see
        ``BoundCost.ggn_factor``), or a ValueError naming ``what`` needs it.

        ``output_dtype``: root in the dtype of the transformed outputs (that of a cotangent),
        its float64 original freed before this returns, not kept beside a forward graph."""
        anchor = self.evaluator.anchor_outputs(part.batch)
        factor = part.cost.ggn_factor(anchor, part.weight)
        if factor is None:
            raise ValueError(
                f"{what} needs cost 'kl', 'cross_entropy' or 'mse' (a known output-space "
                f"curvature); got cost={part.cost.spec!r}. Use preconditioner='hessian' or "
                "'diag_hessian' for a callable cost."
            )
        if output_dtype:
            transform, root = factor
            with torch.no_grad():
                dtype = transform(anchor).dtype
            factor = transform, root.to(dtype)
        return factor

    def cost_of(self, active: torch.Tensor) -> torch.Tensor:
        return sum(part.weight * self.part_cost_of(part, active) for part in self.parts)


def curvature_target(ctx, dtype=torch.float64) -> CurvatureTarget:
    """The cost of ``ctx`` on a twin of the model in ``dtype`` (None: the model's own dtype).

    The twin is a deep copy of the evaluator's private copy cast to ``dtype``, on the same data
    batches, with the estimator's per-batch cost weights, each cost re-bound to the twin's
    anchor outputs where its anchor matters ("kl", "mse": see ``BoundCost.at_anchor``), so that
    the gradient at θ vanishes to float64 rounding and the KL Hessian equals the Fisher. If
    the model cannot run in ``dtype`` (a forward that hard-codes float32 tensors), the model's
    own precision is used with a warning.
    """
    ev = ctx.evaluator
    cols = torch.nonzero(ctx.mask).flatten().to(ev.device)
    cost = ctx.cost
    pieces = list(zip(cost.parts, cost.weights)) if isinstance(cost, BatchedCost) else [(cost, 1.0)]
    if len(pieces) != len(ev.batches):
        raise ValueError(f"the cost has {len(pieces)} data batch(es), the model {len(ev.batches)}")
    twin = ev
    if dtype is not None and ev.model_dtype != dtype and ev.model_dtype.is_floating_point:
        try:
            module = copy.deepcopy(ev.module).to(dtype)
            twin = FunctionalModel(module, None, ev.device, batches=ev.batches)
            twin.anchor_outputs(0)
        except (RuntimeError, TypeError) as exc:
            warnings.warn(
                f"could not evaluate the model in {dtype} for its curvature ({exc}); using "
                f"{ev.model_dtype}",
                RuntimeWarning,
                stacklevel=3,
            )
            twin = ev
    parts = []
    for b, (part_cost, weight) in enumerate(pieces):
        if twin is not ev:
            part_cost = part_cost.at_anchor(twin.anchor_outputs(b))
        parts.append(CostPart(b, part_cost, float(weight)))
    return CurvatureTarget(twin, parts, cols, int(ctx.random_state))
