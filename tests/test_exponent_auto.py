"""preconditioner_exponent="auto" (the exponent chosen with eps by pilot), the maps'
``with_exponent``, and the full-Hessian map applied in the model's dtype."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from torch import nn

from models import log_ellipsoid_volume, rotated_quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk._pipeline import select_eps
from volsk._problem import prepare_problem
from volsk.measures import Gaussian
from volsk.preconditioners import (
    EXPONENT_GRID,
    DiagHessian,
    DiagonalMap,
    EigenMap,
    Hessian,
    KroneckerMap,
    LowRankMap,
    choose_exponent,
)
from volsk.preconditioners.kfac import KroneckerBlock
from volsk.preconditioners.maps import IdentityMap
from volsk.preconditioners.selection import (
    EPS_COLUMNS,
    EPS_TIE_NATS,
    PILOT_COLUMNS,
    check_exponent_grid,
)

UNIT_ROUNDOFF = 2.0**-24  # float32

# these small problems rest on one direction (ESS ≈ 1); the warning is tested elsewhere
pytestmark = pytest.mark.filterwarnings("ignore::volsk.results.LowEffectiveSampleSizeWarning")


# ----------------------------------------------------------------------- ground truth: ellipsoids


@pytest.fixture(scope="module")
def axis_ellipsoid():
    """mse(δ) = Σ λ_i δ_i², λ over six decades (n = 16): only the right exponent is exact."""
    lam = np.logspace(0, 6, 16)
    model, X = rotated_quadratic_problem(np.diag(lam))
    return model, X, lam


@pytest.mark.parametrize("power, exact", [(2.0, 0.25), (1.0, 0.5), (0.5, 1.0)])
@pytest.mark.parametrize("eps", [0.0, "auto"])
def test_auto_exponent_picks_the_exact_exponent_of_an_ellipsoid(axis_ellipsoid, power, exact,
                                                                 eps):
    # a diagonal curvature h = λ^power: P ∝ h^(−exponent) is ∝ H^(−1/2), every radius the same
    # and the estimate exact, only at exponent = 0.5 / power
    model, X, lam = axis_ellipsoid
    cutoff = 0.01
    truth = log_ellipsoid_volume(lam, cutoff)
    est = LocalVolumeEstimator(cutoff, "lebesgue", preconditioner=lam**power, cost="mse",
                               preconditioner_eps=eps, preconditioner_exponent="auto",
                               n_samples=8, rtol=1e-6, random_state=0).fit(model, X)
    assert est.preconditioner_exponent_ == exact
    table = est.eps_pilot_
    best = table.groupby("exponent")["log_volume"].max()
    assert best.idxmax() == exact
    if eps == 0.0:  # exponents compared at eps = 0: one pilot each, the winner exact
        assert est.preconditioner_eps_ == 0.0 and len(table) == len(EXPONENT_GRID)
        assert abs(est.log_volume_ - truth) < 1e-3
        assert np.ptp(est.sample_log_volumes_) < 1e-6
    else:  # the largest eps within the tie threshold of the best pilot
        assert est.log_volume_ > truth - 2 * EPS_TIE_NATS


def test_auto_exponent_keeps_the_default_on_the_full_hessian_of_a_rotated_ellipsoid():
    from test_preconditioners import random_spd

    H, lam = random_spd(10, seed=3, spread=3)
    model, X = rotated_quadratic_problem(H)
    truth = log_ellipsoid_volume(lam, 0.01)
    est = LocalVolumeEstimator(0.01, "lebesgue", preconditioner="hessian", cost="mse",
                               preconditioner_eps=0.0, preconditioner_exponent="auto",
                               n_samples=8, rtol=1e-6, random_state=0).fit(model, X)
    assert est.preconditioner_exponent_ == 0.5
    assert abs(est.log_volume_ - truth) < 1e-3


# ------------------------------------------------------------------ the estimator's face


def test_auto_exponent_final_directions_equal_a_fit_with_the_chosen_pair():
    net, X = small_mlp()
    auto = LocalVolumeEstimator(sigma=1.0, n_samples=12, preconditioner="diag_hessian",
                                preconditioner_exponent="auto", random_state=3).fit(net, X)
    assert auto.preconditioner_exponent_ in EXPONENT_GRID
    fixed = LocalVolumeEstimator(sigma=1.0, n_samples=12, preconditioner="diag_hessian",
                                 preconditioner_eps=auto.preconditioner_eps_,
                                 preconditioner_exponent=auto.preconditioner_exponent_,
                                 random_state=3).fit(net, X)
    np.testing.assert_array_equal(auto.sample_log_volumes_, fixed.sample_log_volumes_)
    np.testing.assert_array_equal(auto.radii_, fixed.radii_)
    assert fixed.eps_pilot_ is None and fixed.preconditioner_exponent_ == \
        auto.preconditioner_exponent_


def test_pilot_table_has_an_exponent_column_and_one_selected_row():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=8, preconditioner="diag_hessian",
                               preconditioner_exponent="auto", random_state=0).fit(net, X)
    table = est.eps_pilot_
    assert list(table.columns) == list(PILOT_COLUMNS)
    assert list(dict.fromkeys(table["exponent"])) == list(EXPONENT_GRID)
    assert int(table["selected"].sum()) == 1
    chosen = table.loc[table["selected"]].iloc[0]
    assert (chosen["exponent"], chosen["eps"]) == (est.preconditioner_exponent_,
                                                   est.preconditioner_eps_)
    assert chosen["log_volume"] >= table["log_volume"].max() - EPS_TIE_NATS
    for _, part in table.groupby("exponent"):  # each exponent: its own eps search
        assert part["eps"].is_monotonic_decreasing and (part["directions"] == 8).all()
    # a numeric exponent: the eps pilot's table says which exponent it ran at
    eps_only = LocalVolumeEstimator(sigma=1.0, n_samples=8, preconditioner="diag_hessian",
                                    preconditioner_exponent=0.25, random_state=0).fit(net, X)
    assert list(eps_only.eps_pilot_.columns) == list(PILOT_COLUMNS)
    assert (eps_only.eps_pilot_["exponent"] == 0.25).all()
    assert eps_only.preconditioner_exponent_ == 0.25


def test_numeric_exponent_fits_are_unchanged_by_the_exponent_search():
    # the exponent column is the only difference an exponent pilot makes to a fixed exponent
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=8, preconditioner="diag_hessian",
                               random_state=0).fit(net, X)
    problem = prepare_problem(net, X, cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
                              measure=Gaussian(sigma=1.0), preconditioner=DiagHessian(),
                              eps=1.0, exponent=0.5, device="cpu", batch_size=None,
                              n_directions=8, random_state=est.seed_)
    selection = select_eps(problem, n_directions=8, random_state=est.seed_)
    assert selection.exponent == 0.5
    pd.testing.assert_frame_equal(selection.table, est.eps_pilot_)
    assert list(selection.table.columns[1:]) == list(EPS_COLUMNS)


def test_naive_estimator_has_no_exponent_and_runs_no_pilot():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner_exponent="auto",
                               random_state=0).fit(net, X)
    assert est.preconditioner_exponent_ is None and est.preconditioner_eps_ is None
    assert est.eps_pilot_.empty
    plain = LocalVolumeEstimator(sigma=1.0, n_samples=4, random_state=0).fit(net, X)
    np.testing.assert_array_equal(est.sample_log_volumes_, plain.sample_log_volumes_)


def test_auto_exponent_at_a_given_eps_compares_the_exponents_there():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=8, preconditioner="diag_hessian",
                               preconditioner_eps=1e-2, preconditioner_exponent="auto",
                               random_state=0).fit(net, X)
    assert est.preconditioner_eps_ == 1e-2
    assert sorted(est.eps_pilot_["exponent"]) == sorted(EXPONENT_GRID)
    assert (est.eps_pilot_["eps"] == 1e-2).all() and (est.eps_pilot_["stage"] == "coarse").all()


def test_partial_fit_keeps_the_chosen_exponent_and_refuses_a_changed_one():
    net, X = small_mlp()
    params = dict(sigma=1.0, preconditioner="diag_hessian", preconditioner_exponent="auto",
                  random_state=0)
    est = LocalVolumeEstimator(n_samples=8, **params).fit(net, X)
    chosen = (est.preconditioner_exponent_, est.preconditioner_eps_)
    est.partial_fit(net, X, n_samples=4)
    assert (est.preconditioner_exponent_, est.preconditioner_eps_) == chosen
    whole = LocalVolumeEstimator(n_samples=12, **params).fit(net, X)
    np.testing.assert_array_equal(est.sample_log_volumes_, whole.sample_log_volumes_)
    est.set_params(preconditioner_exponent=est.preconditioner_exponent_)
    with pytest.raises(ValueError, match="preconditioner_exponent"):
        est.partial_fit(net, X, n_samples=4)


def test_score_on_new_data_reuses_the_chosen_exponent():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=1.0, n_samples=6, preconditioner="diag_hessian",
                               preconditioner_exponent="auto", random_state=0).fit(net, X)
    assert est.score(X) == pytest.approx(est.log_volume_, abs=1e-9)


def test_exponent_parameter_clones_and_is_validated():
    est = LocalVolumeEstimator(preconditioner_exponent="auto")
    assert clone(est).get_params()["preconditioner_exponent"] == "auto"
    assert LocalVolumeEstimator().get_params()["preconditioner_exponent"] == 0.5
    net, X = small_mlp()
    for bad in ("best", -0.5):
        with pytest.raises(ValueError, match="preconditioner_exponent"):
            LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner_exponent=bad).fit(net, X)


def test_fit_sharded_binds_the_chosen_exponent_in_every_shard(axis_ellipsoid):
    from volsk.sweeps import fit_sharded

    model, X, lam = axis_ellipsoid
    est = LocalVolumeEstimator(0.01, "lebesgue", preconditioner=lam**2, cost="mse",
                               preconditioner_eps=0.0, preconditioner_exponent="auto",
                               n_samples=6, random_state=0)
    one = clone(est).fit(model, X)
    sharded = fit_sharded(clone(est), model, X, shard_size=2)
    assert sharded.preconditioner_exponent_ == one.preconditioner_exponent_ == 0.25
    np.testing.assert_array_equal(sharded.sample_log_volumes_, one.sample_log_volumes_)
    pd.testing.assert_frame_equal(sharded.eps_pilot_, one.eps_pilot_, check_exact=True)


# ------------------------------------------------------------------------- the rule alone


def pilot_of(log_volumes):
    """run_pilot(exponent, eps) with a fixed log-volume per (exponent, eps)."""

    def run_pilot(exponent, eps):
        return np.full(4, log_volumes[(exponent, eps)]), np.full(4, 3)

    return run_pilot


def test_choose_exponent_prefers_the_default_then_the_smaller_exponent_within_the_tie():
    t = EPS_TIE_NATS
    values = {(0.25, 1.0): -10.0, (0.5, 1.0): -10.0 - 0.9 * t, (1.0, 1.0): -10.0 + 0.05 * t}
    exponent, eps, table, index = choose_exponent((0.25, 0.5, 1.0), (1.0,), pilot_of(values),
                                                  refine=(), extend=0)
    assert (exponent, eps) == (0.5, 1.0) and table["selected"].tolist() == [False, True, False]
    values[(0.5, 1.0)] = -10.0 - 1.6 * t  # the default falls out of the tie: the smaller wins
    exponent, *_ = choose_exponent((0.25, 0.5, 1.0), (1.0,), pilot_of(values), refine=(),
                                   extend=0)
    assert exponent == 0.25
    values[(0.25, 1.0)] = -10.0 - 1.6 * t  # only the best is left
    exponent, *_ = choose_exponent((0.25, 0.5, 1.0), (1.0,), pilot_of(values), refine=(),
                                   extend=0)
    assert exponent == 1.0
    exponent, *_ = choose_exponent((0.25, 0.5, 1.0), (1.0,), pilot_of(values), refine=(),
                                   extend=0, tie=0.0)
    assert exponent == 1.0


def test_choose_exponent_takes_the_largest_eps_of_the_chosen_exponent_and_nan_never_wins():
    values = {(0.5, 1.0): np.nan, (0.5, 0.1): -3.0, (0.5, 0.01): -1.0,
              (1.0, 1.0): -50.0, (1.0, 0.1): -40.0, (1.0, 0.01): -2.0}
    exponent, eps, table, index = choose_exponent((0.5, 1.0), (1.0, 0.1, 0.01),
                                                  pilot_of(values), refine=(), extend=0)
    assert (exponent, eps) == (0.5, 0.1)
    assert table.iloc[index]["eps"] == 0.1 and int(table["selected"].sum()) == 1
    assert table["exponent"].tolist() == [0.5] * 3 + [1.0] * 3


@pytest.mark.parametrize("exponents", [(), (-0.5,), (np.nan,), (0.5, np.inf)])
def test_choose_exponent_rejects_bad_exponents(exponents):
    with pytest.raises(ValueError, match="exponents"):
        check_exponent_grid(exponents)
    with pytest.raises(ValueError, match="exponents"):
        choose_exponent(exponents, (1.0,), pilot_of({}))


# ------------------------------------------------------------------------- with_exponent


def dense(P, n):
    return P.apply(torch.eye(n, dtype=torch.float64))


def test_every_curvature_map_remade_with_another_exponent_equals_one_built_with_it():
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(6, generator=gen, dtype=torch.float64) * 10
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    block = KroneckerBlock("layer", torch.arange(4).reshape(2, 2), Q[:2, :2].clone(), None,
                           h[:4].reshape(2, 2))
    block.U_G, _ = torch.linalg.qr(block.U_G)
    makers = {
        "diagonal": lambda e: DiagonalMap.from_curvature(h, 1e-2, e),
        "eigen": lambda e: EigenMap(h, Q, 1e-2, e),
        "kronecker": lambda e: KroneckerMap([block], torch.tensor([4, 5]), h[4:], 6, 1e-2, e),
        "lowrank": lambda e: LowRankMap(h[:2], Q[:, :2], h, 1e-2, e),
    }
    for name, make in makers.items():
        remade = make(0.5).with_exponent(0.25)
        assert remade.exponent == 0.25 and remade.eps == 1e-2, name
        torch.testing.assert_close(dense(remade, 6), dense(make(0.25), 6), rtol=0, atol=1e-12)
        both = make(0.5).with_exponent(1.0).with_eps(1.0)
        torch.testing.assert_close(dense(both, 6), dense(makers[name](1.0).with_eps(1.0), 6),
                                   rtol=0, atol=1e-12)
        assert abs(float(torch.linalg.slogdet(dense(remade, 6)).logabsdet)) < 1e-9, name
    identity = IdentityMap(3)
    assert identity.with_exponent(0.25) is identity


def test_diagonal_map_from_scales_cannot_change_its_exponent():
    with pytest.raises(ValueError, match="curvature"):
        DiagonalMap(torch.zeros(3, dtype=torch.float64)).with_exponent(0.25)


# ------------------------------------------------------------ the Hessian map in the model's dtype


def random_eigen(n, seed=0, decades=9):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return torch.logspace(-decades // 2, decades - decades // 2, n, dtype=torch.float64), Q


@pytest.mark.parametrize("eps", [1e-2, 1e-5])
def test_float32_eigen_map_matches_float64_to_the_stated_rounding(eps):
    n = 600
    lam, Q = random_eigen(n)
    P64 = EigenMap(lam, Q, eps, 0.5)
    P32 = EigenMap(lam, Q, eps, 0.5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(64, n, generator=gen, dtype=torch.float64)
    G /= torch.linalg.vector_norm(G, dim=1, keepdim=True)
    a, b = P64.apply(G), P32.apply(G)
    assert b.dtype == torch.float64  # norms and log-weights are accumulated in float64
    norm_a, norm_b = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    # |P g| to a few u, so the log-weight −n·log|P g| to a few n·u (the docstring's claim)
    assert float(((norm_b - norm_a) / norm_a).abs().max()) < 8 * UNIT_ROUNDOFF
    d_log_w = (n * (torch.log(norm_b) - torch.log(norm_a))).abs().max()
    assert float(d_log_w) < 8 * n * UNIT_ROUNDOFF
    # the unit direction to float32 precision
    assert float((a / norm_a[:, None] - b / norm_b[:, None]).norm(dim=1).max()) < 1e-5
    # with_eps / with_exponent keep the dtype and share the cast eigenvectors
    other = P32.with_eps(1.0).with_exponent(0.25)
    assert other.dtype == torch.float32 and other._cast is P32._cast
    assert len(P32._cast) == 1


def test_eigen_map_falls_back_to_float64_when_float32_products_may_be_reduced():
    lam, Q = random_eigen(40)
    P64 = EigenMap(lam, Q, 1e-3, 0.5)
    P32 = EigenMap(lam, Q, 1e-3, 0.5, dtype=torch.float32)
    G = torch.randn(5, 40, dtype=torch.float64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 allowed: ~1e-3 relative rounding
        assert torch.equal(P32.apply(G), P64.apply(G))
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match="dtype"):
        EigenMap(lam, Q, 1e-3, 0.5, dtype=torch.float16)


@pytest.mark.parametrize("dtype, expected", [(torch.float32, torch.float32),
                                             (torch.float64, torch.float64),
                                             (torch.bfloat16, torch.float32)])
def test_hessian_map_is_applied_in_the_dtype_directions_are_formed_in(dtype, expected):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    X = torch.randn(16, 3).to(dtype)
    problem = prepare_problem(net, X, cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
                              measure=Gaussian(sigma=1.0), preconditioner=Hessian(), eps=1e-2,
                              exponent=0.5, device="cpu", batch_size=None, n_directions=4,
                              random_state=0)
    assert problem.preconditioner.dtype == expected


def test_float32_model_estimate_with_the_float32_map_matches_the_float64_map():
    # the same curvature, directions and seed: only the map's rounding differs
    from dataclasses import replace

    from volsk._pipeline import calibrate_search, estimate_directions

    net, X = small_mlp()
    problem = prepare_problem(net, X, cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
                              measure=Gaussian(sigma=1.0), preconditioner=Hessian(), eps=1e-2,
                              exponent=0.5, device="cpu", batch_size=None, n_directions=8,
                              random_state=0)
    P32 = problem.preconditioner
    P64 = EigenMap(P32.eigenvalues, P32.eigenvectors, P32.eps, P32.exponent)
    records = []
    for P in (P32, P64):
        bound = replace(problem, preconditioner=P)
        records.append(estimate_directions(bound, range(8), 0, start=calibrate_search(bound, 0)))
    n = P32.n
    np.testing.assert_allclose(records[0].log_weight, records[1].log_weight, rtol=0,
                               atol=8 * n * UNIT_ROUNDOFF)
    # the radius search lands within rtol of the same crossing: log-volumes agree to n·rtol
    np.testing.assert_allclose(records[0].log_volume, records[1].log_volume, rtol=0,
                               atol=n * 1e-3)
    assert math.isfinite(float(np.max(records[0].log_volume)))


def test_float32_eigen_map_gives_a_row_the_same_bits_whatever_rows_come_with_it():
    # direction i must stay a function of (seed, i): BLAS rounds a lone row differently
    lam, Q = random_eigen(300)
    P32 = EigenMap(lam, Q, 1e-3, 0.5, dtype=torch.float32)
    G = torch.randn(70, 300, dtype=torch.float64)
    whole = P32.apply(G)
    for first, stop in ((0, 1), (3, 5), (10, 19), (5, 70)):
        assert torch.equal(P32.apply(G[first:stop]), whole[first:stop])


def test_partial_fit_with_the_float32_hessian_map_equals_one_fit():
    net, X = small_mlp()
    params = dict(sigma=1.0, preconditioner="hessian", preconditioner_eps=1e-2, random_state=0)
    est = LocalVolumeEstimator(n_samples=5, **params).fit(net, X)
    est.partial_fit(net, X, n_samples=2)
    whole = LocalVolumeEstimator(n_samples=7, **params).fit(net, X)
    np.testing.assert_array_equal(est.samples_["log_weight"], whole.samples_["log_weight"])
    np.testing.assert_array_equal(est.sample_log_volumes_, whole.sample_log_volumes_)
