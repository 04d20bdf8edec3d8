"""Choosing ``preconditioner_eps`` by pilot: the grids, the tie threshold and the rule.

The rule knows nothing of models or directions: it is handed a function that runs a pilot at
one eps and returns that pilot's per-direction log-volumes. It searches eps on a log scale in
three steps:

1. coarse: every eps of :data:`EPS_GRID` (1, 10⁻², 10⁻⁴, 10⁻⁶);
2. extend: while the winner is an end of what was tried and beats its neighbour by more than
   the tie threshold, one more coarse step beyond it (at most :data:`EPS_EXTEND` per end), so
   a curvature of unusual scale is not cut off by the grid;
3. refine: the winner's neighbours at half-decade steps, winner × 10^{±1/2} and × 10^{±1}
   (:data:`EPS_REFINE`).

After each step the winner is the *largest* eps whose pilot log-volume is within
:data:`EPS_TIE_NATS` of the best one (see :func:`tie_break`). Why: each pilot estimate µ̂ is
non-negative and unbiased, so Markov's inequality bounds its upward error,
P(log µ̂ − log µ ≥ t) ≤ e^{−t}; over K pilots a union bound gives
P(max log µ̂ − log µ ≥ t) ≤ K e^{−t}. So the best pilot minus t is a lower confidence bound on
log µ at level 1 − K e^{−t}, and an eps whose pilot reaches that bound is not shown, at that
level, to fall short of the truth. Among those the largest eps is the mildest map (the closest
to the naive estimator's uniform directions, the lightest-tailed weights), so it is preferred;
ties within the pilot's noise then resolve the same way whatever the seed. With K = 8 pilots
(a typical search) and level 95 %, t = log(8 / 0.05) ≈ 5.1 nats.
"""

from __future__ import annotations

import math

import numpy as np

from ..results import summarise_samples

__all__ = [
    "EPS_GRID",
    "EPS_REFINE",
    "EPS_EXTEND",
    "EPS_TIE_NATS",
    "PILOT_COLUMNS",
    "check_eps_grid",
    "choose_eps",
    "tie_break",
]

#: Coarse grid of ``preconditioner_eps="auto"`` (two decades apart).
EPS_GRID = (1.0, 1e-2, 1e-4, 1e-6)

#: Factors applied to the coarse winner for the fine look: its half-decade neighbours.
EPS_REFINE = (10.0, 10**0.5, 10**-0.5, 0.1)

#: Coarse steps tried beyond each end of the grid at most (while the end keeps winning).
EPS_EXTEND = 3

#: Lead (nats) a pilot estimate needs over a larger eps's to be preferred: log(8 / 0.05), the
#: Markov + union bound for 8 pilots at level 95 %.
EPS_TIE_NATS = math.log(8 / 0.05)

#: Columns of the pilot table (the estimator's ``eps_pilot_``).
PILOT_COLUMNS = ("eps", "stage", "log_volume", "max_sample", "median_sample", "ess",
                 "evaluations_per_direction", "directions", "selected")


def check_eps_grid(grid) -> list[float]:
    """The candidate eps as a list of floats; ValueError unless non-empty, finite and >= 0.

    Examples
    --------
    >>> from volsk.preconditioners.selection import check_eps_grid
    >>> check_eps_grid((1, 1e-2))
    [1.0, 0.01]
    """
    grid = [float(e) for e in np.atleast_1d(np.asarray(grid, dtype=np.float64))]
    if not grid or any(not (math.isfinite(e) and e >= 0) for e in grid):
        raise ValueError(f"grid must be a non-empty sequence of finite eps >= 0, got {grid!r}")
    return grid


