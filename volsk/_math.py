"""Log-domain special functions for volume and prior-probability estimates.

Every function works with logarithms throughout, because the quantities involved
(sphere areas, radial integrals in dimension n ~ 1e10) overflow float64 by hundreds of
orders of magnitude. Nothing is exponentiated before the final logarithm.

The radial integral of the Gaussian measure,

    I(n, a, b, R) = ∫_0^R r^{n-1} exp(-a r²/2 - b r) dr,

is computed by Laplace-centred composite Gauss-Legendre quadrature in the offset from the
maximiser of the log-integrand (see :func:`log_gaussian_radial_integral`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

__all__ = [
    "log_sphere_area",
    "log_ball_volume",
    "logsumexp_mean",
    "log1mexp",
    "log_gaussian_radial_integral",
    "gaussian_saturation_radius",
    "log_uniform_radial_integral",
]

_LOG_2 = math.log(2.0)
_LOG_PI = math.log(math.pi)

# fdlibm's split of log(2): _LN2_HI has 32 significant bits, so e * _LN2_HI is exact for
# every binary exponent e of a float64.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SQRT_HALF = math.sqrt(0.5)
_DEKKER_SPLIT = 134217729.0  # 2**27 + 1

# Log-integrand cut-off (nats below the maximum) that delimits the quadrature range. For a
# concave log-integrand the mass beyond the cut-off is at most exp(-L) / (1 - exp(-L)) of the
# mass inside it, so 60 nats leave ~1e-26 relative: invisible in float64.
_CUTOFF_NATS = 60.0
_BISECTION_STEPS = 20
_BLOCK = 256  # directions per quadrature block: bounds the (block, nodes) temporaries


# --------------------------------------------------------------------------------------------
# small building blocks
# --------------------------------------------------------------------------------------------


def log1mexp(x):
    """Compute ``log(1 - exp(-x))`` accurately.

    Parameters
    ----------
    x : array_like
        Real argument; the result is real for ``x >= 0``.

    Returns
    -------
    ndarray or scalar
        ``log(1 - exp(-x))``: ``-inf`` at ``x = 0``, ``0`` at ``x = inf``, ``nan`` for
        ``x < 0`` or ``nan``.

    Notes
    -----
    Maechler (2012), "Accurately computing log(1 - exp(-|a|))": ``log(-expm1(-x))`` for
    ``x <= log 2`` and ``log1p(-exp(-x))`` beyond. Each branch is used where it does not
    cancel, so the relative error is a few ulp over the whole domain.

    Examples
    --------
    >>> import numpy as np
    >>> from volsk._math import log1mexp
    >>> float(log1mexp(1e-20))  # log(1e-20); log(1 - exp(-x)) naively gives -inf
    -46.051701859880914
    >>> float(log1mexp(50.0))  # -exp(-50); naively 0.0
    -1.9287498479639178e-22
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.where(x <= _LOG_2, np.log(-np.expm1(-x)), np.log1p(-np.exp(-x)))
    return out[()]


def _log1pmx(z):
    """``log1p(z) - z`` for z >= -1, without the cancellation of the direct form near 0."""
    z = np.asarray(z, dtype=np.float64)
    shape, z = z.shape, z.reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # log1p(z) = 2 atanh(u), u = z/(2+z); 2u - z = -z²/(2+z) is the cancellation-free
        # leading term, the rest is 2 Σ_k u^(2k+1)/(2k+1). |z| < 0.02 gives |u| < 0.0102, so
        # five terms reach u^11 ~ 1e-22, below 1e-17 of the leading z²/2. Beyond the cut the
        # direct form loses at most 2 eps / |z| = 1e-14 relative. (In-place: this runs on
        # (directions x nodes) arrays and dominates the cost of the radial integral.)
        d = 2.0 + z
        u = z / d
        u2 = u * u
        series = u2 * (1.0 / 11.0)
        for c in (1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0):
            series += c
            series *= u2
        series += 1.0 / 3.0
        series *= u
        series *= u2
        series *= 2.0
        u *= z  # u is now z²/(2+z)
        series -= u
        direct = np.log1p(z)
        direct -= z
        np.copyto(series, direct, where=~(np.abs(z) < 0.02))
    return series.reshape(shape)


