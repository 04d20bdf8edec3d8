"""The anchored problem: the model's parameters, the bound cost, measure and preconditioner.

:func:`prepare_problem` binds everything that depends on (model, X, the estimator's settings)
but not on which directions are drawn, and returns a :class:`Problem`. It also finds the exactly
flat coordinates — parameters that cannot change the outputs on X — which make the Lebesgue
volume infinite and are integrated out exactly under a prior (the neighbourhood is S' × R^f and
the flat coordinates' marginal prior mass is 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._coordinates import FlatCoordinates
from ._evaluate import FORWARD_AD_LOCK, BatchedCost, FunctionalModel, choose_batch_size
from ._evaluate_large import make_evaluator
from ._measure_sums import rms
from ._sampling import resolve_generator
from .costs import BoundCost, Cost, resolve_cost, resolve_output
from .measures import MeasureContext
from .preconditioners import BoundPreconditioner, PreconditionerContext

__all__ = ["Problem", "prepare_problem", "find_flat_coordinates", "mask_runs", "bind_cost"]

MAX_RADIUS_FACTOR = 1e8  # rays still below the cutoff at 1e8·max(1, |θ|) never cross
FLAT_TOLERANCE = 1e-6  # a coordinate moved 10·max|θ| that changes the cost < 1e-6·cutoff is flat


@dataclass
class Problem:
    """Everything one estimate needs that does not depend on the directions drawn.

    Attributes
    ----------
    evaluator : FunctionalModel
        The private eval-mode copy of the model with the data.
    cost : BoundCost or BatchedCost
        The cost bound to the anchor (a weighted sum over data batches when X is batched).
    curvature : tuple or None
        ``(transform, reduce)`` of the one-JVP Taylor guess (see ``BoundCost.taylor``), or
        None: nested JVPs.
    anchor_cost : float
        The cost at the anchor (0 for "kl" and "mse").
    cutoff, rtol : float
    measure : object
        The bound measure (``ray_coefficients``, ``search_limit``, ``log_radial_integral``).
    is_probability : bool
        Whether the measure is a probability measure (a prior) rather than Lebesgue.
    preconditioner : BoundPreconditioner
    mask : torch.Tensor
        (n,) bool: the coordinates directions move in (flat ones integrated out are False).
    flat : volsk.results.FlatCoordinates
        The flat coordinates.
    max_radius : float
    batch_size : int
        Directions per batched evaluation.
    generator : {"host", "device"}
        Where every stage's direction normals come from (``volsk._sampling.NormalStream``).
    """

    evaluator: FunctionalModel
    cost: BoundCost | BatchedCost
    curvature: tuple | None
    anchor_cost: float
    cutoff: float
    rtol: float
    measure: object
    is_probability: bool
    preconditioner: BoundPreconditioner
    mask: torch.Tensor
    flat: FlatCoordinates
    max_radius: float
    batch_size: int
    generator: str = "host"

    @property
    def n_active(self) -> int:
        return int(torch.count_nonzero(self.mask))  # mask.sum() would copy it to int64


def _anchor_outputs(evaluator, batch=None):
    try:
        return evaluator.anchor_outputs(batch)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"X does not fit the model: the forward pass on X failed ({exc}). Check that X has "
            "the shape and dtype the model expects (for a Pipeline, X before its first step)."
        ) from exc


FLAT_CHUNK = 1 << 18  # coordinates of the output-Jacobian probe scanned at a time


def _zero_columns(probe: torch.Tensor) -> torch.Tensor:
    """The sorted indices where ``probe`` is 0, on the CPU: int32 when they fit, built a
    chunk at a time (a language model's unused embedding rows are millions of candidates:
    never an int64 per coordinate of the model, nor a second copy)."""
    n = probe.numel()
    dtype = torch.int32 if n < 2**31 else torch.int64
    counts = [int((probe[s : s + FLAT_CHUNK] == 0).sum()) for s in range(0, n, FLAT_CHUNK)]
    out = torch.empty(sum(counts), dtype=dtype)
    at = 0
    for s, count in zip(range(0, n, FLAT_CHUNK), counts):
        if count:
            idx = torch.nonzero(probe[s : s + FLAT_CHUNK] == 0).flatten() + s
            out[at : at + count] = idx.to(dtype).cpu()
            at += count
    return out


def mask_runs(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The True entries of a bool vector as sorted runs [starts[j], stops[j]) (int64), read a
    chunk at a time.

    Examples
    --------
    >>> import torch
    >>> from volsk._problem import mask_runs
    >>> mask_runs(torch.tensor([True, True, False, True, False, False, True]))
    (array([0, 3, 6]), array([2, 4, 7]))
    """
    starts, stops, previous = [], [], False
    n = mask.numel()
    for s in range(0, n, FLAT_CHUNK):
        chunk = mask[s : s + FLAT_CHUNK].cpu().numpy()
        before = np.empty(chunk.size, dtype=bool)
        before[0], before[1:] = previous, chunk[:-1]
        change = np.flatnonzero(chunk != before)
        starts.append(s + change[chunk[change]])
        stops.append(s + change[~chunk[change]])
        previous = bool(chunk[-1])
    if previous:
        stops.append(np.array([n]))
    return (np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64),
            np.concatenate(stops).astype(np.int64) if stops else np.zeros(0, np.int64))


