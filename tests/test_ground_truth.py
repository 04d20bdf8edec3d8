"""The estimator against closed forms, scipy's noncentral chi-square and brute-force Monte Carlo."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import log_ellipsoid_volume, quadratic_problem
from volsk import LocalVolumeEstimator
from volsk._math import log_ball_volume


def relative_standard_error(sample_log_volumes):
    """Standard error of the mean of exp(ℓ) relative to the mean (≈ standard error of its log)."""
    w = np.exp(sample_log_volumes - np.max(sample_log_volumes))
    return float(np.std(w, ddof=1) / np.mean(w) / math.sqrt(w.size))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_isotropic_ball_lebesgue_matches_closed_form(n):
    model, X = quadratic_problem(np.ones(n))
    cutoff = 0.01
    est = LocalVolumeEstimator(cutoff, "lebesgue", cost="mse", n_samples=16, rtol=1e-6,
                               random_state=0).fit(model, X)
    truth = log_ball_volume(n, math.sqrt(cutoff))
    assert abs(est.log_volume_ - truth) < 1e-3
    assert np.ptp(est.sample_log_volumes_) < 1e-3  # every direction sees the same radius
    np.testing.assert_allclose(est.radii_, math.sqrt(cutoff), rtol=1e-6)


def test_diagonal_ellipsoid_exact_with_its_curvature_and_naive_far_below():
    n = 40
    lam = np.logspace(0, 4, n)  # condition number 1e4
    model, X = quadratic_problem(lam)
    cutoff = 0.02
    truth = log_ellipsoid_volume(lam, cutoff)
    exact = LocalVolumeEstimator(cutoff, "lebesgue", preconditioner=lam, cost="mse",
                                 preconditioner_eps=0.0, n_samples=50, rtol=1e-6,
                                 random_state=1).fit(model, X)
    assert abs(exact.log_volume_ - truth) < 1e-3
    assert np.ptp(exact.sample_log_volumes_) < 1e-3
    k = 200
    naive = LocalVolumeEstimator(cutoff, "lebesgue", cost="mse", n_samples=k, rtol=1e-6,
                                 random_state=1).fit(model, X)
    assert naive.log_volume_ <= truth + math.log(k)
    assert naive.log_volume_ < truth - 5.0  # and far below it


def _gaussian_ball_case(sigma, anchor, cutoff, k, seed=0, preconditioner=None):
    """C(δ) = Σ δ_i²/σ_i² under the prior N(0, diag σ²): a ball in whitened coordinates,
    whose prior mass is the noncentral chi-square CDF."""
    sigma = np.asarray(sigma, dtype=np.float64)
    model, X = quadratic_problem(1.0 / sigma**2, anchor=anchor)
    sig = float(sigma[0]) if np.ptp(sigma) == 0 else sigma
    est = LocalVolumeEstimator(cutoff, "gaussian", cost="mse", sigma=sig, n_samples=k,
                               preconditioner=preconditioner, preconditioner_eps=0.0,
                               rtol=1e-6, random_state=seed).fit(model, X)
    lam = float(np.sum((np.asarray(anchor) / sigma) ** 2))
    truth = stats.ncx2.logcdf(cutoff, df=sigma.size, nc=lam)
    return est, truth


def test_gaussian_ball_around_nonzero_anchor_matches_noncentral_chi2():
    n = 10
    est, truth = _gaussian_ball_case(np.full(n, 0.5), np.full(n, 0.3), cutoff=2.0, k=1000)
    # Tolerance from the estimator's own spread: 4 relative standard errors of the mean weight
    # (log µ̂ − log µ ≈ relative error), floored by the radius tolerance n·rtol.
    se = relative_standard_error(est.sample_log_volumes_)
    assert se < 0.05, "the check would be too loose to fail"
    assert abs(est.log_volume_ - truth) < 4 * se + 1e-4


def test_gaussian_ball_with_per_parameter_sigma_matches_noncentral_chi2():
    sigma = np.array([0.2, 0.5, 1.0, 2.0, 3.0])
    anchor = np.array([0.1, -0.3, 0.5, 1.0, -2.0])
    # the ellipsoid's own curvature as preconditioner makes every radius exact, so the spread
    # left is the prior's variation across directions
    est, truth = _gaussian_ball_case(sigma, anchor, cutoff=3.0, k=1000, seed=3,
                                     preconditioner=1.0 / sigma**2)
    se = relative_standard_error(est.sample_log_volumes_)
    assert se < 0.05
    assert abs(est.log_volume_ - truth) < 4 * se + 1e-4


class TinyNet(torch.nn.Module):
    """logits = tanh(w·x + b) · v: four parameters, nonlinear in them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.3], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([-0.4], dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.tensor([1.5, -0.7], dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(self.w * x + self.b)[:, None] * self.v


def _tiny_kl(params, x, anchor_logp):
    """KL(anchor ‖ θ') for a batch of parameter vectors (M, 4) → (M,)."""
    w, b, v = params[:, :1], params[:, 1:2], params[:, 2:]
    h = torch.tanh(w * x[None, :] + b)  # (M, N)
    logp = torch.log_softmax(h[..., None] * v[:, None, :], -1)
    return (anchor_logp.exp() * (anchor_logp - logp)).sum(-1).mean(-1)


def test_tiny_nonlinear_net_kl_matches_brute_force_star_domain_mass():
    net = TinyNet()
    x = torch.linspace(-2, 2, 25, dtype=torch.float64)
    cutoff, sigma = 0.05, 1.0
    est = LocalVolumeEstimator(cutoff, "gaussian", sigma=sigma, n_samples=3000, rtol=1e-4,
                               random_state=0).fit(net, x)
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    with torch.no_grad():
        anchor_logp = torch.log_softmax(net(x), -1)
        gen = torch.Generator().manual_seed(123)
        m = 40_000
        draws = sigma * torch.randn(m, 4, generator=gen, dtype=torch.float64)
        inside = torch.ones(m, dtype=torch.bool)
        # star domain: the whole segment θ → θ' stays below the cutoff (dense checks)
        for t in torch.linspace(0, 1, 301, dtype=torch.float64)[1:]:
            point = theta + t * (draws - theta)
            inside &= _tiny_kl(point, x, anchor_logp) < cutoff
    p_mc = inside.double().mean().item()
    se_mc = math.sqrt(p_mc * (1 - p_mc) / m)
    w = np.exp(est.sample_log_volumes_)
    p_est, se_est = float(np.mean(w)), float(np.std(w, ddof=1) / math.sqrt(w.size))
    assert 0.01 < p_mc < 0.9, "choose a cutoff that makes the brute force informative"
    assert abs(p_est - p_mc) < 3 * math.hypot(se_mc, se_est)
    assert math.isclose(est.log_volume_, math.log(p_est), rel_tol=1e-9)