def _two_sum(a, b):
    """Knuth's error-free sum: a + b = s + e exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a):
    t = _DEKKER_SPLIT * a
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a, b):
    """Dekker's error-free product: a * b = p + e exactly (no overflow near 1e300 assumed)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _log_dd(x):
    """log(x) for x > 0 as a double-double (hi, lo), absolute error ~3e-17.

    np.log(x) has error 0.5 ulp of the result, i.e. ~1e-16 * |log x|; multiplied by n ~ 1e10
    that is ~1e-6 nats. Splitting x = m 2^e with m in [1/√2, √2) leaves only log1p(m - 1),
    |.| <= 0.35, to round; e log 2 is carried exactly in two pieces.
    """
    m, e = np.frexp(x)
    low = m < _SQRT_HALF
    m = np.where(low, 2.0 * m, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    lm = np.log1p(m - 1.0)  # m - 1 is exact (Sterbenz)
    hi, lo = _two_sum(e * _LN2_HI, lm)
    return hi, lo + e * _LN2_LO


# --------------------------------------------------------------------------------------------
# sphere, ball, averages
# --------------------------------------------------------------------------------------------


def log_sphere_area(n):
    """Log surface area of the unit sphere in R^n, ``log |S^{n-1}| = log(2 π^{n/2} / Γ(n/2))``.

    Parameters
    ----------
    n : array_like
        Dimension of the ambient space, ``n >= 1`` (real values allowed; ``nan`` for
        ``n <= 0``). Up to ``n ~ 1e10`` and beyond.

    Returns
    -------
    float or ndarray
        The log area; ``n = 1`` gives ``log 2`` (the two points ±1).

    Notes
    -----
    Relative error a few ulp (``gammaln`` dominates); for n = 1e10 the value is ~-1e11, so
    the absolute error is ~1e-5 nats, the float64 resolution there.

    Examples
    --------
    >>> import math
    >>> from volsk._math import log_sphere_area
    >>> math.isclose(log_sphere_area(3), math.log(4 * math.pi))
    True
    >>> round(float(log_sphere_area(1e10)), 3)
    -100939869306.715
    """
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = _LOG_2 + 0.5 * n * _LOG_PI - gammaln(0.5 * n)
        out = np.where(n > 0, out, np.nan)
    return out[()]


def log_ball_volume(n, radius):
    """Log volume of the n-ball, ``log(π^{n/2} radius^n / Γ(n/2 + 1))``.

    Parameters
    ----------
    n : array_like
        Dimension, ``n >= 1`` (``nan`` for ``n <= 0``).
    radius : array_like
        Radius ``>= 0`` (broadcast against ``n``); ``0`` gives ``-inf``, negative ``nan``.

    Returns
    -------
    float or ndarray
        The log volume, relative error a few ulp.

    Examples
    --------
    >>> import math
    >>> from volsk._math import log_ball_volume
    >>> math.isclose(log_ball_volume(2, 3.0), math.log(math.pi * 9))
    True
    >>> float(log_ball_volume(5, 0.0))
    -inf
    """
    n = np.asarray(n, dtype=np.float64)
    radius = np.asarray(radius, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # n log r is written as a product rather than log(r**n): r**n overflows for n ~ 1e3.
        out = 0.5 * n * _LOG_PI + n * np.log(radius) - gammaln(0.5 * n + 1.0)
        out = np.where((n > 0) & (radius >= 0), out, np.nan)
    return out[()]


def logsumexp_mean(log_values):
    """Log of the mean of ``exp(log_values)``: ``logsumexp(x) - log(x.size)``.

    Parameters
    ----------
    log_values : array_like
        Log values, any shape (flattened). ``-inf`` entries (zero values) are allowed.

    Returns
    -------
    float
        ``-inf`` if every entry is ``-inf``; ``inf`` if any entry is ``+inf``; ``nan`` if any
        entry is ``nan``. Otherwise accurate to a few ulp.

    Raises
    ------
    ValueError
        If ``log_values`` is empty (the mean of nothing is undefined).

    Examples
    --------
    >>> import math
    >>> from volsk._math import logsumexp_mean
    >>> math.isclose(logsumexp_mean([math.log(1.0), math.log(3.0)]), math.log(2.0))
    True
    >>> logsumexp_mean([-1000.0, -math.inf])  # mean of e^-1000 and 0
    -1000.6931471805599
    """
    x = np.asarray(log_values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("log_values is empty: the mean of no values is undefined")
    if np.isnan(x).any():
        return math.nan
    top = x.max()
    if top == math.inf:
        return math.inf
    if top == -math.inf:
        return -math.inf
    terms = np.exp(x - top)
    # the largest term is exactly 1: log1p of the others keeps the tiny-tail accuracy that
    # log(1 + s) would round away
    terms[np.argmax(x)] = 0.0
    return float(top + np.log1p(terms.sum()) - math.log(x.size))


# --------------------------------------------------------------------------------------------
# radial integrals
# --------------------------------------------------------------------------------------------


def log_uniform_radial_integral(n, r_in, r_out, R):
    """Log radial integral of a uniform density on ``[r_in, r_out]`` cut at ``R``.

    ``log ∫_{r_in}^{min(R, r_out)} r^{n-1} dr = log((min(R, r_out)^n - r_in^n) / n)``.

    Parameters
    ----------
    n : array_like
        Dimension, ``n >= 1`` (broadcast with the rest).
    r_in : array_like
        Entry radius, ``>= 0`` (``nan`` where negative).
    r_out : array_like
        Exit radius (may be ``inf``, or below ``r_in`` / ``-inf`` when the ray misses).
    R : array_like
        Cut-off radius ``>= 0`` (may be ``inf``).

    Returns
    -------
    ndarray or scalar
        The log integral; ``-inf`` where ``min(R, r_out) <= r_in``. Relative error a few ulp
        in ``u^n`` terms: with ``u = min(R, r_out)`` it is evaluated as
        ``n log u + log1mexp(n log(u / r_in)) - log n``, and ``log(u / r_in)`` as
        ``log1p((u - r_in) / r_in)`` so that nearly equal radii keep full relative accuracy.

    Examples
    --------
    >>> import math
    >>> from volsk._math import log_uniform_radial_integral
    >>> math.isclose(log_uniform_radial_integral(3, 1.0, 2.0, 5.0), math.log((8 - 1) / 3))
    True
    >>> float(log_uniform_radial_integral(3, 1.0, 2.0, 0.5))  # R below r_in: empty
    -inf
    """
    n, r_in, r_out, R = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                              for v in (n, r_in, r_out, R)))
    u = np.minimum(R, r_out)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio_log = np.where(r_in > 0, np.log1p((u - r_in) / r_in), np.inf)
        # u^n - r_in^n = u^n (1 - exp(-n log(u/r_in))): the difference never forms
        out = n * np.log(u) + log1mexp(n * ratio_log) - np.log(n)
    out = np.where(u > r_in, out, -np.inf)
    bad = ~(r_in >= 0) | ~(n > 0) | ~(R >= 0) | np.isnan(r_out)
    out = np.where(bad, np.nan, out)
    return out[()]


def _composite_rule(panels=20, order=12, graded=18, ratio=0.25):
    """Nodes and weights of a composite Gauss-Legendre rule on [0, 1].

    The first of the ``panels`` uniform panels is replaced by ``graded`` geometric panels
    shrinking towards 0 by ``ratio``: the integrand r^{n-1} has a branch point at r = 0, which
    for non-integer n close to 1 (e.g. r^{0.5}) sits at or just below the left end of the
    range and would cost plain Gauss-Legendre its spectral accuracy.
    """
    x, w = np.polynomial.legendre.leggauss(order)
    x, w = 0.5 * (x + 1.0), 0.5 * w
    h = 1.0 / panels
    edges = [0.0] + [h * ratio**k for k in range(graded, 0, -1)] + [h * j for j in
                                                                     range(1, panels + 1)]
    edges = np.asarray(edges)
    lo, width = edges[:-1], np.diff(edges)
    nodes = (lo[:, None] + width[:, None] * x[None, :]).ravel()
    weights = (width[:, None] * w[None, :]).ravel()
    return nodes, weights


_NODES, _WEIGHTS = _composite_rule()


class _Profile:
    """Shape of the scaled log-integrand around its maximiser on [0, T].

    In the scaled variable t = r √a the log-integrand is φ(t) = (n-1) log t - t²/2 - β t with
    β = b / √a, and φ'' = -(n-1)/t² - 1 <= -1. ``x0`` is the maximiser on [0, T] and
    ψ(y) = φ(x0 + y) - φ(x0) is evaluated as (n-1) log1pmx(y/x0) + φ'(x0) y - y²/2, which stays
    exact where φ itself is ~1e11 and differences of it would cancel.
    """

    def __init__(self, n, beta, T):
        nm1 = n - 1.0
        self.nm1 = nm1
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # positive root of t² + β t - (n-1): take the form without cancellation; hypot keeps
            # β² + 4(n-1) from overflowing for huge |β|
            disc = np.hypot(beta, 2.0 * math.sqrt(nm1))
            tstar = np.where(beta > 0, 2.0 * nm1 / (beta + disc), 0.5 * (disc - beta))
            if nm1 == 0.0:
                tstar = np.maximum(-beta, 0.0)
        self.tstar = tstar
        self.peak = tstar < T  # maximiser is interior (or at 0 for n = 1, β >= 0)
        x0 = np.where(self.peak, tstar, T)
        self.x0 = x0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if nm1 == 0.0:
                slope = -x0 - beta
            else:
                # φ'(T) = (t* - T)(T + (n-1)/t*)/T factored through the roots of the quadratic:
                # the direct (n-1)/T - T - β cancels when T is close to t*
                slope = np.where(self.peak, 0.0, (tstar - x0) * (x0 + nm1 / tstar) / x0)
        self.slope = slope

    def psi(self, y, x0=None, slope=None):
        x0 = self.x0 if x0 is None else x0
        slope = self.slope if slope is None else slope
        val = slope * y - 0.5 * y * y
        if self.nm1 != 0.0:
            with np.errstate(divide="ignore", invalid="ignore"):
                val = val + self.nm1 * _log1pmx(y / x0)
        return val

    def right_root(self, L, limit):
        """Offset y_b in (0, limit] with ψ(y_b) = -L (or ``limit`` if ψ stays above -L).

        ψ(y) <= φ'(x0) y - y²/2 (curvature <= -1) bounds the root from above; on [x0, ∞) the
        curvature is at most c0 = (n-1)/x0² + 1, which bounds it from below. The bracket is
        then narrowed by bisection in log y, since the root may be orders of magnitude below
        the upper bound (a narrow peak).
        """
        s = -self.slope  # >= 0 on the right side
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # hypot, not sqrt(s² + ...): the slope at a tiny boundary R reaches (n-1)/R ~ 1e300
            hi = 2.0 * L / (s + np.hypot(s, np.sqrt(2.0 * L)))
            if self.nm1 == 0.0:
                sqrt_c0 = np.ones_like(self.x0)
            else:
                sqrt_c0 = np.hypot(math.sqrt(self.nm1) / self.x0, 1.0)
            lo = 2.0 * L / (s + np.hypot(s, np.sqrt(2.0 * L) * sqrt_c0))
            lo = np.where(np.isfinite(sqrt_c0) & (lo > 0), lo, hi * 1e-300)
        hi = np.minimum(hi, limit)
        return self._bisect(L, lo, hi, sign=1.0)

    def left_root(self, L):
        """Distance d_a in [0, x0] with ψ(-d_a) = -L (or x0 if ψ stays above -L down to t=0).

        Same bounds as :meth:`right_root`, with the curvature on [x0/2, x0] bounded by
        4(n-1)/x0² + 1 for the lower end.
        """
        s = self.slope  # >= 0 on the left side
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            hi = 2.0 * L / (s + np.hypot(s, np.sqrt(2.0 * L)))
            if self.nm1 == 0.0:
                sqrt_c1 = np.ones_like(self.x0)
            else:
                sqrt_c1 = np.hypot(2.0 * math.sqrt(self.nm1) / self.x0, 1.0)
            lo = 2.0 * L / (s + np.hypot(s, np.sqrt(2.0 * L) * sqrt_c1))
            lo = np.minimum(lo, 0.5 * self.x0)
            hi = np.minimum(hi, self.x0)
            lo = np.where(np.isfinite(sqrt_c1) & (lo > 0), lo, hi * 1e-300)
        return self._bisect(L, lo, hi, sign=-1.0)

    def _bisect(self, L, lo, hi, sign):
        # invariant: ψ(sign·lo) >= -L; returns hi, on the safe (wider) side of the root
        done = self.psi(sign * hi) >= -L
        lo = np.where(done, hi, lo)
        for _ in range(_BISECTION_STEPS):
            mid = np.sqrt(lo * hi)
            above = self.psi(sign * mid) >= -L
            lo = np.where(above, mid, lo)
            hi = np.where(above, hi, mid)
        return np.where(hi > 0, hi, 0.0)


def _check_n(n):
    n = float(n)
    if not n >= 1.0:
        raise ValueError(f"n must be a scalar >= 1, got {n}")
    return n


def log_gaussian_radial_integral(n, a, b, R):
    """Log of the Gaussian radial integral ``∫_0^R r^{n-1} exp(-a r²/2 - b r) dr``.

    Parameters
    ----------
    n : float
        Dimension, a scalar ``>= 1`` (real values allowed), up to ~1e10 and beyond.
    a : array_like
        Curvature, ``a > 0`` (``nan`` otherwise).
    b : array_like
        Linear coefficient, any finite real: the peak of the integrand may lie inside
        ``[0, R]`` or beyond it.
    R : array_like
        Upper limit, ``R >= 0``; ``np.inf`` allowed, ``R = 0`` gives ``-inf``.

    Returns
    -------
    ndarray or scalar
        float64, broadcast shape of ``a, b, R``.

    Notes
    -----
    Accuracy: absolute error below 1e-6 nats against arbitrary-precision quadrature over
    n in [1, 1e10], a, b, R as above, up to float64 resolution of the result itself: when
    |log I| ~ 1e11 (n ~ 1e10) one ulp is ~1.5e-5, so the guarantee is
    ``|error| <= 1e-6 + 4e-16 |log I|``. Outside this, exponents must stay representable
    (``R √a`` and the peak position positive normal floats, ``|b| / √a < 1e150``).

    Method: substitute t = r √a, β = b / √a, T = R √a. The log-integrand
    φ(t) = (n-1) log t - t²/2 - β t is concave with φ'' <= -1; let x0 be its maximiser on
    [0, T] (the positive root t* of t² + βt - (n-1) = 0, or T when t* > T). With
    ψ(y) = φ(x0 + y) - φ(x0) written without cancellation (see ``_Profile``), the range where
    ψ >= -60 is found by bisection (it lies within ±sqrt(120) of x0 by the curvature bound),
    and ∫ exp(ψ) is summed by composite Gauss-Legendre (20 panels of 12 nodes, the first
    replaced by 18 panels shrinking geometrically towards t = 0, where r^{n-1} has a branch
    point for non-integer n). Finally

        log I = φ_r(r0) - ½ log a + log ∫ exp(ψ(y)) dy,   r0 = x0 / √a,

    where φ_r(r0) = (n-1) log r0 - a r0²/2 - b r0 is the unscaled log-integrand at the
    maximiser, summed in double-double arithmetic: its terms reach ~1e11 for n ~ 1e10 and can
    cancel. When the maximiser is R itself, r0 = R exactly, so the steep boundary (where
    d log I / d log R ~ n) is not perturbed by rounding R √a.

    Examples
    --------
    >>> import math
    >>> import numpy as np
    >>> from volsk._math import log_gaussian_radial_integral
    >>> # n = 1, b = 0, R = ∞: half a Gaussian, sqrt(π / (2a))
    >>> math.isclose(log_gaussian_radial_integral(1, 2.0, 0.0, np.inf), 0.5 * math.log(math.pi / 4))
    True
    >>> # n = 2, b = 0: (1 - exp(-a R²/2)) / a
    >>> math.isclose(log_gaussian_radial_integral(2, 1.0, 0.0, 1.0), math.log(1 - math.exp(-0.5)))
    True
    >>> # n = 3, b = 0, R = ∞: sqrt(π/2); R = 0 gives -inf
    >>> np.round(log_gaussian_radial_integral(3, 1.0, 0.0, np.array([0.0, np.inf])), 12).tolist()
    [-inf, 0.225791352645]
    >>> # n = 1e10: log(2^{n/2-1} Γ(n/2)) ~ 1e11, exact to float64 resolution (~1.5e-5)
    >>> round(float(log_gaussian_radial_integral(1e10, 1.0, 0.0, np.inf)), 3)
    110129254638.762
    """
    n = _check_n(n)
    a, b, R = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, R)))
    shape = a.shape
    a, b, R = a.ravel(), b.ravel(), R.ravel()
    out = np.full(a.shape, np.nan)
    valid = (a > 0) & np.isfinite(a) & np.isfinite(b) & (R >= 0)
    out[valid & (R == 0)] = -np.inf
    work = np.flatnonzero(valid & (R > 0))
    for start in range(0, work.size, _BLOCK):
        idx = work[start : start + _BLOCK]
        # inf/nan intermediates at the extremes are resolved by the np.where fallbacks
        with np.errstate(all="ignore"):
            out[idx] = _log_gaussian_block(n, a[idx], b[idx], R[idx])
    return out.reshape(shape)[()]