def find_flat_coordinates(evaluator, cost, anchor_cost, tolerance=0.0) -> torch.Tensor:
    """Coordinates that cannot change the cost on X, as a bool (n,) mask on the device.

    Candidates are zero columns of the output Jacobian over X (two random cotangents; masked
    tokens do not count). A set of candidates is confirmed when moving all of them together,
    far and at random (two draws), leaves the cost within ``tolerance`` of its anchor value
    (rounding: a coordinate that is flat in exact arithmetic, like a bias a softmax ignores,
    may still move the cost by ~1e-10); a set that fails is split in halves (group testing),
    so the usual case — all candidates flat — costs two evaluations. Groups flat on their own
    are then merged greedily, keeping only those that stay flat together.

    The candidates are held once, sorted (int32 when n < 2³¹); a group is a range of them, so
    no test copies an index set.
    """
    probe = evaluator.output_jacobian_probe()
    candidates = _zero_columns(probe)
    del probe
    flat = torch.zeros(evaluator.space.n, dtype=torch.bool, device=evaluator.device)
    if candidates.numel() == 0:
        return flat
    theta = evaluator.theta
    step = 10.0 * max(1.0, float(theta.abs().max()))  # (max is exact in any dtype)
    gen = torch.Generator().manual_seed(0)  # a fixed probe: it decides nothing random

    def all_flat(ranges):
        parts = [candidates[lo:hi] for lo, hi in ranges]
        if hasattr(evaluator, "moved_costs"):  # the large-model evaluator: one copy of θ
            moved = evaluator.moved_costs(cost, parts, step, gen, draws=2)
        else:
            group = torch.cat(parts).long()
            noise = torch.randn(2, group.numel(), generator=gen, dtype=torch.float64)
            thetas = theta.repeat(2, 1)
            thetas[:, group.to(theta.device)] += step * noise.to(theta.device)
            moved = evaluator.costs(cost, thetas)
        return bool(((moved - anchor_cost).abs() <= tolerance).all())

    groups, pending = [], [(0, candidates.numel())]
    while pending:
        lo, hi = pending.pop()
        if all_flat([(lo, hi)]):
            groups.append((lo, hi))
        elif hi - lo > 1:
            mid = (lo + hi) // 2
            pending += [(lo, mid), (mid, hi)]
    if not groups:
        return flat
    groups.sort()
    found = groups
    if len(groups) > 1 and not all_flat(groups):
        # flat one by one need not mean flat together (two weights into one dead unit)
        found = groups[:1]
        for group in groups[1:]:
            if all_flat(found + [group]):
                found = found + [group]
    for lo, hi in found:
        for s in range(lo, hi, FLAT_CHUNK):
            flat[candidates[s : min(hi, s + FLAT_CHUNK)].to(flat.device).long()] = True
    return flat


