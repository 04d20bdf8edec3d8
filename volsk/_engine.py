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

from ._evaluate import FORWARD_AD_LOCK, BatchedCost, FunctionalModel, choose_batch_size
from ._math import log_sphere_area
from ._radius import find_radii
from ._sampling import draw_directions
from .costs import make_cost
from .measures import MeasureContext
from .preconditioners import PreconditionerContext

__all__ = [
    "Problem",
    "SearchStart",
    "prepare_problem",
    "estimate_directions",
    "calibrate_search",
    "TAYLOR_START",
    "find_flat_coordinates",
]

MAX_RADIUS_FACTOR = 1e8  # rays still below the cutoff at 1e8·max(1, |θ|) never cross
BLOCK_BYTES = 64 << 20  # directions drawn together: their float64 matrix stays under 64 MiB
MAX_BLOCK = 1024
FLAT_TOLERANCE = 1e-6  # a coordinate moved 10·max|θ| that changes the cost < 1e-6·cutoff is flat
SEARCH_PILOT = 8  # directions of the search pilot (calibrate_search)
PILOT_RTOL = 1e-2  # the pilot's radii need not be precise
SEARCH_PILOT_STREAM = 0x726164697573  # "radius": the search pilot's own seed stream
SETUP_ROWS = 64  # directions drawn and reduced together (their float64 rows stay in cache)
SLOPE_STEP = 1.2  # the pilot measures the log–log growth at R / SLOPE_STEP, R, SLOPE_STEP·R


@dataclass
class Problem:
    evaluator: FunctionalModel
    cost: object
    curvature: object  # (transform, reduce) for the one-JVP Taylor guess, or None
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


def _anchor_outputs(evaluator, batch=None):
    try:
        return evaluator.anchor_outputs(batch)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"X does not fit the model: the forward pass on X failed ({exc}). Check that X has "
            "the shape and dtype the model expects (for a Pipeline, X before its first step)."
        ) from exc


def find_flat_coordinates(evaluator, cost, anchor_cost, tolerance=0.0):
    """Coordinates that cannot change the cost on X (DESIGN §4).

    Candidates are zero columns of the output Jacobian over X (two random cotangents; masked
    tokens do not count). A set of candidates is confirmed when moving all of them together,
    far and at random (two draws), leaves the cost within ``tolerance`` of its anchor value
    (rounding: a coordinate that is flat in exact arithmetic, like a bias a softmax ignores,
    may still move the cost by ~1e-10); a set that fails is split in halves (group testing),
    so the usual case — all candidates flat — costs two evaluations. Groups flat on their own
    are then merged greedily, keeping only those that stay flat together.
    """
    probe = evaluator.output_jacobian_probe()
    candidates = torch.nonzero(probe == 0).flatten().cpu()
    if candidates.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    theta = evaluator.theta
    step = 10.0 * max(1.0, float(theta.abs().max()))
    gen = torch.Generator().manual_seed(0)

    def all_flat(group):
        thetas = theta.repeat(2, 1)
        noise = torch.randn(2, group.numel(), generator=gen, dtype=torch.float64)
        thetas[:, group.to(theta.device)] += step * noise.to(theta.device)
        change = (evaluator.costs(cost, thetas) - anchor_cost).abs()
        return bool((change <= tolerance).all())

    groups, pending = [], [candidates]
    while pending:
        group = pending.pop()
        if all_flat(group):
            groups.append(group)
        elif group.numel() > 1:
            half = group.numel() // 2
            pending += [group[:half], group[half:]]
    if not groups:
        return np.zeros(0, dtype=np.int64)
    found = torch.cat(groups)
    if len(groups) > 1 and not all_flat(found):
        # flat one by one need not mean flat together (two weights into one dead unit)
        found = groups[0]
        for group in groups[1:]:
            trial = torch.cat([found, group])
            if all_flat(trial):
                found = trial
    return np.sort(found.numpy())