def _log_gaussian_block(n, a, b, R):
    sqrt_a = np.sqrt(a)
    beta = b / sqrt_a
    with np.errstate(over="ignore"):
        T = R * sqrt_a
    prof = _Profile(n, beta, T)
    L = _CUTOFF_NATS

    right = np.where(prof.peak, prof.right_root(L, T - prof.x0), 0.0)
    left = np.where(prof.x0 > 0, prof.left_root(L), 0.0)

    # quadrature over y in [-left, right]; ψ is evaluated at offsets only, so x0 + y is never
    # formed (it would round away the ~1e-5-wide peak of n ~ 1e10 at x0 ~ 1e5)
    span = left + right
    y = -left[:, None] + span[:, None] * _NODES[None, :]
    psi = prof.psi(y, prof.x0[:, None], prof.slope[:, None])
    with np.errstate(divide="ignore"):
        log_s = np.log(np.exp(psi) @ _WEIGHTS) + np.log(span)

    # unscaled log-integrand at r0 in double-double. At an interior maximum r0 = t*/√a is
    # rounded, harmlessly: φ_r is stationary there. At a boundary maximum r0 = R exactly.
    r0 = np.where(prof.peak, prof.tstar / sqrt_a, R)
    nm1 = n - 1.0
    if nm1 == 0.0:
        t1_hi, t1_lo = np.zeros_like(r0), np.zeros_like(r0)
    else:
        l_hi, l_lo = _log_dd(r0)
        t1_hi, t1_lo = _two_prod(nm1, l_hi)
        t1_lo = t1_lo + nm1 * l_lo
    ar_hi, ar_lo = _two_prod(a, r0)
    q_hi, q_lo = _two_prod(ar_hi, r0)
    q_lo = q_lo + ar_lo * r0  # a r0² = q_hi + q_lo
    br_hi, br_lo = _two_prod(b, r0)

    s, e = _two_sum(t1_hi, -0.5 * q_hi)
    lo_sum = e + t1_lo - 0.5 * q_lo - br_lo
    s, e = _two_sum(s, -br_hi)
    lo_sum = lo_sum + e
    s, e = _two_sum(s, log_s - 0.5 * np.log(a))
    total = s + (lo_sum + e)

    # plain float64 fallback where the double-double products over/underflowed
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        plain = (nm1 * np.log(r0) if nm1 else 0.0) - 0.5 * a * r0 * r0 - b * r0
        plain = plain + log_s - 0.5 * np.log(a)
    return np.where(np.isfinite(total), total, plain)