def bind_cost(evaluator, cost: Cost, output, batch_y):
    """The cost bound to the anchor on every data batch, and its one-JVP Taylor curvature.

    ``output`` None: read from the outputs' shape (see :func:`volsk.costs.resolve_output`).
    Returns ``(cost, curvature)``: a :class:`~volsk.costs.BoundCost` (one data batch) or a
    :class:`BatchedCost` (the mean over batches, each weighted by its share of the cost's
    terms), and ``(transform, reduce)`` or None.
    """
    parts, sizes, masses, reduces = [], [], [], []
    transform = None
    for b, batch in enumerate(evaluator.batches):
        anchor = _anchor_outputs(evaluator, b)
        if anchor.ndim == 0 or anchor.shape[0] != batch.n:
            raise ValueError(
                f"the model returned outputs of shape {tuple(anchor.shape)} for X with "
                f"{batch.n} examples: volsk needs one output row per example (X's first axis "
                "indexes examples). A 1-D X of shape (F,) is read as F examples; for one "
                "example pass X.reshape(1, -1)."
            )
        output = resolve_output(cost, anchor, output)
        y = batch_y[b]
        if y is not None:
            y = y.to(evaluator.device)
        part = cost.bind(anchor, output=output, y=y, mask=batch.token_mask())
        parts.append(part)
        sizes.append(int(anchor.shape[0]))
        masses.append(part.n_terms(batch.n))
        curvature = part.taylor()
        if curvature is not None:
            transform = curvature[0]
            reduces.append(curvature[1])
    if len(parts) == 1:
        return parts[0], (None if transform is None else (transform, reduces[0]))
    total = sum(masses)
    weights = [m / total for m in masses]
    batched = BatchedCost(parts, weights, sizes)
    if transform is None:
        return batched, None
    weighted = [lambda t, r=r, w=w: w * r(t) for r, w in zip(reduces, weights)]
    return batched, (transform, weighted)


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
    data_batch_size=None,
    batches=None,
    batch_y=None,
    evaluation="auto",
    generator="host",
) -> Problem:
    """Bind everything that does not depend on the directions drawn.

    ``cost`` is a name, a callable or a :class:`~volsk.costs.Cost`; ``measure`` and
    ``preconditioner`` are unbound objects (see ``resolve_measure``,
    ``resolve_preconditioner``). ``batches``/``batch_y``: data already split (a DataLoader's
    batches and their labels); otherwise X (and y, attention_mask) are split into
    ``data_batch_size`` examples. ``evaluation``: "auto", "vmap" or "large" (see
    ``volsk._evaluate_large.make_evaluator``). ``generator``: "host", "device" or "auto"
    (resolved from the evaluator's device: ``volsk._sampling.resolve_generator``).
    """
    spec = resolve_cost(cost)
    if evaluator is None:
        kwargs = dict(forward_kwargs or {})
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        evaluator = make_evaluator(module, X, device, evaluation=evaluation,
                                   forward_kwargs=kwargs, data_batch_size=data_batch_size,
                                   batches=batches)
    streamed = getattr(evaluator, "streams_directions", False)
    if batch_y is None:
        sizes = [b.n for b in evaluator.batches]
        batch_y = [None] * len(sizes) if y is None else list(torch.split(y, sizes))
    cost_fn, curvature = bind_cost(evaluator, spec, output, batch_y)
    with torch.no_grad():
        anchor_cost = float(evaluator.costs(cost_fn, evaluator.theta[None])[0])
    if not np.isfinite(anchor_cost):
        raise ValueError(f"the cost at the anchor is {anchor_cost}; it must be finite")
    if anchor_cost >= cutoff:
        raise ValueError(
            f"cutoff={cutoff} is not above the cost at the anchor ({anchor_cost}); the "
            "neighbourhood is empty. Use a larger cutoff."
        )

    n = evaluator.space.n
    flat = find_flat_coordinates(evaluator, cost_fn, anchor_cost,
                                 tolerance=FLAT_TOLERANCE * float(cutoff))
    # runs of coordinates, not one int64 each (a language model's unused embedding rows)
    flat_runs = FlatCoordinates.from_runs(evaluator.space.names, evaluator.space.shapes,
                                          *mask_runs(flat))
    if len(flat_runs) and measure.is_probability:
        # S = S' × R^f and the flat coordinates' marginal mass is 1: integrate them out exactly
        active = flat.logical_not_()  # in place: one bool vector
    else:
        del flat
        active = torch.ones(n, dtype=torch.bool, device=evaluator.device)
    if not bool(active.any()):
        raise ValueError(
            "no parameter changes the model's outputs on X (every coordinate is flat); the "
            "neighbourhood is the whole space"
        )
    bound_measure = measure.bind(
        MeasureContext(evaluator.theta, active, evaluator.space, evaluator.module,
                       streamed=streamed)
    )
    pctx = PreconditionerContext(
        evaluator=evaluator,
        cost=cost_fn,
        mask=active,
        eps=eps,
        exponent=exponent,
        user_module=module,
        optimizer=optimizer,
        random_state=random_state,
    )
    with FORWARD_AD_LOCK:  # curvature may use JVPs (not thread-safe in torch)
        bound_preconditioner = preconditioner.bind(pctx)
    if streamed:
        batch_size = 1  # one direction per forward pass
    elif batch_size is None:
        batch_size = choose_batch_size(evaluator, n_directions)
    norm = rms(evaluator.theta) * math.sqrt(n) if streamed else float(
        torch.linalg.vector_norm(evaluator.theta))
    max_radius = MAX_RADIUS_FACTOR * max(1.0, norm)
    return Problem(
        evaluator=evaluator,
        cost=cost_fn,
        curvature=curvature,
        anchor_cost=anchor_cost,
        cutoff=float(cutoff),
        rtol=float(rtol),
        measure=bound_measure,
        is_probability=bool(measure.is_probability),
        preconditioner=bound_preconditioner,
        mask=active,
        flat=flat_runs,
        max_radius=max_radius,
        batch_size=int(batch_size),
        generator=resolve_generator(generator, evaluator.device),
    )
