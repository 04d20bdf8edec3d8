"""The algorithm of one fit, stage by stage: problem → eps pilot → search pilot → directions.

1. :func:`prepare` — what ``fit`` was given (model, X, y) becomes a bound :class:`Problem`.
2. :func:`select_eps` — with ``preconditioner_eps="auto"``, a pilot at each eps of a grid
   (and with ``preconditioner_exponent="auto"``, for each exponent of a grid).
2b. :func:`fit_boundary_map` — with a boundary-fitted preconditioner, pilot rounds that fit
   its correction; the map of the estimate is fixed here. :func:`choose_map` runs stages 2
   and 2b as ``fit`` does, and :func:`bind_map` binds its choice again in another process.
3. :func:`calibrate_search` — the search pilot: where every radius search starts.
4. :func:`run_directions` — direction indices in blocks (split over joblib workers), each
   block drawn, searched for its radii and integrated: per-direction records.

Every stage is a pure function of the problem and the base seed, so direction i's record is
the same whatever the batch size, the number of workers or the order in which blocks run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs

from ._coordinates import FlatCoordinates
from ._inputs import as_input, batches_from_loader, n_examples, resolve_model
from ._math import log_sphere_area
from ._problem import Problem, prepare_problem
from ._radius import find_radii
from ._sampling import draw_block
from ._seeding import (
    BOUNDARY_PILOT_STREAM,
    EPS_PILOT_STREAM,
    SEARCH_PILOT_STREAM,
    child_seed,
    stream_seed,
)
from .preconditioners import EPS_GRID, choose_eps
from .preconditioners.boundary import BoundaryMap, BoundaryStart, fit_boundary
from .preconditioners.selection import (
    DEFAULT_EXPONENT,
    EPS_EXTEND,
    EPS_REFINE,
    EPS_TIE_NATS,
    EXPONENT_GRID,
    PILOT_COLUMNS,
    check_eps_grid,
    check_exponent_grid,
    choose_exponent,
)
from .results import DirectionRecords

__all__ = [
    "Settings",
    "FitResult",
    "SearchStart",
    "TAYLOR_START",
    "prepare",
    "fit",
    "select_eps",
    "fit_boundary_map",
    "MapChoice",
    "choose_map",
    "bind_map",
    "calibrate_search",
    "estimate_directions",
    "run_directions",
    "ProblemSummary",
    "summarise",
]

BLOCK_BYTES = 64 << 20  # directions drawn together: their float64 matrix stays under 64 MiB
MAX_BLOCK = 1024
SEARCH_PILOT = 8  # directions of the search pilot (calibrate_search)
PILOT_RTOL = 1e-2  # the pilot's radii need not be precise
SLOPE_STEP = 1.2  # the pilot measures the log–log growth at R / SLOPE_STEP, R, SLOPE_STEP·R
EPS_PILOT_DIRECTIONS = 8  # directions of the eps pilot per eps tried (at most n_samples)


# --------------------------------------------------------------------------- 1. the problem


@dataclass(frozen=True)
class Settings:
    """The estimator's settings a problem is bound with (measure and preconditioner unbound).

    Attributes
    ----------
    cost : str, callable or volsk.costs.Cost
    output : str
        "auto" (from the model), "logits", "probabilities" or "log_probabilities".
    cutoff, rtol : float
    measure : volsk.measures object
    preconditioner : volsk.preconditioners object
    exponent : float or "auto"
        "auto": the problem is bound with :data:`DEFAULT_EXPONENT` and :func:`fit` chooses.
    device : torch.device
    batch_size, data_batch_size : int or None
    evaluation : {"auto", "vmap", "large"}
        The evaluator (see ``volsk._evaluate_large.make_evaluator``).
    generator : {"host", "device", "auto"}
        The direction generator (see ``volsk._sampling``); "auto" is resolved from the
        device when the problem is bound.
    """

    cost: object
    output: str
    cutoff: float
    rtol: float
    measure: object
    preconditioner: object
    exponent: float | str
    device: torch.device
    batch_size: int | None = None
    data_batch_size: int | None = None
    evaluation: str = "auto"
    generator: str = "host"


def prepare(model, X, y, settings: Settings, *, eps, n_directions, seed, optimizer=None,
            attention_mask=None) -> Problem:
    """Stage 1: resolve what ``fit`` was given and bind the problem (with this ``eps``)."""
    batches = batch_y = None
    if isinstance(X, torch.utils.data.DataLoader):
        if y is not None or attention_mask is not None:
            raise ValueError(
                "X is a DataLoader: its batches carry the labels and masks; pass y=None "
                "and attention_mask=None"
            )
        batches, batch_y = batches_from_loader(X)
        X = None
    resolved = resolve_model(model, X)
    X = as_input(resolved.X) if batches is None else None
    output = resolved.output if settings.output == "auto" else settings.output
    if y is not None:
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if y.shape[0] != n_examples(X):
            raise ValueError(f"y has {y.shape[0]} entries but X has {n_examples(X)} examples")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(np.asarray(attention_mask))
    optimizer = optimizer if optimizer is not None else resolved.optimizer
    return prepare_problem(
        resolved.module,
        X,
        cost=settings.cost,
        output=output,
        cutoff=settings.cutoff,
        rtol=settings.rtol,
        measure=settings.measure,
        preconditioner=settings.preconditioner,
        eps=eps,
        exponent=DEFAULT_EXPONENT if isinstance(settings.exponent, str) else settings.exponent,
        device=settings.device,
        batch_size=settings.batch_size,
        n_directions=n_directions,
        y=y,
        attention_mask=attention_mask,
        optimizer=optimizer,
        random_state=seed,
        data_batch_size=settings.data_batch_size,
        batches=batches,
        batch_y=batch_y,
        evaluation=settings.evaluation,
        generator=settings.generator,
    )


# --------------------------------------------------------------- 3–4. search and directions


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


def _search_block(problem: Problem, block, seed: int, start: SearchStart | None,
                  rtol: float | None = None, integrate: bool = True):
    """Draw the directions ``block`` and find their radii.

    Returns the block's :class:`DirectionRecords` and ``evaluate``, its batched cost (for the
    search pilot's slope). ``integrate=False`` skips the radial integrals (the search pilot
    needs radii only): log-volumes are then NaN.
    """
    ev = problem.evaluator
    if getattr(ev, "streams_directions", False):
        # the large-model evaluator: one direction at a time, generated into its one
        # direction buffer and searched to the end before the next (never a (B, n) matrix)
        streamed = ev.stream_directions(block, seed, mask=problem.mask,
                                        preconditioner=problem.preconditioner,
                                        measure=problem.measure, generator=problem.generator)
        parts = [_search(problem, block[j : j + 1], streamed.block(j), start, rtol, integrate)[0]
                 for j in range(block.size)]
        return DirectionRecords.concatenate(parts), ev.ray_costs(problem.cost, streamed)
    directions = draw_block(block, seed, mask=problem.mask,
                            preconditioner=problem.preconditioner, measure=problem.measure,
                            dtype=ev.ray_dtype, device=ev.device,
                            generator=problem.generator)
    return _search(problem, block, directions, start, rtol, integrate)


def _search(problem: Problem, block, directions, start, rtol, integrate):
    """The radius search and records of the drawn ``directions`` (a DirectionBlock whose U
    is a (B, n) tensor or the large-model evaluator's streamed directions)."""
    ev = problem.evaluator
    bs = problem.batch_size
    U, coef, log_w = directions.U, directions.coefficients, directions.log_weights
    limit = np.minimum(problem.measure.search_limit(coef, block.size), problem.max_radius)

    evaluate = ev.ray_costs(problem.cost, U, bs)

    def taylor():
        U64 = U.to(torch.float64) if isinstance(U, torch.Tensor) else U
        chunks = [U64[i : i + bs] for i in range(0, len(U), bs)]
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
    records = DirectionRecords(
        direction=block,
        log_volume=log_sphere_area(problem.n_active) + log_I + log_w,
        radius=res.radii,
        cost_at_radius=res.costs,
        log_weight=log_w,
        log_radial_integral=log_I,
        evaluations=res.evaluations,
        status=res.status,
    )
    return records, evaluate


def calibrate_search(problem: Problem, seed: int) -> SearchStart:
    """Stage 3: a small pilot that tells the radius search where to start and how the cost
    grows.

    ``SEARCH_PILOT`` directions from a seed stream of their own are searched (to rtol 1e-2)
    from their Taylor guess (one JVP each), and the cost is measured once more on each side
    of each radius, at R / ``SLOPE_STEP`` and ``SLOPE_STEP`` · R. Every direction of the
    estimate then starts at the pilot's median radius, and a step from a single measured
    point assumes the pilot's median growth around the crossing,
    log(e/target) ≈ s·x + ½κ·x² in x = log(r/R) (e the excess cost over the anchor's).

    Why not each ray's own Taylor guess: near the crossing the cost is not quadratic (its
    log–log slope grows with a better preconditioner), so a measured point near the crossing
    predicts it better than the curvature at the anchor, and each evaluation is cheaper than
    the JVP (``benchmarks/radius_search.py`` measures both).

    The pilot depends only on the problem and ``seed`` (not on which directions are drawn,
    how they are batched or split over workers), so every direction's result stays a pure
    function of (seed, index). When no pilot ray crosses, every ray starts from its own
    Taylor guess (``radius=None``).
    """
    # radii to 1 %: the growth is measured at the cost actually found there
    rec, evaluate = _search_block(problem, np.arange(SEARCH_PILOT),
                                  stream_seed(seed, SEARCH_PILOT_STREAM), start=None,
                                  rtol=max(problem.rtol, PILOT_RTOL), integrate=False)
    radii, status = rec.radius, rec.status
    evaluations = int(rec.evaluations.sum())
    good = np.isfinite(radii) & (radii > 0) & (status == 0)
    if not good.any():
        return SearchStart(None, 2.0, 0.0, evaluations)
    radius = float(np.median(radii[good]))
    # the log–log growth of the excess cost around each pilot crossing
    pos = np.flatnonzero(good)
    log_e = np.log(rec.cost_at_radius[good] - problem.anchor_cost)
    both = evaluate(np.concatenate([pos, pos]),  # one batched call for both sides
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


def estimate_directions(problem: Problem, indices, seed: int, progress=None,
                        start: SearchStart | None = None) -> DirectionRecords:
    """Per-direction records for the direction indices ``indices`` (a block of ints).

    ``start`` fixes where every radius search starts: a :func:`calibrate_search` result (None:
    run that pilot here with ``seed``), or ``TAYLOR_START`` (each ray's own Taylor guess; for
    pilots of a few directions, where a search pilot would cost as much as the estimate).
    Directions are drawn in blocks, the radius search runs on a whole block at once and each
    of its evaluations is split into vmapped batches of ``problem.batch_size`` directions.
    """
    indices = np.asarray(list(indices), dtype=np.int64)
    if indices.size == 0:
        return DirectionRecords.empty()
    if start is None:
        start = calibrate_search(problem, seed)
    step = _block_size(problem, problem.evaluator.theta.numel())
    parts = []
    for first in range(0, indices.size, step):
        rec, _ = _search_block(problem, indices[first : first + step], seed, start)
        parts.append(rec)
        if progress is not None:
            progress.update(len(rec))
    records = DirectionRecords.concatenate(parts)
    n_iter = int((records.status == 3).sum())
    if n_iter:
        warnings.warn(
            f"{n_iter} direction(s) did not reach rtol within the iteration limit; their radius "
            "is the bracket's midpoint",
            RuntimeWarning,
            stacklevel=3,
        )
    return records


def run_directions(problem: Problem, indices, seed: int, start: SearchStart, *, n_jobs=None,
                   progress=None) -> DirectionRecords:
    """Stage 4: directions ``indices``, split over ``n_jobs`` joblib workers when asked.

    Direction i depends only on (seed, i), so the records are identical whatever the
    number of workers or the backend (a ``joblib.parallel_config`` chosen by the user wins).
    """
    indices = np.asarray(list(indices), dtype=np.int64)
    workers = min(effective_n_jobs(n_jobs), indices.size)
    if workers <= 1:
        return estimate_directions(problem, indices, seed, progress=progress, start=start)
    chunks = np.array_split(indices, workers)
    parts = Parallel(n_jobs=n_jobs)(
        delayed(estimate_directions)(problem, chunk, seed, start=start) for chunk in chunks
    )
    return DirectionRecords.concatenate(parts)


# ---------------------------------------------------------------------------- 2. eps pilot


@dataclass(frozen=True)
class EpsSelection:
    """Result of :func:`select_eps`: the chosen eps, the pilot table, the re-bound problem
    and the exponent of its map (chosen when exponents were searched; None for the naive
    estimator or a map without an ``exponent``)."""

    eps: float | None
    table: object
    problem: Problem
    exponent: float | None = None

    def __iter__(self):  # unpacks as (eps, table, problem)
        return iter((self.eps, self.table, self.problem))


def select_eps(problem: Problem, grid=EPS_GRID, n_directions=EPS_PILOT_DIRECTIONS,
               random_state=0, *, refine=EPS_REFINE, extend=EPS_EXTEND,
               tie=EPS_TIE_NATS, exponents=None) -> EpsSelection:
    """Stage 2: choose ``preconditioner_eps`` (and the exponent) by pilot estimates.

    The search (:func:`volsk.preconditioners.choose_eps`): the coarse ``grid``, extended past
    an end that keeps winning, then the winner's half-decade neighbours; after each step the
    largest eps within ``tie`` nats of the best pilot wins. The same ``n_directions``
    direction seeds are used at every eps (so the comparison is paired), drawn from a seed
    stream separate from the estimate's (so choosing eps does not bias the final estimate
    upwards). The curvature is computed once: the bound map is re-made for each eps with
    ``with_eps``. The pilot costs ``n_directions`` directions per eps tried (8 eps for the
    default search unless an end of the grid keeps winning), each searched from its Taylor
    guess; the table's ``directions`` and ``evaluations_per_direction`` columns account
    for it.

    With ``exponents``, that search runs once per exponent (the map re-made with
    ``with_exponent``), on the same pilot directions, and
    :func:`volsk.preconditioners.choose_exponent` picks the pair: within ``tie`` nats of the
    best pilot, the default exponent 0.5 first, then the smaller exponent, then the larger
    eps. A single-eps ``grid`` with ``refine=()`` compares the exponents at that eps.

    Parameters
    ----------
    problem : Problem
        Prepared with any eps (e.g. ``grid[0]``) and exponent.
    grid : sequence of float, default=EPS_GRID
        The coarse grid.
    n_directions : int, default=EPS_PILOT_DIRECTIONS
        Pilot directions per eps (the same ones at every eps).
    random_state : int, default=0
        The estimator's base seed (``seed_``); the pilot seed is derived from it.
    refine, extend, tie
        As in :func:`volsk.preconditioners.choose_eps`.
    exponents : sequence of float or None, default=None
        Exponents to search with eps (None: the bound map's exponent only; the estimator's
        ``preconditioner_exponent="auto"`` passes :data:`EXPONENT_GRID`). Ignored for a map
        without ``with_exponent``.

    Returns
    -------
    EpsSelection
        ``(eps, table, problem)``: the chosen eps, a pandas DataFrame with one row per
        (exponent, eps) tried (:data:`~volsk.preconditioners.selection.PILOT_COLUMNS`) and
        ``problem`` with its preconditioner re-bound to the chosen eps (and exponent, in
        ``.exponent``). No pilot is run (eps None, an empty table, ``problem`` as given)
        when the map does not depend on eps (the naive estimator) or cannot be re-made for
        another eps (a custom bound map without ``with_eps``: it is used as bound).
    """
    grid = check_eps_grid(grid)
    if exponents is not None:
        exponents = check_exponent_grid(exponents)
    if int(n_directions) < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions!r}")
    bound = problem.preconditioner
    exponent = None if getattr(bound, "is_identity", False) else getattr(bound, "exponent",
                                                                          None)
    if getattr(bound, "is_identity", False) or not hasattr(bound, "with_eps"):
        import pandas as pd  # import time: pandas is needed only for tables

        return EpsSelection(None, pd.DataFrame(columns=list(PILOT_COLUMNS)), problem,
                            exponent)
    seed = stream_seed(random_state, EPS_PILOT_STREAM)

    def run_pilot(at, eps):
        # one candidate map at a time (each holds per-parameter vectors); a few directions,
        # each searched from its own Taylor guess (a search pilot would cost as much as this)
        candidate = replace(problem, preconditioner=at.with_eps(eps))
        rec = estimate_directions(candidate, range(int(n_directions)), seed,
                                  start=TAYLOR_START)
        return rec.log_volume, rec.evaluations

    if exponents is None or not hasattr(bound, "with_exponent"):
        eps, table, _ = choose_eps(grid, lambda eps: run_pilot(bound, eps), refine=refine,
                                   extend=extend, tie=tie)
        table.insert(0, "exponent", float("nan") if exponent is None else float(exponent))
        return EpsSelection(eps, table, replace(problem, preconditioner=bound.with_eps(eps)),
                            exponent)
    maps = {}  # exponent -> the bound map re-made with it (the curvature is shared)

    def at(exponent):
        if exponent not in maps:
            maps[exponent] = bound.with_exponent(exponent)
        return maps[exponent]

    exponent, eps, table, _ = choose_exponent(
        exponents, grid, lambda e, eps: run_pilot(at(e), eps), refine=refine, extend=extend,
        tie=tie)
    return EpsSelection(eps, table, replace(problem, preconditioner=at(exponent).with_eps(eps)),
                        exponent)


# -------------------------------------------------------------------- 2b. the boundary fit


def fit_boundary_map(problem: Problem, seed: int):
    """Stage 2b: with a :class:`~volsk.preconditioners.BoundaryFitted` preconditioner, fit
    its correction to pilot radii and fix the map of the estimate.

    Runs after the eps pilot (eps is chosen for the base map) and before the search pilot.
    Round r's pilot draws directions 0 … m−1 from a seed of its own (the child r of the
    ``BOUNDARY_PILOT_STREAM`` seed), each searched from its Taylor guess at the problem's
    rtol; see :func:`volsk.preconditioners.boundary.fit_boundary` for the rounds.

    Returns
    -------
    problem : Problem
        With the fitted map bound (as given without a boundary-fitted preconditioner).
    table : pandas.DataFrame or None
        The rounds (None without a boundary-fitted preconditioner).
    evaluations : int
        Cost evaluations the pilots spent.
    """
    start = problem.preconditioner
    if not isinstance(start, BoundaryStart):
        return problem, None, 0
    m = start.strategy.directions(start.partitions)
    stream = stream_seed(seed, BOUNDARY_PILOT_STREAM)
    seeds = [child_seed(stream, r) for r in range(start.strategy.rounds + 1)]

    def run_pilot(candidate, pilot_seed):
        return estimate_directions(replace(problem, preconditioner=candidate), range(m),
                                   pilot_seed, start=TAYLOR_START)

    chosen, table, evaluations = fit_boundary(start, run_pilot, seeds,
                                              generator=problem.generator,
                                              device=problem.evaluator.device)
    return replace(problem, preconditioner=chosen), table, evaluations


# ------------------------------------------------------------ 2 and 2b: the map of the estimate


@dataclass(frozen=True)
class MapChoice:
    """What stages 2 and 2b chose (:func:`choose_map`): small and picklable, so that a problem
    prepared again in another process is bound to the same map (:func:`bind_map`) without
    running the pilots again.

    Attributes
    ----------
    eps, exponent : float or None
        What the estimator reports as ``preconditioner_eps_`` and ``preconditioner_exponent_``.
    bind_eps : float
        The eps to :func:`prepare` the problem with.
    bind_exponent : float or None
        The exponent the exponent pilot chose, to bind in place of the settings' "auto"
        (None: bind with the settings' exponent).
    eps_table : pandas.DataFrame or None
        The eps (and exponent) pilot's table; None when no such pilot ran.
    boundary : numpy.ndarray or None
        The boundary fit's group coefficients (None: no boundary fit, or its base map kept).
    boundary_table : pandas.DataFrame or None
        The boundary fit's rounds.
    boundary_evaluations : int
        Cost evaluations the boundary pilots spent.
    """

    eps: float | None
    exponent: float | None
    bind_eps: float
    bind_exponent: float | None = None
    eps_table: object = None
    boundary: np.ndarray | None = None
    boundary_table: object = None
    boundary_evaluations: int = 0


def choose_map(problem: Problem, eps, exponent, *, n_samples: int, seed: int):
    """Stages 2 and 2b: choose eps and the exponent when "auto", then fit a boundary map.

    ``problem`` is :func:`prepare`'s (with ``eps``, or ``EPS_GRID[0]`` when it is "auto"),
    ``eps`` and ``exponent`` the estimator's (numbers or "auto"; an "auto" exponent with a
    numeric eps compares the exponents of :data:`EXPONENT_GRID` at that eps); the eps pilot
    runs ``min(EPS_PILOT_DIRECTIONS, n_samples)`` directions per candidate.

    Returns
    -------
    problem : Problem
        Bound to the map of the estimate.
    choice : MapChoice
        What was chosen: :func:`bind_map` binds a problem prepared with it to the same map.
    """
    auto = isinstance(eps, str)
    auto_exponent = isinstance(exponent, str)
    bind_eps = EPS_GRID[0] if auto else float(eps)
    table = bind_exponent = None
    if auto_exponent:
        exponent = DEFAULT_EXPONENT
    if auto or auto_exponent:
        pilot = min(EPS_PILOT_DIRECTIONS, n_samples)
        exponents = EXPONENT_GRID if auto_exponent else None
        if auto:
            selection = select_eps(problem, n_directions=pilot, random_state=seed,
                                   exponents=exponents)
        else:  # the exponents compared at the given eps
            selection = select_eps(problem, grid=(float(eps),), n_directions=pilot,
                                   random_state=seed, refine=(), extend=0, exponents=exponents)
        chosen, table, problem = selection
        if auto or chosen is not None:  # a map without with_eps keeps a given eps
            eps = chosen
        if chosen is not None:
            bind_eps = float(chosen)
        if selection.exponent is not None:
            exponent = selection.exponent
            if auto_exponent:
                bind_exponent = float(selection.exponent)
    if getattr(problem.preconditioner, "is_identity", False):
        eps = exponent = None  # the naive map depends on neither
    problem, boundary_table, boundary_evaluations = fit_boundary_map(problem, seed)
    fitted = problem.preconditioner
    boundary = fitted.coefficients if isinstance(fitted, BoundaryMap) else None
    return problem, MapChoice(eps, exponent, bind_eps, bind_exponent, table,
                              None if boundary is None else np.asarray(boundary, np.float64),
                              boundary_table, boundary_evaluations)


def bind_map(problem: Problem, choice: MapChoice) -> Problem:
    """The problem bound to the map :func:`choose_map` chose, without its pilots.

    ``problem`` is :func:`prepare`'s with ``eps=choice.bind_eps`` and, when
    ``choice.bind_exponent`` is not None, that exponent in the settings: eps and the exponent
    are bound there. This applies the boundary fit's outcome: its fitted correction (or its
    base map), made from the chosen coefficients exactly as the fit made it, never fitted
    again.
    """
    start = problem.preconditioner
    if not isinstance(start, BoundaryStart):
        return problem
    return replace(problem, preconditioner=start.corrected(choice.boundary))


# ------------------------------------------------------------------------------ the whole fit


@dataclass
class FitResult:
    """What one fit produced: the bound problem, the records and the pilots' outcomes
    (``exponent``: the map's exponent, chosen under "auto"; None for the naive estimator;
    ``boundary_table``: the rounds of a boundary fit, None without one)."""

    problem: Problem
    records: DirectionRecords
    eps: float | None
    eps_table: object
    pilot_evaluations: int
    exponent: float | None = None
    boundary_table: object = None
    choice: MapChoice | None = None
    start: SearchStart | None = None


def fit(model, X, y, settings: Settings, *, eps, n_samples, seed, first=0, optimizer=None,
        attention_mask=None, n_jobs=None, progress=None, check=None,
        pilots=None) -> FitResult:
    """The algorithm in order, for directions ``first … first + n_samples − 1``.

    ``eps`` and ``settings.exponent`` are numbers or "auto" (stage 2 picks them; an "auto"
    exponent with a numeric eps compares the exponents of :data:`EXPONENT_GRID` at that
    eps). ``check(problem)`` runs after stage 1 and may raise (``partial_fit`` refuses a
    different question there). ``pilots``: the ``(choice, start)`` of an earlier fit of the
    same question (``FitResult.choice`` and ``.start``; ``eps`` and the exponent then its
    bound ones): the map is bound from the choice and the searches start where that fit's
    did, without running a pilot again — the same records, since every pilot is a pure
    function of the problem and the seed (``pilot_evaluations`` is then 0).
    """
    if pilots is not None:  # bound as the shards of a sharded fit bind it
        eps = pilots[0].bind_eps
        if pilots[0].bind_exponent is not None:
            settings = replace(settings, exponent=pilots[0].bind_exponent)
    auto = isinstance(eps, str)
    problem = prepare(model, X, y, settings, eps=EPS_GRID[0] if auto else float(eps),
                      n_directions=n_samples, seed=seed, optimizer=optimizer,
                      attention_mask=attention_mask)
    if check is not None:
        check(problem)
    if pilots is None:
        problem, choice = choose_map(problem, eps, settings.exponent, n_samples=n_samples,
                                     seed=seed)
    else:
        choice, start = pilots
        problem = bind_map(problem, choice)
    # the map is fixed: what only its choice needed goes (a diagonal map's curvature)
    settled = getattr(problem.preconditioner, "settled", None)
    if settled is not None:
        problem = replace(problem, preconditioner=settled())
    spent = 0
    if pilots is None:
        start = calibrate_search(problem, seed)
        spent = start.evaluations + choice.boundary_evaluations
    records = run_directions(problem, range(first, first + n_samples), seed, start,
                             n_jobs=n_jobs, progress=progress)
    return FitResult(problem, records, choice.eps, choice.eps_table, spent, choice.exponent,
                     choice.boundary_table, choice, start)


# ------------------------------------------------- a problem's summary (fits split over workers)


@dataclass(frozen=True)
class ProblemSummary:
    """What the fitted attributes need of a problem: a few numbers and names, no model, no data.

    A fit whose directions run in worker processes (``volsk.sweeps.fit_sharded``) prepares its
    problem there; the summary is what comes back to finish the estimate in the caller.

    Attributes
    ----------
    n_parameters : int
        Trainable parameters n (flat ones included).
    flat : volsk.results.FlatCoordinates
        The flat coordinates (named such as ``"0.weight[3, 7]"``, held as runs).
    is_probability : bool
        Whether the measure is a prior (else Lebesgue).
    """

    n_parameters: int
    flat: FlatCoordinates
    is_probability: bool


def summarise(problem) -> ProblemSummary:
    """The :class:`ProblemSummary` of a :class:`Problem` (a summary is returned as it is)."""
    if isinstance(problem, ProblemSummary):
        return problem
    return ProblemSummary(int(problem.evaluator.space.n), problem.flat,
                          bool(problem.is_probability))
