"""Choosing ``preconditioner_eps`` (and ``preconditioner_exponent``) by pilot: grids, tie, rule.

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

The exponent (``preconditioner_exponent="auto"``, :func:`choose_exponent`) is chosen with eps:
the eps search above runs once per exponent of :data:`EXPONENT_GRID`, all on the same pilot
directions, and the winner is taken among every (exponent, eps) tried by the same tie rule:
the pairs whose pilot is within ``tie`` nats of the best one are those not shown to fall
short; among them the default exponent 0.5 is preferred, then the smaller exponent, then the
larger eps. Why the default first: for a quadratic cost P ∝ H^{−1/2} is exact (every radius
the same), so another exponent has to earn its place by more than the pilot's noise —
without evidence the estimator behaves as with a fixed exponent 0.5. Then the smaller
exponent for the reason the larger eps is preferred: exponent → 0 tends to the identity, the
mildest map. The tie stays :data:`EPS_TIE_NATS`: three exponents make K ≈ 24 pilots, for
which it is a level-85 % bound (24 e^{−t} ≈ 0.15) — the preference for the default is what
guards against the extra pilots.
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
    "EXPONENT_GRID",
    "DEFAULT_EXPONENT",
    "EPS_COLUMNS",
    "PILOT_COLUMNS",
    "check_eps_grid",
    "check_exponent_grid",
    "choose_eps",
    "choose_exponent",
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

#: Exponents tried by ``preconditioner_exponent="auto"`` (each with its own eps search).
EXPONENT_GRID = (0.25, 0.5, 1.0)

#: The exponent preferred within the tie threshold (the estimator's default): H^{−1/2}.
DEFAULT_EXPONENT = 0.5

#: Columns of :func:`choose_eps`'s table (one exponent).
EPS_COLUMNS = ("eps", "stage", "log_volume", "max_sample", "median_sample", "ess",
               "evaluations_per_direction", "directions", "selected")

#: Columns of the pilot table (the estimator's ``eps_pilot_``).
PILOT_COLUMNS = ("exponent", *EPS_COLUMNS)


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
    return tried[best], table[list(EPS_COLUMNS)], best


def check_exponent_grid(exponents) -> list[float]:
    """The candidate exponents as a list of floats; ValueError unless non-empty, finite, >= 0.

    Examples
    --------
    >>> from volsk.preconditioners.selection import check_exponent_grid
    >>> check_exponent_grid((0.25, 1))
    [0.25, 1.0]
    """
    exponents = [float(e) for e in np.atleast_1d(np.asarray(exponents, dtype=np.float64))]
    if not exponents or any(not (math.isfinite(e) and e >= 0) for e in exponents):
        raise ValueError(
            f"exponents must be a non-empty sequence of finite exponents >= 0, got {exponents!r}")
    return exponents


def choose_exponent(exponents, grid, run_pilot, *, refine=EPS_REFINE, extend=EPS_EXTEND,
                    tie=EPS_TIE_NATS, prefer=DEFAULT_EXPONENT):
    """Search the exponent with eps by pilot: :func:`choose_eps` once per exponent, one winner.

    Parameters
    ----------
    exponents : sequence of float
        The candidate exponents, finite and >= 0 (the estimator's: :data:`EXPONENT_GRID`).
    grid : sequence of float
        The coarse eps grid of every exponent's search (a single eps with ``refine=()``:
        exponents compared at that eps).
    run_pilot : callable
        ``run_pilot(exponent, eps) -> (sample_log_volumes, evaluations)``, as for
        :func:`choose_eps`; for a paired comparison every (exponent, eps) should get the same
        directions.
    refine, extend, tie
        As in :func:`choose_eps` (``tie`` is also the threshold across exponents).
    prefer : float, default=DEFAULT_EXPONENT
        The exponent that wins whenever one of its pilots is within ``tie`` nats of the best.

    Returns
    -------
    exponent, eps : float
        The chosen pair: among the (exponent, eps) whose pilot log-volume is within ``tie``
        nats of the best, the one with exponent ``prefer`` if there is one, else the smallest
        exponent; then the largest eps (NaN counts as −∞; when every pilot is −∞ all tie).
    table : pandas.DataFrame
        :data:`PILOT_COLUMNS`: :func:`choose_eps`'s rows of every exponent (exponents in the
        order given, eps decreasing), ``selected`` True on the chosen row only.
    index : int
        The chosen row in ``table``.

    Examples
    --------
    >>> import numpy as np
    >>> from volsk.preconditioners.selection import choose_exponent
    >>> def run_pilot(exponent, eps):  # 0.25 beats 0.5 by 40 nats, at its best eps 10^-2
    ...     peak = -100 * abs(np.log10(eps) + 2) - 160 * abs(exponent - 0.25)
    ...     return np.full(4, peak), np.full(4, 3)
    >>> exponent, eps, table, index = choose_exponent((0.25, 0.5, 1.0), (1.0, 1e-2, 1e-4),
    ...                                               run_pilot)
    >>> exponent, round(float(np.log10(eps)), 2), table.columns[0]
    (0.25, -2.0, 'exponent')
    """
    # import time: pandas is only needed when the exponent is chosen by pilot
    import pandas as pd

    exponents = check_exponent_grid(exponents)
    tables = []
    for exponent in dict.fromkeys(exponents):  # each once, in the order given
        _, table, _ = choose_eps(grid, lambda eps, e=exponent: run_pilot(e, eps),
                                 refine=refine, extend=extend, tie=tie)
        table.insert(0, "exponent", exponent)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    scores = table["log_volume"].to_numpy(dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = scores.max()
    near = scores >= best - tie if np.isfinite(best) else scores == best
    candidates = np.flatnonzero(near)
    rank = [(table["exponent"].iloc[i] != prefer, table["exponent"].iloc[i],
             -table["eps"].iloc[i]) for i in candidates]
    index = int(candidates[min(range(len(candidates)), key=rank.__getitem__)])
    table["selected"] = np.arange(len(table)) == index
    chosen = table.iloc[index]
    return float(chosen["exponent"]), float(chosen["eps"]), table[list(PILOT_COLUMNS)], index
