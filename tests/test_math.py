"""volsk._math against arbitrary-precision ground truth (mpmath) and exact identities.

The reference for the Gaussian radial integral is mpmath tanh-sinh quadrature of
r^{n-1} exp(-a r²/2 - b r) in the original variable r, normalised by its value at the maximiser
and split at breakpoints a few widths around it, at a working precision that scales with the
size of the exponent. It is itself checked against closed forms (incomplete gamma for b = 0,
parabolic cylinder D for R = ∞, erfc for n = 1).
"""

import doctest
import itertools
import math

import mpmath as mp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from volsk import _math
from volsk._math import (
    gaussian_saturation_radius,
    log1mexp,
    log_ball_volume,
    log_gaussian_radial_integral,
    log_sphere_area,
    log_uniform_radial_integral,
    logsumexp_mean,
)

INF = math.inf


def _tol(ref):
    """The accuracy contract: 1e-6 nats, widened to float64 resolution of |log I| ~ 1e11."""
    return 1e-6 + 4e-16 * abs(ref)


# --------------------------------------------------------------------------------------------
# mpmath reference for ∫ r^{n-1} exp(-a r²/2 - b r) dr
# --------------------------------------------------------------------------------------------


def _peak(n, a, b):
    """Maximiser of (n-1) log r - a r²/2 - b r on [0, ∞) (float; only places breakpoints)."""
    nm1 = n - 1.0
    if nm1 == 0:
        return max(0.0, -b / a)
    d = math.hypot(b, 2.0 * math.sqrt(a * nm1))
    return 2.0 * nm1 / (b + d) if b > 0 else (d - b) / (2.0 * a)


def _width(n, a, b, r):
    """Length scale of the integrand at r: curvature, or the slope where it is steeper."""
    if r == 0:
        return 1.0 / math.sqrt(a) if b <= 0 else min(1.0 / math.sqrt(a), 1.0 / b)
    # r / sqrt(a r² + n - 1) and r / |n - 1 - a r² - b r|: no 1/r² overflow for tiny r
    w = r / math.sqrt(a * r * r + (n - 1.0))
    slope_r = abs((n - 1.0) - a * r * r - b * r)
    return min(w, r / slope_r) if slope_r > 0 else w


def mp_log_integral(n, a, b, lo, hi):
    """log ∫_lo^hi r^{n-1} exp(-a r²/2 - b r) dr with mpmath (lo >= 0, hi may be inf)."""
    r0 = min(max(_peak(n, a, b), lo), hi)
    w = _width(n, a, b, r0)
    # exponent terms reach |n log r| + a r²/2 + |b| r; carry 25 digits beyond them
    mag = abs(n - 1) * abs(math.log(r0)) if r0 > 0 else 0.0
    mag += a * r0 * r0 + abs(b) * r0 + 1.0
    dps = max(30, 25 + int(math.log10(mag)))
    with mp.workdps(dps):
        N, A, B = mp.mpf(n), mp.mpf(a), mp.mpf(b)
        nm1 = N - 1
        lo_m = mp.mpf(lo)
        hi_m = mp.inf if hi == INF else mp.mpf(hi)

        def phi(r):
            v = -A * r * r / 2 - B * r
            return v + nm1 * mp.log(r) if nm1 else v

        c, W = mp.mpf(r0), mp.mpf(w)
        phi0 = phi(c) if (c > 0 or not nm1) else mp.mpf(0)
        # integrate in s = (r - c) / w: O(1) scale, so quad's absolute error control is
        # relative to the integral even when R ~ 1e-250
        ends = [(lo_m - c) / W, mp.inf if hi == INF else (hi_m - c) / W]
        pts = [ends[0]] + [k for k in (-64, -16, -4, -1, 0, 1, 4, 16, 64)
                           if ends[0] < k < ends[1]] + [ends[1]]
        # (clamped: c + W s can round to just below lo = 0 near the left end)
        S = W * mp.quad(lambda s: mp.exp(phi(max(c + W * s, lo_m)) - phi0), pts)
        return phi0 + mp.log(S)