def _masked_mean(values, mask):
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def _anchor_curvature(cost, anchor, output, mask):
    """Second directional derivative at the anchor as a quadratic form in one JVP's tangent.

    KL(p₀ ‖ p): value and slope are 0 at the anchor and d²/dr² = Σ_v p₀ (d log p_v/dr)²
    (because Σ_v d²p_v = 0). MSE: d²/dr² = 2·mean (d f/dr)². Other costs use nested JVPs.
    """
    from .costs import to_log_probs

    if cost == "kl" and output == "logits":
        # d log p/dr = t − ⟨p, t⟩ for logit tangents t: the curvature is p₀'s variance of t
        p0 = torch.softmax(anchor.detach(), -1)

        def reduce_logits(t):
            mean = (p0 * t).sum(-1, keepdim=True)
            return _masked_mean((p0 * (t - mean) ** 2).sum(-1), mask)

        return (lambda out: out), reduce_logits
    if cost == "kl":
        log_p0 = to_log_probs(anchor, output).detach()
        p0 = log_p0.exp()

        def transform(out):
            return to_log_probs(out, output)

        def reduce(t):
            terms = torch.where(p0 > 0, p0 * t * t, torch.zeros_like(t))
            return _masked_mean(terms.sum(-1), mask)

        return transform, reduce
    if cost == "mse":
        return (lambda out: out), (lambda t: 2.0 * (t * t).mean())
    return None


def _bind_cost(evaluator, cost, output, batch_y):
    """The cost (a callable, or a BatchedCost over data batches) and its anchor curvature."""
    parts, sizes, masses, reduces = [], [], [], []
    transform = None
    for b, batch in enumerate(evaluator.batches):
        anchor = _anchor_outputs(evaluator, b)
        mask = batch.token_mask()
        y = batch_y[b]
        if y is not None:
            y = y.to(evaluator.device)
        parts.append(make_cost(cost, anchor, output=output, y=y, mask=mask))
        sizes.append(int(anchor.shape[0]))
        # the cost is a mean over examples, or over unmasked tokens when a mask is used
        masses.append(float(mask.sum()) if mask is not None and cost != "mse" else batch.n)
        curvature = _anchor_curvature(cost, anchor, output, mask)
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
):
    """Bind everything that does not depend on the directions drawn.

    ``batches``/``batch_y``: data already split (a DataLoader's batches and their labels);
    otherwise X (and y, attention_mask) are split into ``data_batch_size`` examples.
    """
    if evaluator is None:
        kwargs = dict(forward_kwargs or {})
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        evaluator = FunctionalModel(module, X, device, forward_kwargs=kwargs,
                                    data_batch_size=data_batch_size, batches=batches)
    if batch_y is None:
        sizes = [b.n for b in evaluator.batches]
        batch_y = [None] * len(sizes) if y is None else list(torch.split(y, sizes))
    cost_fn, curvature = _bind_cost(evaluator, cost, output, batch_y)
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
    with FORWARD_AD_LOCK:  # curvature may use JVPs (not thread-safe in torch)
        bound_preconditioner = preconditioner.bind(pctx)
    if batch_size is None:
        batch_size = choose_batch_size(evaluator, n_directions)
    max_radius = MAX_RADIUS_FACTOR * max(1.0, float(torch.linalg.vector_norm(evaluator.theta)))
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
        flat=flat,
        max_radius=max_radius,
        batch_size=int(batch_size),
    )


@dataclass(frozen=True)
class SearchStart:
    """Where every direction's radius search starts (see :func:`calibrate_search`).

    Attributes
    ----------
    radius : float or None
        The first radius evaluated on every ray; None: start from each ray's Taylor guess.
    slope, bend : float
        The log–log growth of the excess cost around a crossing, log(e/ε) ≈ s·x + ½κ·x² in
        x = log(r/R), assumed for a step from one measured point.
    evaluations : int
        Cost evaluations the pilot spent (its JVPs counted as one each).
    """

    radius: float | None
    slope: float
    bend: float
    evaluations: int


TAYLOR_START = SearchStart(None, 2.0, 0.0, 0)  # every search from its own Taylor guess, no pilot


