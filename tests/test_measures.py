"""Measures: uniform boxes (anchor inside or outside, rays that miss), Gaussian means, objects
and per-parameter dicts."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from models import quadratic_problem
from volsk import LocalVolumeEstimator
from volsk._evaluate import ParameterSpace
from volsk._math import log_ball_volume
from volsk.measures import Gaussian, Lebesgue, MeasureContext, Uniform, resolve_measure


def context(model):
    theta = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    return MeasureContext(theta, torch.ones(theta.numel(), dtype=torch.bool),
                          ParameterSpace.of(model), model)


def bound_box(anchor, low, high):
    """A bound uniform measure on the box [low, high] around ``anchor`` (1-D arrays)."""
    anchor, low, high = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in
                         (anchor, low, high))
    model = torch.nn.Linear(anchor.numel(), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(anchor.reshape(1, -1))
    return Uniform(bounds=(high - low).numpy() / 2, mean=((high + low) / 2).numpy()).bind(
        context(model))


# ------------------------------------------------------------------------ ray–box geometry
def test_slab_intersection_for_anchor_inside_and_outside_and_zero_components():
    box = bound_box([0.2, 0.0], [-1.0, -1.0], [1.0, 1.0])  # anchor inside
    U = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    coef = box.ray_coefficients(U)
    np.testing.assert_allclose(coef["r_in"], 0.0)
    np.testing.assert_allclose(coef["r_out"], [0.8, 1.2, 1.0, 1.25])

    box = bound_box([2.0, 0.5], [-1.0, -1.0], [1.0, 1.0])  # anchor outside in coordinate 0
    U = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]], dtype=torch.float64)
    coef = box.ray_coefficients(U)
    # towards the box: enters at 1, leaves at 3; away from it, or moving only coordinate 1
    # (u_0 = 0 while the anchor is outside slab 0), the ray misses
    np.testing.assert_allclose(coef["r_in"][0], 1.0)
    np.testing.assert_allclose(coef["r_out"][0], 3.0)
    assert coef["r_out"][1] < coef["r_in"][1]
    assert coef["r_in"][2] == math.inf and coef["r_out"][2] == -math.inf
    np.testing.assert_allclose([coef["r_in"][3], coef["r_out"][3]], [1 / 0.6, 1.5 / 0.8])
    log_I = box.log_radial_integral(coef, np.full(4, np.inf))
    assert np.isfinite(log_I[[0, 3]]).all() and np.isneginf(log_I[[1, 2]]).all()
    # rays that miss need no radius search
    assert box.search_limit(coef, 4)[1] == 0.0 and box.search_limit(coef, 4)[2] == 0.0


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    zero_fraction=st.sampled_from([0.0, 0.5]),
)
def test_ray_is_inside_the_box_exactly_on_r_in_to_r_out(n, seed, zero_fraction):
    rng = np.random.default_rng(seed)
    anchor = rng.uniform(-2, 2, n)
    half = rng.uniform(0.1, 1.5, n)
    centre = rng.uniform(-0.5, 0.5, n)
    u = rng.standard_normal(n)
    u[rng.random(n) < zero_fraction] = 0.0
    if not u.any():
        u[0] = 1.0
    u /= np.linalg.norm(u)
    box = bound_box(anchor, centre - half, centre + half)
    coef = box.ray_coefficients(torch.as_tensor(u[None, :]))
    r_in, r_out = float(coef["r_in"][0]), float(coef["r_out"][0])
    r = np.linspace(0.0, 8.0, 4001)
    points = anchor + r[:, None] * u
    inside = np.all((points >= centre - half) & (points <= centre + half), axis=1)
    claimed = (r >= r_in) & (r <= r_out)
    near_edge = (np.abs(r - r_in) < 1e-9) | (np.abs(r - r_out) < 1e-9)
    np.testing.assert_array_equal(inside[~near_edge], claimed[~near_edge])


# ------------------------------------------------------------------------- ground truths
@pytest.mark.parametrize("n, anchor", [(1, 0.0), (3, 0.2), (20, 0.0), (20, -0.25)])
def test_uniform_ball_inside_box_is_exact(n, anchor):
    # cost mse = |δ|²: the neighbourhood is the ball of radius 0.1; the box [−0.5, 0.5]^n
    # contains it, so its prior mass is vol(ball) / (2b)^n
    model, X = quadratic_problem(np.ones(n), anchor=np.full(n, anchor))
    cutoff, b = 0.01, 0.5
    est = LocalVolumeEstimator(cutoff, "uniform", cost="mse", bounds=b, n_samples=8, rtol=1e-6,
                               random_state=0).fit(model, X)
    truth = log_ball_volume(n, 0.1) - n * math.log(2 * b)
    assert abs(est.log_volume_ - truth) < n * 1e-6
    assert (est.samples_["status"] == "crossed").all()


def brute_force_box_fraction(anchor, radius, b, m=2_000_000, seed=0):
    """Fraction of uniform points of [−b, b]^n within ``radius`` of ``anchor``, and its SE."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-b, b, (m, len(anchor)))
    p = float(np.mean(np.sum((points - anchor) ** 2, axis=1) < radius**2))
    return p, math.sqrt(p * (1 - p) / m)