def _r_kinds(n, a, b):
    p = _peak(n, a, b)
    w = _width(n, a, b, p)
    base = p if p > 0 else w
    return {
        "tiny": 1e-6 * base,
        "below": max(p - 3 * w, 0.5 * p) if p > 0 else 0.3 * w,
        "at": base,
        "beyond": p + 3 * w,
        "inf": INF,
    }


NS = [1, 2, 3, 10, 1000, 1e6, 1e10]
AS = [1e-8, 1e-2, 1.0, 1e4, 1e8]
BS = [-1e6, -30, -1, 0, 1, 30, 1e6]
KINDS = ["tiny", "below", "at", "beyond", "inf"]


def _grid():
    # every (n, a, b) once, the R kind rotating so that each kind meets every n, a and b
    for (i, n), (j, a), (k, b) in itertools.product(enumerate(NS), enumerate(AS), enumerate(BS)):
        kind = KINDS[(i + 2 * j + k) % 5]
        yield pytest.param(n, a, b, kind, id=f"n={n:g}-a={a:g}-b={b:g}-R={kind}")
    # non-integer n: r^{n-1} has a branch point at r = 0
    for n, a, b, kind in itertools.product([1.5, 1.01], [1e-2, 1e4], [-30, 0, 1e6], KINDS[1:4:2]):
        yield pytest.param(n, a, b, kind, id=f"n={n:g}-a={a:g}-b={b:g}-R={kind}")


@pytest.mark.parametrize("n, a, b, kind", list(_grid()))
def test_gaussian_radial_integral_vs_mpmath(n, a, b, kind):
    R = _r_kinds(n, a, b)[kind]
    ref = mp_log_integral(n, a, b, 0.0, R)
    got = log_gaussian_radial_integral(n, a, b, R)
    assert abs(mp.mpf(float(got)) - ref) <= _tol(float(ref)), (float(got), mp.nstr(ref, 20))


def test_gaussian_radial_integral_vectorised_matches_scalar():
    # one call over a mixed batch equals the per-element calls (no cross-talk between lanes)
    rng = np.random.default_rng(0)
    a = 10 ** rng.uniform(-4, 4, 60)
    b = rng.normal(size=60) * 10 ** rng.uniform(-2, 4, 60)
    R = np.where(rng.random(60) < 0.2, np.inf, 10 ** rng.uniform(-3, 3, 60))
    batch = log_gaussian_radial_integral(50, a, b, R)
    single = [float(log_gaussian_radial_integral(50, *x)) for x in zip(a, b, R)]
    np.testing.assert_allclose(batch, single, rtol=1e-15, atol=1e-12)


# --- the reference itself against closed forms ---------------------------------------------


@pytest.mark.parametrize(
    "n, a, R", [(1, 1.0, 2.0), (3, 1e-2, 7.0), (10, 1e4, 0.02), (1000, 1.0, 40.0),
                (1e6, 1e-8, 1e7), (2.5, 1.0, INF)]
)
def test_reference_vs_incomplete_gamma(n, a, R):
    # b = 0: I = 2^{n/2-1} a^{-n/2} γ(n/2, a R²/2)
    with mp.workdps(40):
        N, A = mp.mpf(n), mp.mpf(a)
        x = mp.inf if R == INF else A * mp.mpf(R) ** 2 / 2
        closed = (N / 2 - 1) * mp.log(2) - N / 2 * mp.log(A) + mp.log(mp.gammainc(N / 2, 0, x))
    ref = mp_log_integral(n, a, 0.0, 0.0, R)
    assert abs(ref - closed) < 1e-20 * max(1, abs(closed))


@pytest.mark.parametrize("n, a, b", [(1, 1.0, 3.0), (3, 2.0, -2.0), (10, 1e-2, 5.0),
                                     (1.5, 1e-8, 1e6), (20, 1e4, -1e3)])
