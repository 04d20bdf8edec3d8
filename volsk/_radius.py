"""Batched first-crossing search along rays.

For each unit direction u we look for the first radius R at which C(θ + R u) reaches the cutoff
ε, to |C − ε| ≤ rtol·ε. Near the anchor the cost grows like ½ q r² (q = uᵀHu), so

1. the directional Taylor coefficients (one nested forward-mode JVP) give a first guess that is
   exact for a quadratic cost;
2. while no crossing is bracketed, the guess is extrapolated in log–log space with the observed
   slope (2 until two points are known), growth capped so a non-monotone cost is not skipped;
3. once bracketed, regula falsi on log C vs log r with the Illinois modification, safeguarded by
   geometric bisection.

A NaN or infinite cost counts as crossed. All directions of a batch advance together: each
iteration is one batched evaluation of the still-active directions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["find_radii", "RadiusResult", "STATUS"]

# per-direction outcome codes (``samples_["status"]``)
STATUS = {0: "crossed", 1: "unbounded", 2: "jump", 3: "max_iter"}
MAX_GROWTH = 10.0  # largest step factor in r before a crossing is bracketed
MAX_GROWTH_DOWNHILL = 4.0  # ... while the cost is still at or below its anchor value
MODEL_STEPS = 3  # Taylor-anchored model steps per direction before pure regula falsi
FLOOR = 1e-3  # below FLOOR·target the log residual continues linearly (see _residual)


def _residual(e, target):
    """A log-like residual of the excess cost e that stays finite for e <= 0.

    log(e/target) for e >= FLOOR·target, continued linearly (C¹) below: monotone in e, so
    regula falsi works on costs that first decrease (cross-entropy along a descent direction)
    with the same log–log steps as near-quadratic ones.
    """
    tau = FLOOR * target
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.maximum(e, tau) / target)
    return np.where(e >= tau, logs, np.log(FLOOR) + (e - tau) / tau)


class RadiusResult:
    """Radii (B,), cost at the radius (B,), evaluations (B,) and status codes (B,)."""

    def __init__(self, radii, costs, evaluations, status):
        self.radii = radii
        self.costs = costs
        self.evaluations = evaluations
        self.status = status


def _taylor_guess(g0, g1, g2, cutoff):
    """First positive root of g0 + g1 r + ½ g2 r² = cutoff (NaN when there is none)."""
    delta = cutoff - g0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        disc = np.sqrt(np.maximum(g1 * g1 + 2.0 * g2 * delta, 0.0))
        quad = 2.0 * delta / (g1 + disc)  # stable form of (−g1 + disc)/g2
        lin = delta / g1
    guess = np.where(g2 > 0, quad, np.where(g1 > 0, lin, np.nan))
    guess[~np.isfinite(guess) | (guess <= 0)] = np.nan
    return guess


def find_radii(evaluate, taylor, limit, cutoff, rtol, anchor_cost=0.0, max_iter=100, *,
               start=None, slope=2.0, bend=0.0):
    """Find the first crossing of ``cutoff`` along each ray.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(positions, radii) -> costs``: positions index the batch's directions (int
        array), radii the radius for each; returns float64 costs (NaN/inf allowed).
    taylor : callable
        ``taylor() -> (g0, g1, g2)``: value, slope and curvature of r ↦ C(θ + r u) at 0, (B,) each.
    limit : numpy.ndarray (B,)
        Radius beyond which a ray counts as never crossing (its radius is then +inf): the
        measure's saturation radius or a global maximum.
    cutoff, rtol : float
    anchor_cost : float
        C(θ); must be below the cutoff.
    max_iter : int

    Returns
    -------
    RadiusResult

    Examples
    --------
    >>> import numpy as np
    >>> from volsk._radius import find_radii
    >>> q = np.array([1.0, 4.0])                       # C(r) = ½ q r²
    >>> res = find_radii(lambda pos, r: 0.5 * q[pos] * r**2,
    ...                  lambda: (np.zeros(2), np.zeros(2), q), np.full(2, np.inf), 0.5, 1e-6)
    >>> res.radii.tolist(), res.evaluations.tolist()
    ([1.0, 0.5], [2, 2])
    """
    limit = np.asarray(limit, dtype=np.float64)
    if start is None:
        g0, g1, g2 = (np.asarray(v, dtype=np.float64) for v in taylor())
    else:  # no Taylor coefficients: the search starts from measured points only
        g0 = np.full(limit.shape[0], float(anchor_cost))
        g1 = g2 = np.zeros(limit.shape[0])
    B = g0.shape[0]
    target = cutoff - anchor_cost  # excess cost at the crossing (> 0)
    log_target = np.log(target)

    radii = np.full(B, np.nan)
    costs = np.full(B, np.nan)
    status = np.zeros(B, dtype=np.int8)
    # the Taylor JVP counts as one evaluation
    evaluations = np.full(B, 1 if start is None else 0, dtype=np.int64)

    lo = np.zeros(B)
    e_lo = np.zeros(B)  # excess cost C − C(θ) at lo
    hi = np.full(B, np.inf)
    e_hi = np.full(B, np.nan)
    f_lo = np.full(B, -np.inf)  # Illinois-scaled log residuals used by regula falsi
    f_hi = np.full(B, np.nan)
    last_side = np.zeros(B, dtype=np.int8)  # +1: hi moved last, −1: lo moved last
    prev_lo = np.zeros(B)
    prev_e_lo = np.zeros(B)

    # model points: G = log(excess / q(r)) with q the Taylor polynomial (see _model_radius)
    has_model = (g2 > 0) & (g1 >= 0)
    m_r1, m_G1 = np.full(B, np.nan), np.full(B, np.nan)  # most recent point
    m_r2, m_G2 = np.full(B, np.nan), np.full(B, np.nan)  # the one before
    model_steps = np.zeros(B, dtype=np.int64)

    if start is None:
        r = _taylor_guess(g0, g1, g2, cutoff)
    else:
        r = np.array(np.broadcast_to(np.asarray(start, dtype=np.float64), (B,)))
    known = np.isfinite(r) & (r > 0)
    fallback = float(np.median(r[known])) if known.any() else 1.0
    r[~known] = fallback
    r = np.minimum(r, limit)
    active = np.ones(B, dtype=bool)

    for _ in range(max_iter):
        pos = np.flatnonzero(active)
        if pos.size == 0:
            break
        rp = r[pos]
        c = np.asarray(evaluate(pos, rp), dtype=np.float64)
        evaluations[pos] += 1
        e = c - anchor_cost
        finite = np.isfinite(c)
        crossed = ~finite | (c >= cutoff)
        converged = finite & (np.abs(c - cutoff) <= rtol * cutoff)

        done = converged.copy()
        radii[pos[converged]] = rp[converged]
        costs[pos[converged]] = c[converged]

        # below the cutoff at the search limit: the ray never crosses (for this measure)
        unbounded = ~crossed & ~converged & (rp >= limit[pos] * (1 - 1e-12))
        radii[pos[unbounded]] = np.inf
        costs[pos[unbounded]] = c[unbounded]
        status[pos[unbounded]] = 1
        done |= unbounded

        upd_hi = crossed & ~done
        upd_lo = ~crossed & ~done
        f_new = np.where(np.isfinite(e), _residual(np.nan_to_num(e), target), np.nan)
        i_hi, i_lo = pos[upd_hi], pos[upd_lo]
        # Illinois: an endpoint that stays while the other moves twice has its residual halved
        f_lo[i_hi[last_side[i_hi] == 1]] *= 0.5
        f_hi[i_lo[last_side[i_lo] == -1]] *= 0.5
        hi[i_hi], e_hi[i_hi], f_hi[i_hi] = rp[upd_hi], e[upd_hi], f_new[upd_hi]
        prev_lo[i_lo], prev_e_lo[i_lo] = lo[i_lo], e_lo[i_lo]
        lo[i_lo], e_lo[i_lo], f_lo[i_lo] = rp[upd_lo], e[upd_lo], f_new[upd_lo]
        last_side[i_hi], last_side[i_lo] = 1, -1
        with np.errstate(divide="ignore", invalid="ignore"):
            G = np.log(e / (g1[pos] * rp + 0.5 * g2[pos] * rp * rp))
        fresh = has_model[pos] & finite & (e > 0) & np.isfinite(G) & ~done
        j = pos[fresh]
        m_r2[j], m_G2[j] = m_r1[j], m_G1[j]
        m_r1[j], m_G1[j] = rp[fresh], G[fresh]

        active[pos[done]] = False
        pos = np.flatnonzero(active)
        if pos.size == 0:
            break
        r[pos] = _next_radius(
            lo[pos], e_lo[pos], hi[pos], e_hi[pos], f_lo[pos], f_hi[pos],
            prev_lo[pos], prev_e_lo[pos], target, log_target, limit[pos], slope, bend,
        )
        # the Taylor-anchored model, while it is young and its step is safe
        use = has_model[pos] & np.isfinite(m_G1[pos]) & (model_steps[pos] < MODEL_STEPS)
        if use.any():
            k = pos[use]
            guess = _model_radius(g1[k], g2[k], target, m_r1[k], m_G1[k], m_r2[k], m_G2[k])
            upper = np.where(np.isfinite(hi[k]), hi[k], np.minimum(MAX_GROWTH * lo[k], limit[k]))
            safe = np.isfinite(guess) & (guess > lo[k]) & (guess < upper)
            r[k[safe]] = guess[safe]
            model_steps[k[safe]] += 1
        # a bracket that has collapsed in r: the cost jumps across the cutoff here
        collapsed = np.isfinite(hi[pos]) & (hi[pos] - lo[pos] <= 1e-12 * hi[pos])
        if collapsed.any():
            j = pos[collapsed]
            radii[j], costs[j], status[j] = hi[j], e_hi[j] + anchor_cost, 2
            active[j] = False
    else:
        j = np.flatnonzero(active)
        radii[j] = np.where(np.isfinite(hi[j]), np.sqrt(np.maximum(lo[j], 1e-300) * hi[j]), lo[j])
        costs[j] = e_hi[j] + anchor_cost
        status[j] = 3
    return RadiusResult(radii, costs, evaluations, status)


def _model_radius(g1, g2, target, r1, G1, r2, G2, newton_steps=40):
    """Where the Taylor-anchored model of the cost reaches the target.

    The excess cost is modelled as e(r) = q(r)·exp(a·r^p) with q(r) = g1 r + ½ g2 r² the Taylor
    polynomial at the anchor (exact as r → 0) and the correction a·r^p fitted to the measured
    points G = log(e/q): through the last two (p from their ratio, clipped to [0.5, 4]), or
    through the last one with p = 1 (the cubic term's order). Solved by Newton in log r from
    the quadratic root; NaN when the model has no crossing.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p = np.log(G1 / G2) / np.log(r1 / r2)
        ok = np.isfinite(p) & (G1 * G2 > 0) & (r1 != r2)
        p = np.where(ok, np.clip(p, 0.5, 4.0), 1.0)
        a = G1 / r1**p
        y = np.log(2.0 * target / (g1 + np.sqrt(g1 * g1 + 2.0 * g2 * target)))
        log_target = np.log(target)
        for _ in range(newton_steps):
            er = np.exp(y)
            q = g1 * er + 0.5 * g2 * er * er
            corr = a * np.exp(p * y)
            h = np.log(q) + corr - log_target
            dh = (g1 * er + g2 * er * er) / q + p * corr
            step = np.where(dh > 0, h / dh, np.nan)
            y = y - np.clip(step, -2.0, 2.0)
        er = np.exp(y)
        h = np.log(g1 * er + 0.5 * g2 * er * er) + a * np.exp(p * y) - log_target
    return np.where(np.abs(h) < 1e-9, er, np.nan)


def _one_point_step(e, target, slope, bend):
    """log(R/r) from one measured point (r, e), if log(e/target) = s·x + ½κ·x² in x = log(r/R).

    s (``slope``) and κ (``bend``) describe the log–log growth of the excess cost around the
    crossing; κ = 0 gives the power law step (target/e)^(1/s).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = np.log(e / target)
        disc = slope * slope + 2.0 * bend * L
        x = np.where(disc > 0, 2.0 * L / (slope + np.sqrt(np.maximum(disc, 0.0))), L / slope)
    return -x


def _bent_secant(L_lo, L_hi, width, bend):
    """Offset y in log r from the lower end where L_lo + c1·y + ½κ·y² = 0, the parabola of
    curvature κ (``bend``) through both ends (``width`` apart); NaN where it has no root."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c1 = (L_hi - L_lo) / width - 0.5 * bend * width
        disc = c1 * c1 - 2.0 * bend * L_lo
        y = -2.0 * L_lo / (c1 + np.sqrt(disc))
    return np.where((disc >= 0) & (c1 > 0), y, np.nan)


def _next_radius(lo, e_lo, hi, e_hi, f_lo, f_hi, prev_lo, prev_e_lo, target, log_target, limit,
                 slope0=2.0, bend=0.0):
    """One safeguarded step in log–log space for each still-active direction."""
    r = np.empty_like(lo)
    bracketed = np.isfinite(hi)

    # -- no crossing seen yet: extrapolate up from lo with the observed log–log slope
    up = ~bracketed
    if up.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.log(e_lo / prev_e_lo) / np.log(lo / prev_lo)
        ok = (prev_lo > 0) & (prev_e_lo > 0) & (e_lo > 0) & np.isfinite(slope)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            two_points = (target / e_lo) ** (1.0 / np.clip(slope, 0.5, 8.0))
            one_point = np.exp(_one_point_step(e_lo, target, slope0, bend))
            factor = np.where(e_lo > 0, np.where(ok, two_points, one_point), MAX_GROWTH_DOWNHILL)
        cap = np.where(e_lo > 0, MAX_GROWTH, MAX_GROWTH_DOWNHILL)
        factor = np.clip(np.nan_to_num(factor, nan=MAX_GROWTH), 1.0 + 1e-9, cap)
        r[up] = np.minimum(lo[up] * factor[up], limit[up])

    # -- bracketed: Illinois regula falsi on (log r, log excess) when both ends are usable
    br = bracketed
    if br.any():
        geo = np.where(lo > 0, np.sqrt(np.maximum(lo, 1e-300) * hi), 0.5 * hi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            usable = (lo > 0) & np.isfinite(f_lo) & np.isfinite(f_hi) & (f_hi > f_lo)
            x_lo, x_hi = np.log(lo), np.log(hi)
            secant = np.exp(x_lo - f_lo * (x_hi - x_lo) / (f_hi - f_lo))
            # with both residuals still the true logs (no Illinois halving pending, both ends
            # above FLOOR), the secant of the assumed bend: exact if log(e/target) is
            # quadratic in log r with curvature κ
            plain = (e_lo >= FLOOR * target) & (e_hi > 0)
            plain &= (f_lo == _residual(e_lo, target)) & (f_hi == _residual(e_hi, target))
            bent = np.exp(x_lo + _bent_secant(f_lo, f_hi, x_hi - x_lo, bend))
            secant = np.where(plain & (bend != 0.0), bent, secant)
            # lo at the anchor: step down from the upper point with the assumed growth
            from_hi = hi * np.exp(_one_point_step(e_hi, target, slope0, bend))
        step = np.where(usable, secant, np.where((lo == 0) & np.isfinite(e_hi) & (e_hi > 0),
                                                 from_hi, geo))
        inside = np.isfinite(step) & (step > lo) & (step < hi)
        r[br] = np.where(inside, step, geo)[br]
    return r
