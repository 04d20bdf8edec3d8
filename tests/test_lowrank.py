"""Low-rank + diagonal (volsk.preconditioners.lowrank, curvature.ggn_products): the full map at
rank n, exact on low-rank + isotropic ellipsoids, det P = 1 in the log domain."""

import numpy as np
import pytest
import torch
from torch import nn

from models import log_ellipsoid_volume, rotated_quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk.costs import make_cost
from volsk.preconditioners import LowRank, LowRankMap, PreconditionerContext, resolve_preconditioner
from volsk.preconditioners.curvature.ggn import ggn_diagonal, ggn_matrix
from volsk.preconditioners.curvature.ggn_products import (
    ggn_products,
    projected_ggn_diagonal,
    top_eigenpairs,
)
from volsk.preconditioners.curvature.target import curvature_target


def context(model, X, cost="kl", eps=1e-3, attention_mask=None):
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    ev = FunctionalModel(model, X, "cpu", forward_kwargs=kwargs)
    bound = make_cost(cost, ev.anchor_outputs(), mask=attention_mask)
    return PreconditionerContext(ev, bound, torch.ones(ev.space.n, dtype=torch.bool), eps=eps)


def low_rank_plus_isotropic(n=60, r=5, delta=0.5, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return delta * np.eye(n) + U @ np.diag(np.logspace(2, 4, r)) @ U.T


def test_names_resolve_to_lowrank():
    assert type(resolve_preconditioner("lowrank")) is LowRank
    assert repr(LowRank(rank=5)) == "LowRank(rank=5)"


def test_ggn_products_match_the_explicit_matrix_on_masked_tokens():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 5)

        def forward(self, ids, attention_mask=None):
            return self.head(torch.tanh(self.embed(ids)))

    ids = torch.randint(0, 7, (6, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0]] * 3 + [[1, 1, 1]] * 3)
    target = curvature_target(context(Tokens(), ids, attention_mask=mask))
    V = torch.randn(target.n_active, 4, dtype=torch.float64)
    torch.testing.assert_close(ggn_products(target, V), ggn_matrix(target) @ V, rtol=1e-10,
                               atol=1e-14)