def test_reference_vs_parabolic_cylinder(n, a, b):
    # R = ∞: I = a^{-n/2} Γ(n) exp(β²/4) D_{-n}(β), β = b/√a
    with mp.workdps(40):
        N, A, B = mp.mpf(n), mp.mpf(a), mp.mpf(b)
        beta = B / mp.sqrt(A)
        closed = -N / 2 * mp.log(A) + mp.loggamma(N) + beta**2 / 4 + mp.log(mp.pcfd(-N, beta))
    ref = mp_log_integral(n, a, b, 0.0, INF)
    assert abs(ref - closed) < 1e-20 * max(1, abs(closed))


@pytest.mark.parametrize("a, b, R", [(1.0, 0.5, 1.0), (1e-2, -30.0, 100.0), (1e4, 1e6, 1e-3)])
def test_reference_vs_erfc(a, b, R):
    # n = 1: I = sqrt(π/(2a)) exp(b²/(2a)) (erfc(b/√(2a)) - erfc((aR + b)/√(2a)))
    with mp.workdps(60):
        A, B, Rm = mp.mpf(a), mp.mpf(b), mp.mpf(R)
        s = mp.sqrt(2 * A)
        x1, x2 = B / s, (A * Rm + B) / s
        # erfc(x1) - erfc(x2) = erfc(-x2) - erfc(-x1): take the side where both are small
        diff = mp.erfc(x1) - mp.erfc(x2) if x1 >= 0 else mp.erfc(-x2) - mp.erfc(-x1)
        closed = mp.log(mp.sqrt(mp.pi / (2 * A))) + B**2 / (2 * A) + mp.log(diff)
    ref = mp_log_integral(1, a, b, 0.0, R)
    assert abs(ref - closed) < 1e-20 * max(1, abs(closed))
    assert abs(float(log_gaussian_radial_integral(1, a, b, R)) - closed) <= _tol(float(closed))


# --- edge values ----------------------------------------------------------------------------


def test_gaussian_radial_integral_edges():
    f = log_gaussian_radial_integral
    assert f(3, 1.0, 0.0, 0.0) == -np.inf
    assert np.isnan(f(3, 0.0, 0.0, 1.0)) and np.isnan(f(3, -1.0, 0.0, 1.0))
    assert np.isnan(f(3, 1.0, 0.0, -1.0)) and np.isnan(f(3, 1.0, np.nan, 1.0))
    out = f(4, np.ones((2, 3)), np.zeros((1, 3)), np.array([[1.0], [np.inf]]))
    assert out.shape == (2, 3) and out.dtype == np.float64
    assert isinstance(f(4, 1.0, 0.0, 1.0), float)
    with pytest.raises(ValueError, match="n must be"):
        f(0.5, 1.0, 0.0, 1.0)
    # a tiny boundary radius: the slope (n-1)/R ~ 1e250 must not overflow the bracketing
    n, a, b, R = 1.5, 1e6, 10.0, 1e-250
    ref = mp_log_integral(n, a, b, 0.0, R)
    assert abs(float(f(n, a, b, R)) - ref) <= _tol(float(ref))


def test_gaussian_radial_integral_vectorises_over_many_directions():
    # speed is measured by benchmarks, never asserted in tests; this checks the blocked path
    rng = np.random.default_rng(1)
    k = 10_000
    a, b = 10 ** rng.uniform(-3, 3, k), rng.normal(size=k) * 10
    R = 10 ** rng.uniform(-2, 2, k)
    out = log_gaussian_radial_integral(1e6, a, b, R)
    assert np.isfinite(out).all()
    picks = rng.choice(k, 5, replace=False)
    for i in picks:
        assert out[i] == log_gaussian_radial_integral(1e6, a[i], b[i], R[i])


# --- properties -----------------------------------------------------------------------------

_n = st.one_of(st.integers(1, 30).map(float), st.floats(1.0, 1e10))
_a = st.floats(1e-6, 1e6)
_b = st.floats(-1e4, 1e4)
_R = st.floats(1e-4, 1e4)


@settings(max_examples=80, deadline=None)
@given(_n, _a, _b, _R, st.floats(1.0 + 1e-9, 10.0))
def test_monotone_in_R(n, a, b, R, factor):
    lo, hi, full = log_gaussian_radial_integral(n, a, b, [R, R * factor, np.inf])
    slack = 1e-9 + 1e-15 * abs(full)
    assert lo <= hi + slack and hi <= full + slack


