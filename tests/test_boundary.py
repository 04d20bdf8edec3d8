"""Boundary-fitted preconditioners: exact on grouped ellipsoids, unbiased, a map fixed by pilots."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import log_ellipsoid_volume, quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk import _pipeline as pipeline
from volsk._math import log_ball_volume
from volsk.preconditioners import BoundaryFitted, BoundaryMap, resolve_preconditioner
from volsk.preconditioners.boundary import fit_group_curvature

pytestmark = pytest.mark.filterwarnings("ignore::volsk.results.LowEffectiveSampleSizeWarning")


def relative_standard_error(sample_log_volumes):
    """Standard error of the mean of exp(ℓ) relative to the mean (as in test_ground_truth)."""
    w = np.exp(sample_log_volumes - np.max(sample_log_volumes))
    return float(np.std(w, ddof=1) / np.mean(w) / math.sqrt(w.size))


class Grouped(torch.nn.Module):
    """x @ cat(w_1, …, w_T): one bias-free linear output whose weight is split in tensors."""

    def __init__(self, sizes):
        super().__init__()
        self.parts = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in sizes])

    def forward(self, x):
        return (x @ torch.cat(list(self.parts)))[:, None]


def grouped_ellipsoid(sizes, curvatures):
    """mse = Σ λ_t |δ_t|² with λ constant on each tensor t (X as in quadratic_problem)."""
    lam = np.concatenate([np.full(s, c) for s, c in zip(sizes, curvatures)])
    X = torch.diag(torch.as_tensor(np.sqrt(lam.size * lam)))
    return Grouped(sizes), X, lam


class Fixed:
    """A preconditioner that binds to a given map (for comparing with a fitted one)."""

    def __init__(self, bound):
        self.bound = bound

    def bind(self, ctx):
        return self.bound


def test_grouped_ellipsoid_is_exact_after_the_fit():
    model, X, lam = grouped_ellipsoid([10, 20, 30], [1.0, 30.0, 1000.0])
    cutoff, k = 0.02, 50
    truth = log_ellipsoid_volume(lam, cutoff)
    est = LocalVolumeEstimator(cutoff, "lebesgue", BoundaryFitted(base="naive", groups="tensor"),
                               k, cost="mse", rtol=1e-6, random_state=0).fit(model, X)
    naive = LocalVolumeEstimator(cutoff, "lebesgue", None, k, cost="mse", rtol=1e-6,
                                 random_state=0).fit(model, X)
    # the region is a ball in the fitted coordinates: every direction gives the volume
    assert abs(est.log_volume_ - truth) < 1e-3
    assert np.ptp(est.sample_log_volumes_) < 1e-3
    assert est.effective_sample_size_ == pytest.approx(k)
    assert naive.log_volume_ < truth - 5.0
    table = est.boundary_pilot_
    assert table["selected"].sum() == 1 and table["accepted"].iloc[-1]
    assert table["ess"].iloc[-1] == pytest.approx(table["directions"].iloc[-1])


def test_fit_recovers_exact_group_coefficients():
    rng = np.random.default_rng(0)
    X = rng.random((30, 4))
    a = np.array([3.0, 0.5, 10.0, 1.0])
    np.testing.assert_allclose(fit_group_curvature(X, X @ a), a, rtol=1e-9)


@pytest.mark.parametrize("groups", ["tensor", "column", "row+column"])
def test_ball_stays_exact(groups):
    n, cutoff = 30, 0.01
    model, X = quadratic_problem(np.ones(n))
    est = LocalVolumeEstimator(cutoff, "lebesgue", BoundaryFitted(base="naive", groups=groups),
                               16, cost="mse", rtol=1e-6, random_state=0).fit(model, X)
    assert abs(est.log_volume_ - log_ball_volume(n, math.sqrt(cutoff))) < 1e-3
    assert np.ptp(est.sample_log_volumes_) < 1e-3


def test_gaussian_ball_around_nonzero_anchor_matches_noncentral_chi2():
    # as in test_ground_truth: the prior mass of a ball is the noncentral chi-square CDF
    n, sigma, cutoff, k = 10, 0.5, 2.0, 1000
    anchor = np.full(n, 0.3)
    model, X = quadratic_problem(np.full(n, 1.0 / sigma**2), anchor=anchor)
    est = LocalVolumeEstimator(cutoff, "gaussian", BoundaryFitted(base="naive", groups="column"),
                               k, cost="mse", sigma=sigma, rtol=1e-6,
                               random_state=0).fit(model, X)
    truth = stats.ncx2.logcdf(cutoff, df=n, nc=float(np.sum((anchor / sigma) ** 2)))
    se = relative_standard_error(est.sample_log_volumes_)
    assert se < 0.05, "the check would be too loose to fail"
    assert abs(est.log_volume_ - truth) < 4 * se + 1e-4


def test_estimate_over_seeds_is_unbiased_on_a_grouped_ellipsoid():
    # a small pilot leaves the fit imperfect (ESS < k), so the check has something to fail:
    # the mean of exp(log µ̂ − log µ) over seeds must be 1 within its standard error
    sizes = [4, 6, 8]
    model = Grouped(sizes)
    lam = np.logspace(0, 1.5, sum(sizes))  # not constant on any tensor: the fit is approximate
    X = torch.diag(torch.as_tensor(np.sqrt(lam.size * lam)))
    cutoff, k = 0.05, 20
    truth = log_ellipsoid_volume(lam, cutoff)
    strategy = BoundaryFitted(base="naive", groups="tensor", rounds=1, pilot_directions=8)
    ratios = np.array([
        math.exp(LocalVolumeEstimator(cutoff, "lebesgue", strategy, k, cost="mse", rtol=1e-6,
                                      random_state=seed).fit(model, X).log_volume_ - truth)
        for seed in range(40)])
    se = ratios.std(ddof=1) / math.sqrt(ratios.size)
    assert se > 1e-3, "the fit must not be exact, else this checks nothing"
    assert abs(ratios.mean() - 1.0) < 4 * se


def test_fitted_map_does_not_depend_on_the_final_directions():
    sizes = [5, 7, 9]
    model = Grouped(sizes)
    lam = np.logspace(0, 2, sum(sizes))
    X = torch.diag(torch.as_tensor(np.sqrt(lam.size * lam)))
    kw = dict(cutoff=0.05, measure="lebesgue", cost="mse", n_samples=12, random_state=3)
    est = LocalVolumeEstimator(preconditioner=BoundaryFitted(base="naive", groups="tensor"),
                               **kw).fit(model, X)
    # rebuild the fitted map through the pipeline stage alone and use it as a fixed map
    problem = pipeline.prepare(model, X, None, est._settings(), eps=1e-3, n_directions=12,
                               seed=3)
    problem, table, _ = pipeline.fit_boundary_map(problem, 3)
    fitted = problem.preconditioner
    assert isinstance(fitted, BoundaryMap)
    fixed = LocalVolumeEstimator(preconditioner=Fixed(fitted), **kw).fit(model, X)
    np.testing.assert_array_equal(fixed.sample_log_volumes_, est.sample_log_volumes_)
    np.testing.assert_array_equal(fixed.radii_, est.radii_)
    assert table.equals(est.boundary_pilot_)
    # the pilots are paid for: the search pilot's evaluations plus the rounds'
    assert est.n_pilot_evaluations_ > fixed.n_pilot_evaluations_


def test_boundary_map_has_unit_determinant_on_a_kfac_base():
    model, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="boundary")
    problem = pipeline.prepare(model, X, None, est._settings(), eps=1e-3, n_directions=4,
                               seed=0)
    base = problem.preconditioner.base  # the K-FAC map the correction goes before
    log_s = torch.randn(base.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = BoundaryMap(base, log_s - log_s.mean())
    dense = P.apply(torch.eye(P.n, dtype=torch.float64))
    assert abs(float(torch.linalg.slogdet(dense).logabsdet)) < 1e-9
    with pytest.raises(ValueError, match="sum to 0"):
        BoundaryMap(base, log_s - log_s.mean() + 0.1)


def test_fit_is_deterministic_and_partial_fit_extends_it():
    model, X = small_mlp()
    kw = dict(sigma=1.0, preconditioner="boundary", random_state=5)
    a = LocalVolumeEstimator(n_samples=8, **kw).fit(model, X)
    b = LocalVolumeEstimator(n_samples=8, **kw).fit(model, X)
    np.testing.assert_array_equal(a.sample_log_volumes_, b.sample_log_volumes_)
    assert a.boundary_pilot_.equals(b.boundary_pilot_)
    c = LocalVolumeEstimator(n_samples=4, **kw).fit(model, X).partial_fit(model, X, n_samples=4)
    np.testing.assert_array_equal(c.sample_log_volumes_, a.sample_log_volumes_)


def test_name_resolves_and_eps_auto_chooses_it_for_the_base():
    assert isinstance(resolve_preconditioner("boundary"), BoundaryFitted)
    model, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="boundary",
                               preconditioner_eps="auto", random_state=0).fit(model, X)
    assert est.preconditioner_eps_ in set(est.eps_pilot_["eps"])
    assert list(est.boundary_pilot_["round"]) == [0, 1, 2, 3, 4]
    plain = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0).fit(model, X)
    assert plain.boundary_pilot_ is None


def test_fit_leaves_the_model_untouched():
    model, X = small_mlp()
    model.train()
    model[2].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="boundary",
                         random_state=0).fit(model, X)
    assert model.training and not model[2].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    ({"groups": "layer"}, "groups"),
    ({"rounds": -1}, "rounds"),
    ({"rounds": 1.5}, "rounds"),
    ({"pilot_directions": 1}, "pilot_directions"),
    ({"shrinkage": -1.0}, "shrinkage"),
    ({"floor": float("nan")}, "floor"),
    ({"base": BoundaryFitted()}, "base"),
    ({"base": "bogus"}, "preconditioner must be"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner=BoundaryFitted(**kwargs))
    with pytest.raises(ValueError, match=match):
        est.fit(model, X)


@pytest.mark.parametrize("base", ["diag_hessian", "kfac"])
def test_large_mode_gives_the_vmapped_estimate_to_rounding(base):
    # diag_hessian streams the corrected map block by block (apply_block); kfac row by row
    net, X = small_mlp()
    net, X = net.double(), X.double()
    fits = [LocalVolumeEstimator(sigma=1.0, n_samples=6, evaluation=mode, random_state=0,
                                 preconditioner=BoundaryFitted(base=base, pilot_directions=12))
            .fit(net, X) for mode in ("vmap", "large")]
    vmapped, large = fits
    np.testing.assert_allclose(large.samples_["log_weight"], vmapped.samples_["log_weight"],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(large.sample_log_volumes_, vmapped.sample_log_volumes_,
                               rtol=1e-9)
    assert large.n_pilot_evaluations_ == vmapped.n_pilot_evaluations_