@pytest.mark.parametrize(
    "anchor",
    [[0.3, -0.2, 0.1], [0.6, 0.1, 0.0]],
    ids=["anchor inside the box", "anchor outside the box"],
)
def test_uniform_box_cutting_the_ball_matches_brute_force(anchor):
    n, b, cutoff = 3, 0.5, 0.16  # ball radius 0.4: the box cuts it
    model, X = quadratic_problem(np.ones(n), anchor=anchor)
    est = LocalVolumeEstimator(cutoff, "uniform", cost="mse", bounds=b, n_samples=3000,
                               rtol=1e-6, random_state=0).fit(model, X)
    p_mc, se_mc = brute_force_box_fraction(np.asarray(anchor), 0.4, b)
    w = np.exp(est.sample_log_volumes_)
    p_est, se_est = float(np.mean(w)), float(np.std(w, ddof=1) / math.sqrt(w.size))
    assert 0.05 < p_mc < 0.95
    assert abs(p_est - p_mc) < 3 * math.hypot(se_mc, se_est)
    if anchor[0] > b:
        assert np.isneginf(est.sample_log_volumes_).any()  # some rays miss the box


def test_every_direction_missing_the_box_raises():
    # anchor 2 away from the box, neighbourhood of radius 0.1: no ray reaches the box in time
    model, X = quadratic_problem(np.ones(3), anchor=[2.0, 2.0, 2.0])
    est = LocalVolumeEstimator(0.01, "uniform", cost="mse", bounds=0.5, n_samples=20,
                               random_state=0)
    with pytest.raises(ValueError, match="zero prior mass.*box"):
        est.fit(model, X)


def _gaussian_case(measure, anchor, sigma, cutoff, k=800):
    model, X = quadratic_problem(np.full(len(anchor), 1.0 / sigma**2), anchor=anchor)
    return LocalVolumeEstimator(cutoff, measure, cost="mse", n_samples=k, rtol=1e-6,
                                random_state=0).fit(model, X)


def test_gaussian_with_nonzero_mean_matches_noncentral_chi2():
    anchor = np.array([0.3, -0.2, 0.5, 0.0, 0.1, 0.4])
    mean = np.array([0.5, 0.1, 0.2, -0.3, 0.0, 0.6])
    sigma, cutoff = 0.5, 2.0
    est = _gaussian_case(Gaussian(sigma=sigma, mean=mean), anchor, sigma, cutoff)
    truth = stats.ncx2.logcdf(cutoff, df=anchor.size, nc=np.sum(((anchor - mean) / sigma) ** 2))
    w = np.exp(est.sample_log_volumes_ - est.sample_log_volumes_.max())
    se = float(np.std(w, ddof=1) / np.mean(w) / math.sqrt(w.size))
    assert se < 0.05
    assert abs(est.log_volume_ - truth) < 4 * se + 1e-4
    # the same prior with the mean as a {parameter name: value} dict: the same estimate
    as_dict = _gaussian_case(Gaussian(sigma={"weight": sigma}, mean={"weight": mean}), anchor,
                             sigma, cutoff)
    np.testing.assert_array_equal(as_dict.sample_log_volumes_, est.sample_log_volumes_)


@pytest.mark.parametrize(
    "obj, name, kwargs",
    [
        (Lebesgue(), "lebesgue", {}),
        (Gaussian(sigma=0.4), "gaussian", {"sigma": 0.4}),
        (Uniform(bounds=0.6), "uniform", {"bounds": 0.6}),
    ],
)
def test_measure_objects_are_accepted_wherever_a_string_is(obj, name, kwargs):
    model, X = quadratic_problem(np.ones(4), anchor=[0.1, 0.0, -0.1, 0.2])
    by_object = LocalVolumeEstimator(0.05, obj, cost="mse", n_samples=6,
                                     random_state=0).fit(model, X)
    by_name = LocalVolumeEstimator(0.05, name, cost="mse", n_samples=6, random_state=0,
                                   **kwargs).fit(model, X)
    np.testing.assert_array_equal(by_object.sample_log_volumes_, by_name.sample_log_volumes_)
    assert resolve_measure(obj) is obj


def test_per_parameter_dicts_equal_arrays_and_bad_dicts_name_the_problem():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
    net[0].bias.requires_grad_(False)
    space = ParameterSpace.of(net)
    theta = torch.cat([dict(net.named_parameters())[k].detach().reshape(-1).double()
                       for k in space.names])
    ctx = MeasureContext(theta, torch.ones(theta.numel(), dtype=torch.bool), space, net)
    per_tensor = {"0.weight": 0.1, "2.weight": torch.full((2, 2), 0.3), "2.bias": 0.2}
    array = np.r_[np.full(6, 0.1), np.full(4, 0.3), np.full(2, 0.2)]
    torch.testing.assert_close(Gaussian(sigma=per_tensor).resolve_sigma(ctx),
                               torch.as_tensor(array))
    torch.testing.assert_close(Uniform(bounds=per_tensor).resolve_bounds(ctx),
                               torch.as_tensor(array))
    with pytest.raises(ValueError, match=r"frozen.*0\.bias"):
        Gaussian(sigma=per_tensor | {"0.bias": 0.1}).resolve_sigma(ctx)
    with pytest.raises(ValueError, match=r"no value for parameters \['2\.bias'\]"):
        Gaussian(sigma={"0.weight": 0.1, "2.weight": 0.3}).resolve_sigma(ctx)
    with pytest.raises(ValueError, match=r"sigma\['2\.weight'\].*shape \(2, 2\)"):
        Gaussian(sigma=per_tensor | {"2.weight": np.ones(3)}).resolve_sigma(ctx)
    with pytest.raises(ValueError, match="bounds must be > 0"):
        Uniform(bounds=per_tensor | {"2.bias": 0.0}).resolve_bounds(ctx)
    with pytest.raises(ValueError, match="mean"):
        Gaussian(sigma=0.1, mean="middle").bind(ctx)