@settings(max_examples=80, deadline=None)
@given(_n, _a, _b, _R)
def test_between_lebesgue_bounds(n, a, b, R):
    # exp(-a R²/2 - max(b, 0) R) <= I / (R^n / n) <= exp(max(-b, 0) R): the weight is between
    # its extremes on [0, R]
    got = float(log_gaussian_radial_integral(n, a, b, R))
    leb = n * math.log(R) - math.log(n)
    slack = 1e-9 + 1e-15 * (abs(leb) + a * R * R + abs(b) * R)
    assert leb - a * R * R / 2 - max(b, 0.0) * R - slack <= got <= leb + max(-b, 0.0) * R + slack


@settings(max_examples=60, deadline=None)
@given(_a, _R)
def test_closed_form_n2(a, R):
    # ∫_0^R r exp(-a r²/2) dr = (1 - exp(-a R²/2)) / a
    got = float(log_gaussian_radial_integral(2, a, 0.0, R))
    exact = -math.log(a) + float(log1mexp(a * R * R / 2))
    assert abs(got - exact) <= 1e-12 * (1 + abs(exact))


@settings(max_examples=60, deadline=None)
@given(st.floats(1.0, 1e8), _a)
def test_recurrence_b0(n, a):
    # b = 0, R = ∞: integration by parts gives I(n + 2) = n I(n) / a
    lhs, rhs = (float(log_gaussian_radial_integral(m, a, 0.0, np.inf)) for m in (n + 2, n))
    assert abs(lhs - (math.log(n) - math.log(a) + rhs)) <= 1e-9 + 1e-15 * abs(lhs)


@settings(max_examples=60, deadline=None)
@given(_n, _a, _b, st.one_of(_R, st.just(INF)), st.integers(-20, 20))
def test_scaling(n, a, b, R, k):
    # r = s r' with s = 2^k (exact in float64): I(n, a, b, R) = s^n I(n, a s², b s, R / s)
    s = 2.0**k
    lhs = float(log_gaussian_radial_integral(n, a, b, R))
    shift = n * k * math.log(2)
    rhs = shift + float(log_gaussian_radial_integral(n, a * s * s, b * s, R / s))
    assert abs(lhs - rhs) <= 1e-9 + 2e-15 * (abs(lhs) + abs(shift))


@settings(max_examples=60, deadline=None)
@given(_n, _a, _b, _R)
def test_finite_R_below_infinite(n, a, b, R):
    # and the gap is exactly the (positive) mass beyond R, which the saturation radius bounds
    fin, full = log_gaussian_radial_integral(n, a, b, [R, np.inf])
    assert fin <= full + 1e-9 + 1e-15 * abs(full)
    r_s = float(gaussian_saturation_radius(n, a, b, log_tol=30.0))
    if R >= r_s:
        assert full - fin <= 1e-12 + 1e-15 * abs(full)


# --------------------------------------------------------------------------------------------
# saturation radius
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, a, b",
    [(1, 1.0, 0.0), (1, 1e-8, 1e6), (1, 1e8, -1e6), (1.5, 1.0, 30.0), (3, 1.0, -1.0),
     (1000, 1e-2, 1.0), (1000, 1e4, 1e6), (1e6, 1.0, -30.0), (1e10, 1e8, 0.0),
     (1e10, 1e-8, 1e6)],
)
@pytest.mark.parametrize("log_tol", [5.0, 20.0, 50.0])
def test_saturation_radius_vs_mpmath(n, a, b, log_tol):
    r_s = float(gaussian_saturation_radius(n, a, b, log_tol))
    tail = mp_log_integral(n, a, b, r_s, INF) - mp_log_integral(n, a, b, 0.0, INF)
    # the tail beyond r_s is below exp(-log_tol), and not wastefully far below
    assert -log_tol - 6 <= tail <= -log_tol
    # never beyond the plain Gaussian bound around the peak (curvature <= -a)
    assert r_s <= (_peak(n, a, b) + math.sqrt(2 * (log_tol + 1) / a)) * (1 + 1e-12)