def calibrate_search(problem: Problem, seed: int) -> SearchStart:
    """A small pilot that tells the radius search where to start and how the cost grows.

    ``SEARCH_PILOT`` directions from a seed stream of their own are searched (to rtol 1e-2)
    from their Taylor guess (one JVP each), and the cost is measured once more on each side
    of each radius, at R / ``SLOPE_STEP`` and ``SLOPE_STEP`` · R. Every direction of the
    estimate then starts at the pilot's median radius, and a step from a single measured
    point assumes the pilot's median growth around the crossing,
    log(e/target) ≈ s·x + ½κ·x² in x = log(r/R) (e the excess cost over the anchor's).

    Why not each ray's own Taylor guess: on the digits MLP at rtol 1e-3 the pilot's start
    needs fewer evaluations (3.0 against 3.7 per direction without preconditioner, 3.0
    against 5.9 with the full-Hessian one), each of them cheaper than the JVP (which costs
    about two batched evaluations). Near the crossing the cost is not quadratic — its log–log
    slope is about 2.1 naively, 2.8 with a diagonal and 4.3 with the full-Hessian
    preconditioner — so a measured point near the crossing predicts it better than the
    curvature at the anchor.

    The pilot depends only on the problem and ``seed`` (not on which directions are drawn,
    how they are batched or split over workers), so every direction's result stays a pure
    function of (seed, index). When no pilot ray crosses, every ray starts from its own
    Taylor guess (``radius=None``).
    """
    state = np.random.SeedSequence([int(seed), SEARCH_PILOT_STREAM]).generate_state(1)
    # radii to 1 %: the growth is measured at the cost actually found there
    rec = _search_block(problem, np.arange(SEARCH_PILOT), int(state[0]), start=None,
                        rtol=max(problem.rtol, PILOT_RTOL), integrate=False)
    radii, status = rec["radius"], rec["status"]
    evaluations = int(rec["evaluations"].sum())
    good = np.isfinite(radii) & (radii > 0) & (status == 0)
    if not good.any():
        return SearchStart(None, 2.0, 0.0, evaluations)
    radius = float(np.median(radii[good]))
    # the log–log growth of the excess cost around each pilot crossing
    pos = np.flatnonzero(good)
    log_e = np.log(rec["cost_at_radius"][good] - problem.anchor_cost)
    both = rec["evaluate"](np.concatenate([pos, pos]),  # one batched call for both sides
                           np.concatenate([SLOPE_STEP * radii[good], radii[good] / SLOPE_STEP]))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_up, log_down = np.split(np.log(both - problem.anchor_cost), 2)
    evaluations += 2 * pos.size
    h = np.log(SLOPE_STEP)
    slopes = (log_up - log_down) / (2 * h)
    bends = (log_up - 2 * log_e + log_down) / h**2
    ok = np.isfinite(slopes) & np.isfinite(bends) & (slopes > 0)
    if not ok.any():
        return SearchStart(radius, 2.0, 0.0, evaluations)
    slope = float(np.clip(np.median(slopes[ok]), 0.5, 8.0))
    bend = float(np.clip(np.median(bends[ok]), -slope, slope))
    return SearchStart(radius, slope, bend, evaluations)