def test_top_eigenpairs_are_the_ggn_eigenpairs():
    model, X = small_mlp(n=60)
    target = curvature_target(context(model, X))
    values, V, HV = top_eigenpairs(target, rank=4, power_iterations=6)
    expected = torch.linalg.eigvalsh(ggn_matrix(target)).flip(0)[:4]
    torch.testing.assert_close(values, expected, rtol=1e-8, atol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    H = ggn_matrix(target)
    torch.testing.assert_close(HV, H @ V, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(V.T @ HV, torch.diag(values), rtol=0, atol=1e-10)  # Ritz pairs
    assert float((HV - V * values).norm() / values[0]) < 1e-4


def test_hutchinson_of_the_projected_ggn_is_unbiased():
    model, X = small_mlp(n=60)
    target = curvature_target(context(model, X, "mse"))
    H = ggn_matrix(target)
    _, V, _ = top_eigenpairs(target, rank=3)
    P = torch.eye(target.n_active, dtype=torch.float64) - V @ V.T
    exact = torch.diagonal(P @ H @ P)
    estimate = projected_ggn_diagonal(target, V, probes=2000, seed=0)
    assert float((estimate - exact).norm() / exact.norm()) < 0.1
    # restricted to some coordinates, with no projection: probes supported on them
    cols = torch.tensor([0, 5, 40])
    sub = projected_ggn_diagonal(target, V[:, :0], probes=2000, seed=1, cols=cols)
    torch.testing.assert_close(sub, H.diagonal()[cols], rtol=0.15, atol=0)


# ------------------------------------------------------------------------------ exactness


@pytest.mark.filterwarnings("ignore::volsk.results.LowEffectiveSampleSizeWarning")
def test_lowrank_at_full_rank_reproduces_the_full_matrix_estimate():
    model, X = small_mlp(n=100)  # a Gauss–Newton matrix of full rank (no null space)
    # float64: the full-matrix map is applied in the model's dtype, LowRankMap in float64
    model, X = model.double(), X.double()
    n = sum(p.numel() for p in model.parameters())
    kw = dict(cutoff=0.1, sigma=1.0, cost="mse", n_samples=10, random_state=0, rtol=1e-8,
              preconditioner_eps=1e-3)
    full = LocalVolumeEstimator(preconditioner="hessian", **kw).fit(model, X)
    low = LocalVolumeEstimator(preconditioner=LowRank(rank=n), **kw).fit(model, X)
    np.testing.assert_allclose(low.sample_log_volumes_, full.sample_log_volumes_, rtol=0,
                               atol=1e-6)


def test_lowrank_is_exact_on_a_low_rank_plus_isotropic_ellipsoid():
    H = low_rank_plus_isotropic()
    model, X = rotated_quadratic_problem(H)  # mse(δ) = δᵀ H δ
    truth = log_ellipsoid_volume(np.linalg.eigvalsh(H), 0.01)
    est = LocalVolumeEstimator(0.01, "lebesgue", preconditioner=LowRank(rank=5,
                               power_iterations=4), cost="mse", preconditioner_eps=0.0,
                               n_samples=8, rtol=1e-8, random_state=0).fit(model, X)
    assert abs(est.log_volume_ - truth) < 1e-6 * abs(truth)
    assert np.ptp(est.sample_log_volumes_) < 1e-6
    diag = LocalVolumeEstimator(0.01, "lebesgue", preconditioner="diag_hessian", cost="mse",
                                preconditioner_eps=0.0, n_samples=8, rtol=1e-8,
                                random_state=0).fit(model, X)
    assert np.ptp(diag.sample_log_volumes_) > 1.0


# ----------------------------------------------------------------------------- the map


@pytest.mark.parametrize("route", ["exact", "hutchinson"])
def test_lowrank_map_is_symmetric_positive_definite_with_unit_determinant(route):
    model, X = small_mlp()
    ctx = context(model, X)
    pre = LowRank(rank=6, max_exact_outputs=100 if route == "exact" else 1)
    values, V, rho = pre.curvature(ctx)
    P = pre.bind(ctx)
    D = P.apply(torch.eye(ctx.n, dtype=torch.float64))
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(D).min()) > 0
    assert abs(float(torch.linalg.slogdet(D).logabsdet)) < 1e-9
    # ∝ V diag(p) Vᵀ + Π diag(s) Π
    Pi = torch.eye(ctx.n, dtype=torch.float64) - V @ V.T
    p = 1 / (values.abs().sqrt() + ctx.eps)
    s = 1 / (rho.abs().sqrt() + ctx.eps)
    expected = V @ torch.diag(p) @ V.T + Pi @ torch.diag(s) @ Pi
    expected /= torch.exp(torch.linalg.slogdet(expected).logabsdet / ctx.n)
    torch.testing.assert_close(D, expected, rtol=1e-9, atol=1e-12)
    other = P.with_eps(1.0)
    assert other.eigenvectors is P.eigenvectors
    assert abs(float(torch.linalg.slogdet(other.apply(torch.eye(ctx.n,
               dtype=torch.float64))).logabsdet)) < 1e-9


def test_exact_and_hutchinson_complements_agree():
    model, X = small_mlp(n=60)
    ctx = context(model, X, "mse")
    _, _, exact = LowRank(rank=4).curvature(ctx)
    _, _, sampled = LowRank(rank=4, max_exact_outputs=1, probes=2000).curvature(ctx)
    assert float((sampled - exact).norm() / exact.norm()) < 0.1
    target = curvature_target(ctx)
    values, V, _ = top_eigenpairs(target, rank=4)
    # the complement's curvature: diag(Π H Π)_i / |Π e_i|²
    H = ggn_matrix(target)
    Pi = torch.eye(target.n_active, dtype=torch.float64) - V @ V.T
    torch.testing.assert_close(exact, torch.diagonal(Pi @ H @ Pi) / Pi.diagonal(), rtol=1e-8,
                               atol=1e-14)
    assert torch.equal(ggn_diagonal(target) > 0, exact > 0)


def test_lowrank_map_of_a_diagonal_curvature_is_its_inverse_square_root():
    # coordinates 0 and 1 lie in span V: their complement curvature plays no part
    V = torch.eye(4, dtype=torch.float64)[:, :2]
    P = LowRankMap(torch.tensor([16.0, 4.0]), V, torch.tensor([0.0, 0.0, 1.0, 9.0]), eps=0.0,
                   exponent=0.5)
    D = P.apply(torch.eye(4, dtype=torch.float64))
    expected = torch.diag(torch.tensor([0.25, 0.5, 1.0, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(D, expected / torch.exp(torch.log(expected.diagonal()).mean()))


def test_lowrank_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner=LowRank(rank=0),
                             random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))
    with pytest.raises(ValueError, match="'hessian'"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner="lowrank",
                             cost=lambda out, anchor: ((out - anchor) ** 2).mean(),
                             random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))