def test_saturation_radius_with_own_integral():
    rng = np.random.default_rng(2)
    a, b = 10 ** rng.uniform(-4, 4, 200), rng.normal(size=200) * 10 ** rng.uniform(-2, 3, 200)
    for n in (1, 7, 400):
        r_s = gaussian_saturation_radius(n, a, b, log_tol=10.0)
        gap = log_gaussian_radial_integral(n, a, b, np.inf) - log_gaussian_radial_integral(
            n, a, b, r_s)
        assert (gap >= -1e-12).all() and (gap <= -math.log1p(-math.exp(-10.0))).all()


def test_saturation_radius_shapes_and_invalid():
    out = gaussian_saturation_radius(5, np.ones((3, 1)), np.zeros(4))
    assert out.shape == (3, 4) and np.isfinite(out).all()
    assert np.isnan(gaussian_saturation_radius(5, [-1.0, 0.0], 0.0)).all()
    assert isinstance(gaussian_saturation_radius(5, 1.0, 0.0), float)


# --------------------------------------------------------------------------------------------
# sphere, ball
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, area", [(1, 2.0), (2, 2 * math.pi), (3, 4 * math.pi)])
def test_sphere_area_small_n(n, area):
    assert math.isclose(log_sphere_area(n), math.log(area), rel_tol=1e-15, abs_tol=1e-15)


@pytest.mark.parametrize("n, vol", [(1, lambda r: 2 * r), (2, lambda r: math.pi * r * r),
                                    (3, lambda r: 4 / 3 * math.pi * r**3)])
@pytest.mark.parametrize("r", [1e-3, 0.7, 1.0, 12.5])
def test_ball_volume_small_n(n, vol, r):
    assert math.isclose(log_ball_volume(n, r), math.log(vol(r)), rel_tol=1e-15, abs_tol=1e-15)


@pytest.mark.parametrize("n", [7.5, 100, 1e6, 1e10, 3.3e10])
@pytest.mark.parametrize("r", [1e-3, 1.0, 37.0])
def test_sphere_and_ball_vs_mpmath(n, r):
    with mp.workdps(40):
        N = mp.mpf(n)
        area = mp.log(2) + N / 2 * mp.log(mp.pi) - mp.loggamma(N / 2)
        ball = N / 2 * mp.log(mp.pi) + N * mp.log(mp.mpf(r)) - mp.loggamma(N / 2 + 1)
    assert abs(log_sphere_area(n) - area) <= 1e-12 + 8e-16 * abs(area)
    assert abs(log_ball_volume(n, r) - ball) <= 1e-12 + 8e-16 * abs(ball)


