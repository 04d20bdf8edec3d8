"""The radius search (volsk._radius) and its search pilot (volsk._pipeline.calibrate_search)."""

import math

import numpy as np
import pytest

from models import quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk._pipeline import TAYLOR_START, calibrate_search, estimate_directions, prepare
from volsk._radius import _bent_secant, _one_point_step, find_radii

CUT = 0.5


def quadratic(q):
    """C(r) = ½ q r² along each ray, with its Taylor coefficients."""
    q = np.asarray(q, dtype=np.float64)
    return (lambda pos, r: 0.5 * q[pos] * r**2,
            lambda: (np.zeros(q.size), np.zeros(q.size), q))


def test_taylor_start_is_exact_for_a_quadratic_cost():
    evaluate, taylor = quadratic([1.0, 4.0, 100.0])
    res = find_radii(evaluate, taylor, np.full(3, np.inf), CUT, 1e-9)
    np.testing.assert_allclose(res.radii, [1.0, 0.5, 0.1], rtol=1e-12)
    assert res.evaluations.tolist() == [2, 2, 2]  # the JVP counts as one


@pytest.mark.parametrize("start", [1e-3, 0.3, 1.0, 40.0])
def test_pilot_start_finds_every_crossing_from_far_away(start):
    q = np.array([1e-4, 1.0, 4.0, 1e4])  # radii 100, 1, 0.5, 0.01
    evaluate, _ = quadratic(q)
    res = find_radii(evaluate, None, np.full(4, np.inf), CUT, 1e-9, start=start)
    np.testing.assert_allclose(res.radii, 1 / np.sqrt(q), rtol=1e-8)
    assert (res.status == 0).all()
    # no JVP: every evaluation is a real one; one from the right radius, a few from afar
    assert res.evaluations.min() >= 1 and res.evaluations.max() <= 12


def test_pilot_start_at_the_crossing_takes_one_evaluation():
    evaluate, _ = quadratic([4.0, 4.0])
    res = find_radii(evaluate, None, np.full(2, np.inf), CUT, 1e-9, start=0.5)
    assert res.evaluations.tolist() == [1, 1]
    np.testing.assert_allclose(res.radii, 0.5)


@pytest.mark.parametrize("slope,bend", [(2.0, 0.0), (3.0, 0.8), (4.3, -1.5), (2.2, 2.0)])
@pytest.mark.parametrize("log_ratio", [-0.4, -0.05, 0.1, 0.5])
def test_one_point_step_is_exact_for_its_model(slope, bend, log_ratio):
    # log(e/target) = s x + ½ κ x² with x = log(r/R): one step from r lands on R
    x = log_ratio
    e = CUT * math.exp(slope * x + 0.5 * bend * x * x)
    step = float(_one_point_step(np.array(e), CUT, slope, bend))
    assert step == pytest.approx(-x, abs=1e-12)


@pytest.mark.parametrize("bend", [-1.0, 0.5, 3.0])
def test_bent_secant_is_exact_for_a_parabola_in_log_log(bend):
    # L(x) = s (x − x_R) + ½ κ (x − x_R)², bracketed by two points around x_R
    s, x_R = 2.5, 0.3
    x_lo, x_hi = 0.1, 0.45
    L = lambda x: s * (x - x_R) + 0.5 * bend * (x - x_R) ** 2  # noqa: E731
    y = float(_bent_secant(np.array(L(x_lo)), np.array(L(x_hi)), x_hi - x_lo, bend))
    assert x_lo + y == pytest.approx(x_R, abs=1e-12)


def test_one_point_step_with_the_pilot_growth_lands_in_one_step():
    # a cost whose log–log growth is exactly s x + ½ κ x² about R for every ray: from the
    # pilot's start, the second evaluation is the crossing
    R = np.array([0.8, 1.0, 1.3])
    s, k = 3.0, 0.7

    def evaluate(pos, r):
        x = np.log(r / R[pos])
        return CUT * np.exp(s * x + 0.5 * k * x * x)

    res = find_radii(evaluate, None, np.full(3, np.inf), CUT, 1e-12, start=1.0, slope=s,
                     bend=k)
    np.testing.assert_allclose(res.radii, R, rtol=1e-10)
    assert res.evaluations.tolist() == [2, 1, 2]


def test_nan_counts_as_crossed_and_the_first_crossing_is_kept():
    # NaN beyond r = 2; the crossing at r = 1 lies below it
    def evaluate(pos, r):
        return np.where(r > 2.0, np.nan, 0.5 * r**2)

    res = find_radii(evaluate, None, np.full(1, np.inf), CUT, 1e-9, start=5.0)
    assert res.radii[0] == pytest.approx(1.0, rel=1e-8)