def _block_size(problem: Problem, n: int) -> int:
    """Directions drawn together: many (so measure integrals and the search loop are
    vectorised), but their k × n float64 matrix within ``BLOCK_BYTES``."""
    by_memory = max(1, BLOCK_BYTES // (8 * max(1, n)))
    return int(max(problem.batch_size, min(by_memory, MAX_BLOCK)))


def _search_block(problem: Problem, block, seed: int, start: SearchStart | None,
                  rtol: float | None = None, integrate: bool = True) -> dict:
    """Draw the directions ``block`` and find their radii; per-direction records (arrays) and
    ``evaluate``, the block's batched cost (for the pilot's slope). ``integrate=False`` skips
    the radial integrals (the search pilot needs radii only): log-volumes are then NaN."""
    ev = problem.evaluator
    theta = ev.theta
    cols = torch.nonzero(problem.mask).flatten()
    bs = problem.batch_size
    # the directions in the dtype θ + r·u is formed in, zero on flat coordinates; on the CPU
    # drawn, preconditioned and reduced to the measure's coefficients SETUP_ROWS at a time, so
    # that their float64 rows are still in cache for each pass over them (on a GPU at once:
    # each part ends in a copy of its coefficients to the host)
    full = cols.numel() == theta.numel()
    U = (torch.empty if full else torch.zeros)(block.size, theta.numel(), dtype=ev.ray_dtype,
                                              device=ev.device)
    step = SETUP_ROWS if ev.device.type == "cpu" else max(1, block.size)
    coefs, log_ws = [], []
    for first in range(0, block.size, step):
        part = block[first : first + step]
        U_act, log_w = draw_directions(problem.n_active, part, seed, problem.preconditioner,
                                       ev.device)
        coefs.append(problem.measure.ray_coefficients(U_act))
        log_ws.append(log_w)
        if full:
            U[first : first + part.size].copy_(U_act)
        else:
            U[first : first + part.size].index_copy_(1, cols, U_act.to(ev.ray_dtype))
    coef = {key: np.concatenate([c[key] for c in coefs]) for key in coefs[0]}
    log_w = np.concatenate(log_ws)
    limit = np.minimum(problem.measure.search_limit(coef, block.size), problem.max_radius)

    evaluate = ev.ray_costs(problem.cost, U, bs)

    def taylor():
        U64 = U.to(torch.float64)
        chunks = [U64[i : i + bs] for i in range(0, U.shape[0], bs)]
        if problem.curvature is not None:
            g2 = torch.cat([ev.ray_curvature(*problem.curvature, c) for c in chunks])
            g2 = g2.cpu().numpy()
            zeros = np.zeros_like(g2)
            return zeros + problem.anchor_cost, zeros, g2
        parts = [ev.ray_taylor(problem.cost, c) for c in chunks]
        return tuple(torch.cat([p[j] for p in parts]).cpu().numpy() for j in range(3))

    if start is None or start.radius is None:  # the pilot itself, or TAYLOR_START
        res = find_radii(evaluate, taylor, limit, problem.cutoff, rtol or problem.rtol,
                         anchor_cost=problem.anchor_cost)
    else:
        res = find_radii(evaluate, None, limit, problem.cutoff, rtol or problem.rtol,
                         anchor_cost=problem.anchor_cost, start=start.radius,
                         slope=start.slope, bend=start.bend)
    if integrate:
        log_I = problem.measure.log_radial_integral(coef, res.radii)
    else:
        log_I = np.full(block.size, np.nan)
    return {
        "index": block,
        "log_volume": log_sphere_area(problem.n_active) + log_I + log_w,
        "radius": res.radii,
        "cost_at_radius": res.costs,
        "log_weight": log_w,
        "log_radial_integral": log_I,
        "evaluations": res.evaluations,
        "status": res.status,
        "evaluate": evaluate,
    }


def estimate_directions(problem: Problem, indices, seed: int, progress=None,
                        start: SearchStart | None = None) -> dict:
    """Per-direction records for the direction indices ``indices`` (a block of ints).

    ``start`` fixes where every radius search starts: a :func:`calibrate_search` result (None:
    run that pilot here with ``seed``), or ``TAYLOR_START`` (each ray's own Taylor guess; for
    pilots of a few directions, where a search pilot would cost as much as the estimate).
    Directions are drawn in blocks, the radius search runs on a whole block at once and each
    of its evaluations is split into vmapped batches of ``problem.batch_size`` directions.
    """
    out = {k: [] for k in ("index", "log_volume", "radius", "cost_at_radius", "log_weight",
                           "log_radial_integral", "evaluations", "status")}
    indices = np.asarray(list(indices), dtype=np.int64)
    if indices.size == 0:
        return {k: np.zeros(0) for k in out}
    if start is None:
        start = calibrate_search(problem, seed)
    step = _block_size(problem, problem.evaluator.theta.numel())
    for first in range(0, indices.size, step):
        rec = _search_block(problem, indices[first : first + step], seed, start)
        for k in out:
            out[k].append(rec[k])
        if progress is not None:
            progress.update(rec["index"].size)
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