def test_ball_volume_edges_and_broadcast():
    assert log_ball_volume(4, 0.0) == -np.inf
    assert np.isnan(log_ball_volume(4, -1.0)) and np.isnan(log_sphere_area(0.0))
    out = log_ball_volume(np.array([1.0, 2.0, 3.0])[:, None], np.array([0.5, 2.0]))
    assert out.shape == (3, 2)
    # vol(B^n) = |S^{n-1}| / n
    n = np.array([1.0, 2.0, 5.0, 1e4])
    np.testing.assert_allclose(log_ball_volume(n, 1.0), log_sphere_area(n) - np.log(n),
                               rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------
# uniform radial integral
# --------------------------------------------------------------------------------------------


def _mp_uniform(n, r_in, u):
    with mp.workdps(60):
        N = mp.mpf(n)
        u, r_in = mp.mpf(u), mp.mpf(r_in)
        return mp.log((u**N - r_in**N) / N)


@pytest.mark.parametrize(
    "n, r_in, r_out, R",
    [(1, 0.0, 2.0, INF), (3, 0.0, INF, 0.5), (3, 1.0, 2.0, 5.0), (3, 1.0, 2.0, 1.5),
     (1e10, 0.0, 3.0, INF), (1e10, 1.0, 1.0 + 1e-12, INF), (1e10, 2.0, 2.0 * (1 + 2e-16), INF),
     (1e10, 1.0, 1.0 + 1e-8, 7.0), (1e10, 0.999, 1.0, INF), (1e6, 5e-3, 1e4, 1e-2),
     (2.5, 1e-200, 1e-100, INF), (1e4, 1e-300, 1e300, 1e-3)],
)
def test_uniform_radial_integral_vs_mpmath(n, r_in, r_out, R):
    ref = _mp_uniform(n, r_in, min(r_out, R))
    got = float(log_uniform_radial_integral(n, r_in, r_out, R))
    assert abs(got - ref) <= 1e-12 + 4e-16 * abs(ref), (got, mp.nstr(ref, 20))


def test_uniform_radial_integral_empty_and_invalid():
    f = log_uniform_radial_integral
    assert f(3, 1.0, 2.0, 1.0) == -np.inf  # R == r_in
    assert f(3, 1.0, 0.5, INF) == -np.inf  # r_out < r_in: the ray misses the box
    assert f(3, 0.0, -INF, INF) == -np.inf
    assert f(3, 0.0, 2.0, 0.0) == -np.inf
    assert f(3, 0.0, INF, INF) == INF
    assert np.isnan(f(3, -1.0, 2.0, INF))
    out = f(4, np.zeros(5), np.linspace(-1, 3, 5), np.array([[INF], [1.5]]))
    assert out.shape == (2, 5)
    cut = 4 * math.log(1.5) - math.log(4)
    np.testing.assert_allclose(out[1], [-np.inf, -np.inf, -math.log(4), cut, cut])


# --------------------------------------------------------------------------------------------
# logsumexp_mean, log1mexp
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [[0.0], [1.0, 2.0, 3.0], [-np.inf, 0.0, -5.0], [-1e10, -1e10 + 1e-3],
     [1e11, 1e11 - 40.0, -np.inf], list(np.linspace(-800, 800, 101))],
)
def test_logsumexp_mean_vs_scipy(x):
    x = np.asarray(x)
    assert math.isclose(logsumexp_mean(x), logsumexp(x) - math.log(x.size), rel_tol=1e-15,
                        abs_tol=1e-13)


def test_logsumexp_mean_special():
    assert logsumexp_mean([-np.inf, -np.inf]) == -np.inf
    assert logsumexp_mean([0.0, np.inf, -np.inf]) == np.inf
    assert math.isnan(logsumexp_mean([0.0, np.nan]))
    assert logsumexp_mean(np.zeros((2, 3))) == 0.0
    # tiny tail beyond the maximum is kept, not rounded away by log(1 + s)
    assert logsumexp_mean([0.0, -40.0]) == pytest.approx(math.log1p(math.exp(-40)) - math.log(2),
                                                         rel=1e-15)
    with pytest.raises(ValueError, match="log_values"):
        logsumexp_mean([])


def test_log1mexp_vs_mpmath():
    x = np.concatenate([np.logspace(-300, 2.9, 400), [math.log(2)]])
    got = log1mexp(x)
    with mp.workdps(50):
        # each form where it needs no more than 50 digits: 1 - e^{-x} rounds to 1 at x > 1e-50
        ref = np.array([float(mp.log(-mp.expm1(-mp.mpf(v))) if v < 1
                              else mp.log1p(-mp.exp(-mp.mpf(v)))) for v in x])
    np.testing.assert_allclose(got, ref, rtol=4e-16, atol=0)
    assert log1mexp(0.0) == -np.inf and log1mexp(np.inf) == 0.0
    assert np.isnan(log1mexp(-1.0))


def test_log1pmx_vs_mpmath():
    z = np.concatenate([-np.logspace(-12, 0, 300)[:-1], np.logspace(-12, 3, 300)])
    with mp.workdps(50):
        ref = np.array([float(mp.log1p(mp.mpf(v)) - mp.mpf(v)) for v in z])
    np.testing.assert_allclose(_math._log1pmx(z), ref, rtol=2e-14)


def test_docstring_examples():
    result = doctest.testmod(_math, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0
