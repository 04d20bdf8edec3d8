"""One estimate, start to end: bind cost, measure and preconditioner to an anchor, then sample.

``Problem`` holds everything that depends on (model, X, parameters) but not on which directions
are drawn; ``estimate_directions`` runs a block of direction indices through
sampling → radius search → radial integral and returns per-direction records. The estimator
(the scikit-learn face) only orchestrates these two.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ._evaluate import FunctionalModel, choose_batch_size
from ._math import log_sphere_area
from ._radius import find_radii
from ._sampling import draw_directions
from .costs import make_cost
from .measures import MeasureContext
from .preconditioners import PreconditionerContext

__all__ = ["Problem", "prepare_problem", "estimate_directions", "find_flat_coordinates"]

MAX_RADIUS_FACTOR = 1e8  # rays still below the cutoff at 1e8·max(1, |θ|) never cross


@dataclass
class Problem:
    evaluator: FunctionalModel
    cost: object
    anchor_cost: float
    cutoff: float
    rtol: float
    measure: object  # bound measure
    is_probability: bool
    preconditioner: object  # bound preconditioner
    mask: torch.Tensor  # (n,) bool, active coordinates
    flat: np.ndarray  # flat coordinate indices
    max_radius: float
    batch_size: int

    @property
    def n_active(self) -> int:
        return int(self.mask.sum())


def _anchor_outputs(evaluator):
    try:
        return evaluator.anchor_outputs()
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"X does not fit the model: the forward pass on X failed ({exc}). Check that X has "
            "the shape and dtype the model expects (for a Pipeline, X before its first step)."
        ) from exc


def find_flat_coordinates(evaluator, cost, anchor_cost, max_individual=4096):
    """Coordinates that cannot change the cost on X (DESIGN §4).

    Candidates are zero columns of the output Jacobian over X (two random cotangents). A
    candidate is kept only if moving it alone, far in both directions, leaves the cost exactly
    at its anchor value, and moving all kept ones together does too.
    """
    probe = evaluator.output_jacobian_probe()
    candidates = torch.nonzero(probe == 0).flatten()
    if candidates.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    theta = evaluator.theta
    step = 10.0 * max(1.0, float(theta.abs().max()))
    if candidates.numel() <= max_individual:
        keep = []
        for chunk in torch.split(candidates, 256):
            rows = torch.arange(chunk.numel())
            for sign in (1.0, -1.0):
                thetas = theta.repeat(chunk.numel(), 1)
                thetas[rows, chunk] += sign * step
                keep.append(evaluator.costs(cost, thetas) == anchor_cost)
        ok = torch.stack([torch.cat(keep[0::2]), torch.cat(keep[1::2])]).all(0)
        candidates = candidates[ok.cpu()]
    if candidates.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    thetas = theta.repeat(2, 1)
    noise = torch.randn(2, candidates.numel(), generator=gen, dtype=torch.float64)
    thetas[:, candidates] += step * noise.to(theta.device)
    if not bool((evaluator.costs(cost, thetas) == anchor_cost).all()):
        return np.zeros(0, dtype=np.int64)
    return candidates.cpu().numpy()


def prepare_problem(
    module,
    X,
    *,
    cost,
    output,
    cutoff,
    rtol,
    measure,
    preconditioner,
    eps,
    exponent,
    device,
    batch_size,
    n_directions,
    y=None,
    attention_mask=None,
    optimizer=None,
    random_state=0,
    forward_kwargs=None,
    evaluator=None,
):
    """Bind everything that does not depend on the directions drawn."""
    if evaluator is None:
        kwargs = dict(forward_kwargs or {})
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        evaluator = FunctionalModel(module, X, device, forward_kwargs=kwargs)
    anchor = _anchor_outputs(evaluator)
    if y is not None:
        y = y.to(evaluator.device)
    mask = attention_mask.to(evaluator.device) if attention_mask is not None else None
    cost_fn = make_cost(cost, anchor, output=output, y=y, mask=mask)
    with torch.no_grad():
        anchor_cost = float(cost_fn(anchor))
    if not np.isfinite(anchor_cost):
        raise ValueError(f"the cost at the anchor is {anchor_cost}; it must be finite")
    if anchor_cost >= cutoff:
        raise ValueError(
            f"cutoff={cutoff} is not above the cost at the anchor ({anchor_cost}); the "
            "neighbourhood is empty. Use a larger cutoff."
        )

    n = evaluator.space.n
    flat = find_flat_coordinates(evaluator, cost_fn, anchor_cost)
    full = torch.ones(n, dtype=torch.bool, device=evaluator.device)
    if flat.size and measure.is_probability:
        # S = S' × R^f and the flat coordinates' marginal mass is 1: integrate them out exactly
        active = full.clone()
        active[torch.as_tensor(flat, device=evaluator.device)] = False
    else:
        active = full
    if int(active.sum()) == 0:
        raise ValueError(
            "no parameter changes the model's outputs on X (every coordinate is flat); the "
            "neighbourhood is the whole space"
        )
    bound_measure = measure.bind(
        MeasureContext(evaluator.theta, active, evaluator.space, evaluator.module)
    )
    pctx = PreconditionerContext(
        evaluator=evaluator,
        cost=cost_fn,
        mask=active,
        eps=eps,
        exponent=exponent,
        user_module=module,
        optimizer=optimizer,
        cost_name=cost,
        output=output,
        y=y,
        random_state=random_state,
    )
    bound_preconditioner = preconditioner.bind(pctx)
    if batch_size is None:
        batch_size = choose_batch_size(evaluator, n_directions)
    max_radius = MAX_RADIUS_FACTOR * max(1.0, float(torch.linalg.vector_norm(evaluator.theta)))
    return Problem(
        evaluator=evaluator,
        cost=cost_fn,
        anchor_cost=anchor_cost,
        cutoff=float(cutoff),
        rtol=float(rtol),
        measure=bound_measure,
        is_probability=bool(measure.is_probability),
        preconditioner=bound_preconditioner,
        mask=active,
        flat=flat,
        max_radius=max_radius,
        batch_size=int(batch_size),
    )


def estimate_directions(problem: Problem, indices, seed: int, progress=None) -> dict:
    """Per-direction records for the direction indices ``indices`` (a block of ints)."""
    ev = problem.evaluator
    n_act = problem.n_active
    log_area = log_sphere_area(n_act)
    theta = ev.theta
    cols = torch.nonzero(problem.mask).flatten()
    every_active = cols.numel() == theta.numel()
    out = {k: [] for k in ("index", "log_volume", "radius", "cost_at_radius", "log_weight",
                           "log_radial_integral", "evaluations", "status")}
    indices = np.asarray(list(indices), dtype=np.int64)
    for start in range(0, indices.size, problem.batch_size):
        block = indices[start : start + problem.batch_size]
        U_act, log_w = draw_directions(n_act, block, seed, problem.preconditioner, ev.device)
        coef = problem.measure.ray_coefficients(U_act)
        limit = np.minimum(problem.measure.search_limit(coef, block.size), problem.max_radius)
        if every_active:
            U = U_act
        else:
            U = torch.zeros(block.size, theta.numel(), dtype=torch.float64, device=ev.device)
            U[:, cols] = U_act

        def evaluate(pos, r, U=U):
            pos_t = torch.as_tensor(pos, device=ev.device)
            r_t = torch.as_tensor(r, dtype=torch.float64, device=ev.device)
            return ev.costs(problem.cost, theta + r_t[:, None] * U[pos_t]).cpu().numpy()

        def taylor(U=U):
            return tuple(t.cpu().numpy() for t in ev.ray_taylor(problem.cost, U))

        res = find_radii(
            evaluate, taylor, limit, problem.cutoff, problem.rtol, anchor_cost=problem.anchor_cost
        )
        log_I = problem.measure.log_radial_integral(coef, res.radii)
        out["index"].append(block)
        out["log_volume"].append(log_area + log_I + log_w)
        out["radius"].append(res.radii)
        out["cost_at_radius"].append(res.costs)
        out["log_weight"].append(log_w)
        out["log_radial_integral"].append(log_I)
        out["evaluations"].append(res.evaluations)
        out["status"].append(res.status)
        if progress is not None:
            progress.update(block.size)
    records = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    n_iter = int((records["status"] == 3).sum())
    if n_iter:
        warnings.warn(
            f"{n_iter} direction(s) did not reach rtol within the iteration limit; their radius "
            "is the bracket's midpoint",
            RuntimeWarning,
            stacklevel=3,
        )
    return records