def tie_break(eps, log_volumes, tie=EPS_TIE_NATS) -> int:
    """Index of the largest eps whose log-volume is within ``tie`` nats of the best one.

    NaN counts as −∞; when every entry is −∞ the largest eps wins (nothing tells them apart).

    Examples
    --------
    >>> from volsk.preconditioners.selection import tie_break
    >>> tie_break([1.0, 0.1, 0.01], [-13.0, -10.0, -9.0], tie=3.0)  # -10 is within 3 of -9
    1
    >>> tie_break([1.0, 0.1, 0.01], [-13.0, -10.0, -9.0], tie=0.0)
    2
    """
    eps = np.asarray(eps, dtype=np.float64)
    scores = np.asarray(log_volumes, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = scores.max()
    near = scores >= best - tie if np.isfinite(best) else scores == best
    candidates = np.flatnonzero(near)
    return int(candidates[np.argmax(eps[candidates])])


def _step(grid, end):
    """The coarse grid's ratio at one end (> 1), or None for a single-eps or degenerate grid."""
    values = sorted(set(grid), reverse=True)
    if len(values) < 2:
        return None
    a, b = (values[0], values[1]) if end == "large" else (values[-2], values[-1])
    return a / b if b > 0 else None


def choose_eps(grid, run_pilot, *, refine=EPS_REFINE, extend=EPS_EXTEND, tie=EPS_TIE_NATS):
    """Search eps by pilot: the coarse ``grid``, extended past a winning end, then refined.

    Parameters
    ----------
    grid : sequence of float
        The coarse candidates, finite and >= 0 (default of the estimator: :data:`EPS_GRID`).
    run_pilot : callable
        ``run_pilot(eps) -> (sample_log_volumes, evaluations)``, two arrays with one entry per
        pilot direction: that direction's log-volume estimate and the cost evaluations it took.
        For a paired comparison, every eps should get the same directions. It is called once
        per eps tried, coarse grid first.
    refine : sequence of float, default=EPS_REFINE
        Factors applied to the coarse winner for the fine look (empty: no fine look).
    extend : int, default=EPS_EXTEND
        At most this many coarse steps (the grid's ratio at that end) beyond the largest or
        smallest eps, taken while that end is the winner and beats its neighbour by more
        than ``tie`` (0: never).
    tie : float, default=EPS_TIE_NATS
        The winner is the largest eps whose pilot log-volume is within ``tie`` nats of the
        best (see :func:`tie_break`; 0: the best pilot, ties to the larger eps).

    Returns
    -------
    eps : float
        The chosen eps.
    table : pandas.DataFrame
        One row per eps tried, by decreasing eps: ``eps``, ``stage`` ("coarse", "extend" or
        "fine"), ``log_volume``, ``max_sample``, ``median_sample``, ``ess``,
        ``evaluations_per_direction`` (as :func:`volsk.results.summarise_samples`),
        ``directions`` (pilot directions at that eps) and ``selected`` (True on the
        winner's row).
    index : int
        The winner's row in ``table``.

    Examples
    --------
    >>> import numpy as np
    >>> from volsk.preconditioners import choose_eps
    >>> def run_pilot(eps):  # a pilot whose log-volume peaks at eps = 10^-2.5, steeply
    ...     return np.full(4, -100 * abs(np.log10(eps) + 2.5)), np.full(4, 3)
    >>> eps, table, index = choose_eps((1.0, 1e-2, 1e-4, 1e-6), run_pilot)
    >>> round(float(np.log10(eps)), 2), table["stage"].tolist()
    (-2.5, ['coarse', 'fine', 'fine', 'coarse', 'fine', 'fine', 'coarse', 'coarse'])
    """
    # import time: pandas is only needed when eps is chosen by pilot
    import pandas as pd

    grid = check_eps_grid(grid)
    factors = [float(f) for f in refine]
    if any(not (math.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"refine must hold finite factors > 0, got {refine!r}")
    if int(extend) < 0:
        raise ValueError(f"extend must be >= 0, got {extend!r}")
    rows = {}  # eps -> row

    def run(eps, stage):
        if not any(math.isclose(eps, seen, rel_tol=1e-9, abs_tol=0.0) for seen in rows):
            log_volumes, evaluations = run_pilot(eps)
            rows[eps] = {"eps": eps, "stage": stage,
                         **summarise_samples(log_volumes, evaluations),
                         "directions": int(np.size(log_volumes))}

    def winner():
        eps = sorted(rows, reverse=True)
        return eps, tie_break(eps, [rows[e]["log_volume"] for e in eps], tie)

    for eps in grid:
        run(eps, "coarse")
    for end, index_of_end, neighbour in (("large", 0, 1), ("small", -1, -2)):
        step = _step(grid, end)
        for _ in range(int(extend) if step is not None else 0):
            tried, best = winner()
            if len(tried) < 2 or best != (index_of_end % len(tried)):
                break
            lead = rows[tried[best]]["log_volume"] - rows[tried[neighbour]]["log_volume"]
            if not lead > tie:
                break
            nxt = tried[best] * step if end == "large" else tried[best] / step
            if not (math.isfinite(nxt) and nxt > 0):
                break
            run(nxt, "extend")
    tried, best = winner()
    centre = tried[best]
    for factor in factors:
        run(centre * factor, "fine")
    tried, best = winner()
    table = pd.DataFrame([rows[e] for e in tried])
    table["selected"] = np.arange(len(tried)) == best
    return tried[best], table[list(PILOT_COLUMNS)], best