def test_unbounded_rays_stop_at_the_limit():
    evaluate, _ = quadratic([1e-8, 1.0])
    res = find_radii(evaluate, None, np.array([50.0, 50.0]), CUT, 1e-6, start=1.0)
    assert np.isinf(res.radii[0]) and res.status[0] == 1
    assert res.radii[1] == pytest.approx(1.0, rel=1e-5)


def test_decreasing_then_increasing_cost_from_a_pilot_start():
    # cross-entropy-like: the cost first falls below its anchor value, then rises
    def evaluate(pos, r):
        return -0.2 * r + 0.1 * r**3

    anchor = 0.0
    res = find_radii(evaluate, None, np.full(1, np.inf), CUT, 1e-9, anchor_cost=anchor,
                     start=0.5)
    r = res.radii[0]
    assert -0.2 * r + 0.1 * r**3 == pytest.approx(CUT, rel=1e-8)
    grid = np.linspace(0, r, 10_001)[:-1]
    assert (-0.2 * grid + 0.1 * grid**3 < CUT).all()  # the first crossing


def problem_of(est, model, X):
    """The problem a fitted estimator solved (same settings, eps and seed)."""
    eps = est.preconditioner_eps if est.preconditioner_eps_ is None else est.preconditioner_eps_
    return prepare(model, X, None, est._settings(), eps=eps, n_directions=est.n_samples,
                   seed=est.seed_)


def _isotropic_estimator(rtol=1e-6, **kw):
    model, X = quadratic_problem(np.full(6, 2.0))
    est = LocalVolumeEstimator(0.1, "lebesgue", cost="mse", n_samples=20, rtol=rtol,
                               random_state=0, **kw)
    return est.fit(model, X), model, X


def test_pilot_of_an_isotropic_quadratic():
    est, model, X = _isotropic_estimator()
    # C(r) = 2 r² on every ray: R = sqrt(0.05), log–log slope 2, no bend
    start = calibrate_search(problem_of(est, model, X), est.seed_)
    assert start.radius == pytest.approx(math.sqrt(0.05), rel=1e-6)
    assert start.slope == pytest.approx(2.0, abs=1e-6)
    assert start.bend == pytest.approx(0.0, abs=1e-4)
    assert est.n_pilot_evaluations_ == start.evaluations > 0
    # every ray starts at its own crossing: one evaluation each
    assert (est.samples_["evaluations"] == 1).all()


@pytest.mark.parametrize("preconditioner", [None, "diag_hessian"])
def test_pilot_start_and_taylor_start_find_the_same_radii(preconditioner):
    # float64: a float32 forward pass is noisy at ~1e-6 of the cost, so radii found to
    # rtol 1e-8 by two searches would only agree to that noise
    net, X = small_mlp()
    net, X = net.double(), X.double()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=40, rtol=1e-8, random_state=3,
                               preconditioner=preconditioner, preconditioner_eps=1e-2)
    est.fit(net, X)
    problem = problem_of(est, net, X)
    taylor = estimate_directions(problem, range(40), est.seed_, start=TAYLOR_START)
    pilot = estimate_directions(problem, range(40), est.seed_)
    np.testing.assert_allclose(pilot.radius, est.radii_, rtol=0, atol=0)
    # both meet |C − ε| ≤ rtol·ε on a cost rising steeply through ε: the radii agree closely
    np.testing.assert_allclose(pilot.radius, taylor.radius, rtol=1e-7)


@pytest.mark.parametrize("preconditioner", [None, "diag_hessian"])
def test_pilot_start_takes_no_more_evaluations_than_taylor_start(preconditioner):
    # at the default rtol; the JVP of the Taylor start counts as one evaluation
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=200, rtol=1e-3, random_state=3,
                               preconditioner=preconditioner, preconditioner_eps=1e-2)
    est.fit(net, X)
    taylor = estimate_directions(problem_of(est, net, X), range(200), est.seed_,
                                 start=TAYLOR_START)
    assert est.samples_["evaluations"].mean() <= taylor.evaluations.mean()


def test_pilot_does_not_depend_on_the_directions_drawn():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=10, random_state=1).fit(net, X)
    problem = problem_of(est, net, X)
    a = calibrate_search(problem, est.seed_)
    # a fit with more directions and another batch size starts from the same pilot
    big = LocalVolumeEstimator(sigma=0.5, n_samples=30, batch_size=7, random_state=1)
    big.fit(net, X)
    assert calibrate_search(problem_of(big, net, X), big.seed_) == a
    np.testing.assert_array_equal(big.sample_log_volumes_[:10], est.sample_log_volumes_)
    # another seed: another pilot stream
    assert calibrate_search(problem, est.seed_ + 1) != a