def gaussian_saturation_radius(n, a, b, log_tol=50.0):
    """Radius beyond which the Gaussian radial integral is complete to ``exp(-log_tol)``.

    Returns r_s with ``∫_{r_s}^∞ f <= exp(-log_tol) ∫_0^∞ f`` for
    ``f(r) = r^{n-1} exp(-a r²/2 - b r)``: a ray search can stop at r_s, since any larger R
    gives the same :func:`log_gaussian_radial_integral` to within ``exp(-log_tol)`` relative.

    Parameters
    ----------
    n : float
        Dimension, a scalar ``>= 1``.
    a : array_like
        Curvature ``> 0``.
    b : array_like
        Linear coefficient, any finite real.
    log_tol : array_like, default 50
        Tolerance in nats, ``> 0`` (broadcast with ``a, b``).

    Returns
    -------
    ndarray or scalar
        r_s (``nan`` for invalid ``a``, ``b``).

    Notes
    -----
    Let t* be the maximiser of the log-integrand on [0, ∞) and r_s = t* + y_b (scaled units,
    as in :func:`log_gaussian_radial_integral`) where ψ(y_b) = -(log_tol + 1). ψ is concave,
    so beyond y_b it lies below its tangent there, whose slope is at most -L / y_b
    (L = log_tol + 1): the tail is at most exp(-L) y_b / L. Between 0 and y_b, ψ lies above the
    chord, so the mass there is at least y_b (1 - exp(-L)) / L. The tail fraction is therefore
    at most exp(-L) / (1 - exp(-L)) <= exp(-log_tol). The result is conservative but not
    loose: y_b is at most ``sqrt(2 L)`` scaled units (curvature <= -1), i.e. the familiar
    Gaussian bound, and much less for narrow peaks.

    Examples
    --------
    >>> import numpy as np
    >>> from volsk._math import gaussian_saturation_radius, log_gaussian_radial_integral
    >>> r_s = gaussian_saturation_radius(10, 1.0, 0.0, log_tol=20.0)
    >>> full = log_gaussian_radial_integral(10, 1.0, 0.0, np.inf)
    >>> bool(full - log_gaussian_radial_integral(10, 1.0, 0.0, r_s) <= np.exp(-20.0))
    True
    """
    n = _check_n(n)
    a, b, log_tol = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                          for v in (a, b, log_tol)))
    shape = a.shape
    a, b, log_tol = a.ravel(), b.ravel(), log_tol.ravel()
    valid = (a > 0) & np.isfinite(a) & np.isfinite(b) & (log_tol > 0)
    a_ok = np.where(valid, a, 1.0)
    b_ok = np.where(valid, b, 0.0)
    L = np.where(valid, log_tol, 1.0) + 1.0
    sqrt_a = np.sqrt(a_ok)
    prof = _Profile(n, b_ok / sqrt_a, np.full(a.shape, np.inf))
    y_b = prof.right_root(L, np.inf)
    out = np.where(valid, (prof.tstar + y_b) / sqrt_a, np.nan)
    return out.reshape(shape)[()]
