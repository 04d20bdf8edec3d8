"""Preconditioners: maps with det P = 1, Adam state mapping, exactness on ellipsoids, eps pilot."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models import log_ellipsoid_volume, rotated_quadratic_problem, small_mlp, trained
from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk._pipeline import estimate_directions, select_eps
from volsk._pipeline import fit as run_pipeline
from volsk._problem import prepare_problem
from volsk._seeding import EPS_PILOT_STREAM, stream_seed
from volsk.costs import make_cost
from volsk.measures import Gaussian
from volsk.preconditioners import (
    EPS_GRID,
    Adam,
    BoundPreconditioner,
    DiagHessian,
    DiagonalMap,
    EigenMap,
    Fisher,
    Hessian,
    Identity,
    PreconditionerContext,
    choose_eps,
    resolve_preconditioner,
)
from volsk.preconditioners.selection import (
    EPS_EXTEND,
    EPS_REFINE,
    EPS_TIE_NATS,
    PILOT_COLUMNS,
    tie_break,
)
from volsk.results import aggregate_log_volume

# ------------------------------------------------------------------------------------ maps


def test_names_resolve_to_their_objects():
    assert repr(resolve_preconditioner("adam")) == "Adam()"
    assert resolve_preconditioner("adam_m1").moment == 1
    assert isinstance(resolve_preconditioner("diag_hessian"), DiagHessian)
    assert type(resolve_preconditioner("hessian")) is Hessian
    assert type(resolve_preconditioner("fisher")) is Fisher
    assert repr(resolve_preconditioner("hesscale")) == "HesScale()"
    assert isinstance(resolve_preconditioner(None), Identity)
    custom = Hessian(max_parameters=10)
    assert resolve_preconditioner(custom) is custom
    with pytest.raises(ValueError, match="preconditioner must be"):
        resolve_preconditioner("newton")


def random_spd(n, seed=0, spread=4):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0, spread, n)
    return Q @ np.diag(lam) @ Q.T, lam


def test_eigen_map_is_v_d_vt_with_unit_determinant_and_keeps_the_second_vt():
    H, _ = random_spd(6)
    w, V = torch.linalg.eigh(torch.as_tensor(H))
    P = EigenMap(w, V, eps=1e-3, exponent=0.5)
    d = 1.0 / (w.sqrt() + 1e-3)
    d = d / torch.exp(torch.log(d).mean())
    dense = V @ torch.diag(d) @ V.T
    G = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(P.apply(G), G @ dense, atol=1e-12)
    assert torch.allclose(dense, dense.T, atol=1e-12)
    assert abs(float(torch.linalg.slogdet(dense).logabsdet)) < 1e-9
    assert abs(float(P.log_d.sum())) < 1e-9
    other = P.with_eps(1.0)
    assert other.eps == 1.0 and other.eigenvectors is P.eigenvectors


def test_diagonal_map_remade_for_another_eps_keeps_its_curvature():
    h = torch.tensor([1.0, 4.0, 9.0, 0.0], dtype=torch.float64)
    P = DiagonalMap.from_curvature(h, 1e-2, 0.5)
    Q = P.with_eps(1.0)
    assert torch.equal(Q.curvature, h) and Q.eps == 1.0
    expected = -torch.log(h.sqrt() + 1.0)
    assert torch.allclose(Q.log_p, expected - expected.mean())
    assert abs(float(Q.log_p.sum())) < 1e-12
    with pytest.raises(ValueError, match="preconditioner_eps=0"):
        P.with_eps(0.0)


def test_full_matrix_preconditioners_refuse_too_many_parameters():
    model = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="max_parameters=10"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner=Hessian(max_parameters=10),
                             random_state=0).fit(model, torch.randn(8, 5))


def test_fisher_with_a_callable_cost_points_to_hessian():
    def cost(outputs, anchor):
        return ((outputs - anchor) ** 2).mean()

    with pytest.raises(ValueError, match="'hessian'"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner="fisher", cost=cost,
                             random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))


# ------------------------------------------------------------------ exactness on an ellipsoid


@pytest.fixture(scope="module")
def rotated_ellipsoid():
    H, lam = random_spd(10, seed=3, spread=3)
    model, X = rotated_quadratic_problem(H)
    return model, X, lam


@pytest.mark.parametrize("name", ["hessian", "fisher"])
def test_full_matrix_is_exact_on_a_rotated_ellipsoid(rotated_ellipsoid, name):
    model, X, lam = rotated_ellipsoid
    cutoff = 0.01
    truth = log_ellipsoid_volume(lam, cutoff)  # mse(δ) = δᵀ H δ
    est = LocalVolumeEstimator(cutoff, "lebesgue", preconditioner=name, cost="mse",
                               preconditioner_eps=0.0, n_samples=20, rtol=1e-6,
                               random_state=0).fit(model, X)
    assert abs(est.log_volume_ - truth) < 1e-3
    assert np.ptp(est.sample_log_volumes_) < 1e-6  # every direction gives the same estimate


@pytest.mark.parametrize("name", ["diag_hessian", "hesscale"])
def test_diagonal_is_not_exact_on_a_rotated_ellipsoid(rotated_ellipsoid, name):
    model, X, lam = rotated_ellipsoid
    cutoff, k = 0.01, 20
    truth = log_ellipsoid_volume(lam, cutoff)
    est = LocalVolumeEstimator(cutoff, "lebesgue", preconditioner=name, cost="mse",
                               preconditioner_eps=0.0, n_samples=k, rtol=1e-6,
                               random_state=0).fit(model, X)
    assert np.ptp(est.sample_log_volumes_) > 0.1
    assert est.log_volume_ <= truth + math.log(k)


# -------------------------------------------------------------------------------- Adam state


class Reordered(nn.Module):
    """Registers ``b`` before ``a`` while the optimizer below lists ``a`` first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.b = nn.Linear(4, 3)
        self.a = nn.Linear(3, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def adam_ctx(model, X, optimizer):
    ev = FunctionalModel(model, X, "cpu")
    mask = torch.ones(ev.space.n, dtype=torch.bool)
    return PreconditionerContext(ev, make_cost("kl", ev.anchor_outputs()), mask,
                                 user_module=model, optimizer=optimizer)


def expected_moment(model, optimizer, moment):
    pieces = []
    for _, p in model.named_parameters():
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        state = optimizer.state[p]
        beta = group["betas"][moment - 1]
        t = float(state["step"])
        value = state["exp_avg" if moment == 1 else "exp_avg_sq"].double()
        pieces.append((value.abs() if moment == 1 else value).reshape(-1) / (1 - beta**t))
    return torch.cat(pieces)


def test_adam_maps_state_by_parameter_identity_across_orders_and_groups():
    model = Reordered()
    optimizer = torch.optim.Adam(
        [{"params": model.a.parameters(), "betas": (0.8, 0.99)},
         {"params": model.b.parameters(), "betas": (0.9, 0.999)}], lr=1e-2)
    X = trained(model, optimizer)
    ctx = adam_ctx(model, X, optimizer)
    for moment in (2, 1):
        h = Adam(moment=moment).curvature(ctx)
        assert torch.allclose(h, expected_moment(model, optimizer, moment), rtol=1e-12)
    # named_parameters order is b.weight, b.bias, a.weight, a.bias: b's entries come first
    assert torch.allclose(Adam().curvature(ctx)[:12],
                          optimizer.state[model.b.weight]["exp_avg_sq"].double().reshape(-1)
                          / (1 - 0.999**3))


def test_adam_from_a_state_dict_matches_the_optimizer_object():
    model = Reordered()
    # the optimizer was built from model.parameters(): state_dict order = parameters() order
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    X = trained(model, optimizer)
    from_object = Adam().curvature(adam_ctx(model, X, optimizer))
    from_dict = Adam().curvature(adam_ctx(model, X, optimizer.state_dict()))
    assert torch.equal(from_object, from_dict)


def test_adam_state_dict_in_another_order_is_caught_by_shapes():
    model = Reordered()
    optimizer = torch.optim.Adam([*model.a.parameters(), *model.b.parameters()], lr=1e-2)
    X = trained(model, optimizer)
    with pytest.raises(ValueError, match="param-group order"):
        Adam().curvature(adam_ctx(model, X, optimizer.state_dict()))


def test_adam_missing_state_or_untrained_parameter_raises():
    model = Reordered()
    optimizer = torch.optim.Adam(model.parameters())
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="exp_avg_sq.*optimizer.step"):
        Adam().curvature(adam_ctx(model, X, optimizer))  # no step taken yet
    partial = torch.optim.Adam(model.a.parameters())
    trained(model, partial, steps=1)
    with pytest.raises(ValueError, match="'b.weight' is not in any of the optimizer"):
        Adam().curvature(adam_ctx(model, X, partial))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, sgd, steps=1)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        Adam().curvature(adam_ctx(model, X, sgd))
    with pytest.raises(ValueError, match="holds 2 parameters"):
        Adam().curvature(adam_ctx(model, X, partial.state_dict()))


def test_adam_without_optimizer_names_the_argument():
    with pytest.raises(ValueError, match="optimizer"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner="adam",
                             random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))


def test_adam_through_the_estimator_and_a_skorch_net():
    from skorch import NeuralNetClassifier

    X = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    net = NeuralNetClassifier(nn.Linear, module__in_features=3, module__out_features=2,
                              criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                              max_epochs=2, train_split=None, verbose=0).fit(X, y)
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner="adam",
                               random_state=0).fit(net, X)
    assert np.isfinite(est.log_volume_)
    h = Adam().curvature(adam_ctx(net.module_, torch.as_tensor(X), net.optimizer_))
    assert torch.allclose(h, expected_moment(net.module_, net.optimizer_, 2))


def test_adam_paper_eps_converts_by_the_bias_correction_to_the_same_map_and_directions():
    # the paper's code: P ∝ 1/(sqrt(ν) + eps) on the raw exp_avg_sq ν (no bias correction);
    # volsk's "adam" uses v̂ = ν / (1 − β₂ᵗ), so its eps is eps_paper / sqrt(1 − β₂ᵗ)
    model = Reordered()
    beta2, steps = 0.99, 5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, beta2))
    X = trained(model, optimizer, steps=steps)
    nu = torch.cat([optimizer.state[p]["exp_avg_sq"].double().reshape(-1)
                    for _, p in model.named_parameters()])
    eps_paper = float(nu.sqrt().median())  # where the convention matters most
    log_p = -torch.log(nu.sqrt() + eps_paper)
    paper = log_p - log_p.mean()  # the paper's diag_preconditioner, det P = 1
    eps_volsk = eps_paper / math.sqrt(1 - beta2**steps)
    v_hat = Adam().curvature(adam_ctx(model, X, optimizer))
    torch.testing.assert_close(DiagonalMap.from_curvature(v_hat, eps_volsk, 0.5).log_p, paper,
                               rtol=0, atol=1e-12)
    assert not torch.allclose(DiagonalMap.from_curvature(v_hat, eps_paper, 0.5).log_p, paper,
                              atol=1e-3)  # the same eps is another map
    # the same directions through the estimator: "adam" at the converted eps, and the raw ν
    # as an array at the paper's eps
    kw = dict(sigma=1.0, n_samples=6, random_state=0)
    by_adam = LocalVolumeEstimator(preconditioner="adam", preconditioner_eps=eps_volsk,
                                   **kw).fit(model, X, optimizer=optimizer)
    by_array = LocalVolumeEstimator(preconditioner=nu.numpy(), preconditioner_eps=eps_paper,
                                    **kw).fit(model, X)
    np.testing.assert_allclose(by_adam.samples_["log_weight"], by_array.samples_["log_weight"],
                               rtol=1e-9)
    np.testing.assert_allclose(by_adam.radii_, by_array.radii_, rtol=1e-9)
    np.testing.assert_allclose(by_adam.sample_log_volumes_, by_array.sample_log_volumes_,
                               rtol=1e-9)


# ------------------------------------------------------------------------------- eps pilot


def small_problem(preconditioner, seed=0):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X = torch.randn(32, 4)
    return prepare_problem(net, X, cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
                           measure=Gaussian(sigma=1.0), preconditioner=preconditioner,
                           eps=EPS_GRID[0], exponent=0.5, device="cpu", batch_size=None,
                           n_directions=16, random_state=seed)


def test_select_eps_is_reproducible_and_rebinds_the_chosen_eps():
    problem = small_problem(DiagHessian())
    first = select_eps(problem, n_directions=12, random_state=7)
    second = select_eps(problem, n_directions=12, random_state=7)
    assert first.eps == second.eps
    assert first.table.equals(second.table)
    coarse = first.table.loc[first.table["stage"] == "coarse", "eps"].tolist()
    assert set(EPS_GRID) <= set(coarse)
    assert first.table["eps"].is_monotonic_decreasing
    assert (first.table["directions"] == 12).all()
    assert int(first.table["selected"].sum()) == 1
    chosen = first.table.loc[first.table["selected"]].iloc[0]
    assert chosen["eps"] == first.eps
    assert chosen["log_volume"] >= first.table["log_volume"].max() - EPS_TIE_NATS
    assert first.problem.preconditioner.eps == first.eps
    assert problem.preconditioner.eps == EPS_GRID[0]  # the input problem is not modified


def test_select_eps_pilot_directions_are_not_the_estimate_directions():
    # choosing eps on the estimate's own directions would bias the estimate upwards
    problem = small_problem(DiagHessian())
    pilot = select_eps(problem, grid=(1e-2,), n_directions=6, random_state=0, refine=())
    main = estimate_directions(pilot.problem, range(6), 0)
    assert stream_seed(0, EPS_PILOT_STREAM) != 0
    assert len(pilot.table) == 1
    assert pilot.table["log_volume"].iloc[0] != aggregate_log_volume(main.log_volume)


def test_select_eps_naive_runs_no_pilot_and_bad_grids_raise():
    result = select_eps(small_problem(Identity()))
    assert result.eps is None and result.table.empty
    assert list(result.table.columns) == list(PILOT_COLUMNS)
    with pytest.raises(ValueError, match="grid"):
        select_eps(small_problem(DiagHessian()), grid=(-1.0,))


class FixedMap(BoundPreconditioner):
    """A custom bound map (a fixed diagonal) without ``with_eps``."""

    def __init__(self, n):
        self.n = n
        self.scale = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
        self.scale /= self.scale.log().mean().exp()  # det P = 1

    def apply(self, G):
        return G * self.scale.to(G)


class FixedPreconditioner:
    def bind(self, ctx):
        return FixedMap(ctx.n)


def test_auto_eps_uses_a_map_without_with_eps_as_bound():
    # "auto" is the default: a custom preconditioner that ignores eps must still fit
    est = LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner=FixedPreconditioner(),
                               random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))
    assert est.preconditioner_eps_ is None and est.eps_pilot_.empty
    assert np.isfinite(est.log_volume_)


def pilot_returning(log_volumes_by_eps):
    """A run_pilot whose every direction has the log-volume given for its eps."""
    calls = []

    def run_pilot(eps):
        calls.append(eps)
        return np.full(3, log_volumes_by_eps[eps]), np.array([2, 3, 4])

    return run_pilot, calls


def peaked_pilot(log10_peak, nats_per_decade=100.0):
    """A run_pilot whose log-volume falls linearly in |log10 eps − log10_peak|."""
    calls = []

    def run_pilot(eps):
        calls.append(eps)
        return np.full(4, -nats_per_decade * abs(math.log10(eps) - log10_peak)), np.full(4, 3)

    return run_pilot, calls


def test_choose_eps_picks_the_largest_pilot_log_volume_and_tabulates_every_eps():
    run_pilot, calls = pilot_returning({1.0: -5.0, 0.1: -1.0, 0.01: -13.0})
    eps, table, index = choose_eps([1.0, 0.1, 0.01], run_pilot, refine=(), tie=0.0)
    assert (eps, index) == (0.1, 1)
    assert calls == [1.0, 0.1, 0.01]  # one pilot per eps, in grid order
    assert list(table.columns) == ["eps", "stage", "log_volume", "max_sample",
                                   "median_sample", "ess", "evaluations_per_direction",
                                   "directions", "selected"]
    assert table["selected"].tolist() == [False, True, False]
    assert table["evaluations_per_direction"].tolist() == [3.0, 3.0, 3.0]
    assert table["directions"].tolist() == [3, 3, 3]
    np.testing.assert_allclose(table["log_volume"], [-5.0, -1.0, -13.0])


def test_choose_eps_ties_go_to_the_larger_eps_and_nan_never_wins():
    run_pilot, _ = pilot_returning({1.0: np.nan, 0.1: -2.0, 0.01: -2.0})
    eps, table, index = choose_eps((1.0, 0.1, 0.01), run_pilot, refine=(), extend=0)
    assert (eps, index) == (0.1, 1)
    assert int(table["selected"].sum()) == 1


@pytest.mark.parametrize("log10_peak", [-1.5, -2.5, -3.0, -4.0, -4.5])
def test_choose_eps_searches_the_coarse_grid_then_half_decades_around_its_winner(log10_peak):
    run_pilot, calls = peaked_pilot(log10_peak)
    eps, table, _ = choose_eps(EPS_GRID, run_pilot)
    assert math.log10(eps) == pytest.approx(log10_peak)
    assert calls[:4] == list(EPS_GRID)  # coarse first, in grid order
    coarse = table.loc[table["stage"] == "coarse"]
    coarse_winner = coarse["eps"].iloc[tie_break(coarse["eps"], coarse["log_volume"])]
    fine = sorted(calls[4:], reverse=True)
    np.testing.assert_allclose(np.log10(fine),
                               math.log10(coarse_winner) + np.array([1, 0.5, -0.5, -1]))
    assert len(calls) == 8 and table["stage"].value_counts().to_dict() == {"coarse": 4,
                                                                           "fine": 4}


def test_choose_eps_prefers_the_largest_eps_within_the_tie_threshold():
    # below the tie threshold a larger eps wins, above it the better pilot does
    lead = EPS_TIE_NATS
    steep = {1.0: -100.0, 1e-2: -100.0 + 2.0 * lead, 1e-4: -100.0 + 2.5 * lead}
    run_pilot, _ = pilot_returning(steep)
    assert choose_eps(tuple(steep), run_pilot, refine=(), extend=0)[0] == 1e-2
    run_pilot, _ = pilot_returning(steep)
    assert choose_eps(tuple(steep), run_pilot, refine=(), extend=0, tie=0.0)[0] == 1e-4
    flat = {1.0: -100.0, 1e-2: -100.0 + 0.5 * lead, 1e-4: -100.0 + 0.9 * lead}
    run_pilot, _ = pilot_returning(flat)
    assert choose_eps(tuple(flat), run_pilot, refine=(), extend=0)[0] == 1.0
    run_pilot, _ = pilot_returning(flat)
    assert choose_eps(tuple(flat), run_pilot, refine=(), extend=0, tie=0.0)[0] == 1e-4


def test_tie_threshold_is_the_markov_union_bound_for_eight_pilots_at_95_percent():
    # P(max of 8 log-estimates − log µ ≥ t) ≤ 8 e^{−t} (Markov and a union bound)
    assert 8 * math.exp(-EPS_TIE_NATS) == pytest.approx(0.05)
    assert tie_break([1.0, 0.1], [-10.0, -10.0 + 0.99 * EPS_TIE_NATS]) == 0
    assert tie_break([1.0, 0.1], [-10.0, -10.0 + 1.01 * EPS_TIE_NATS]) == 1
    assert tie_break([1.0, 0.1], [-np.inf, -np.inf]) == 0
    assert tie_break([1.0, 0.1, 0.01], [1.0, np.inf, np.inf]) == 1


@pytest.mark.parametrize("log10_peak", [3.0, -9.0])
def test_choose_eps_extends_past_an_end_of_the_grid_that_keeps_winning(log10_peak):
    run_pilot, calls = peaked_pilot(log10_peak)
    eps, table, _ = choose_eps(EPS_GRID, run_pilot)
    assert math.log10(eps) == pytest.approx(log10_peak)
    assert "extend" in set(table["stage"])


def test_choose_eps_extension_is_bounded():
    run_pilot, calls = peaked_pilot(30.0)
    eps, table, _ = choose_eps(EPS_GRID, run_pilot)
    assert (table["stage"] == "extend").sum() == EPS_EXTEND
    assert math.log10(eps) == pytest.approx(2 * EPS_EXTEND + 1)  # the last step, refined up
    assert len(calls) == len(EPS_GRID) + EPS_EXTEND + len(EPS_REFINE)


@pytest.mark.parametrize("grid", [(), (-1.0,), (np.inf,), (1.0, np.nan)])
def test_choose_eps_rejects_a_bad_grid_before_any_pilot(grid):
    run_pilot, calls = pilot_returning({})
    with pytest.raises(ValueError, match="grid must be a non-empty sequence"):
        choose_eps(grid, run_pilot)
    assert calls == []


def test_auto_eps_on_digits_never_falls_below_naive_and_is_stable_across_seeds():
    from volsk.experiments.digits import prior_sigma, train_digits_mlp

    run = train_digits_mlp()
    k = 24
    problem = prepare_problem(
        run.model, run.splits.X_test, cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
        measure=Gaussian(sigma=prior_sigma()), preconditioner=DiagHessian(), eps=EPS_GRID[0],
        exponent=0.5, device="cpu", batch_size=None, n_directions=k, random_state=0)
    chosen = [select_eps(problem, random_state=seed) for seed in range(4)]
    auto = estimate_directions(chosen[0].problem, range(k), 0).log_volume
    naive = LocalVolumeEstimator(1e-2, "gaussian", sigma=prior_sigma(), n_samples=k,
                                 random_state=0).fit(run.model, run.splits.X_test)
    log_auto = float(np.logaddexp.reduce(auto) - math.log(k))
    assert log_auto >= naive.log_volume_
    # every choice is on the half-decade lattice, and the seeds agree to one half-decade step
    half_decades = np.array([-2 * math.log10(c.eps) for c in chosen])
    np.testing.assert_allclose(half_decades, np.round(half_decades), atol=1e-9)
    assert np.ptp(half_decades) <= 1 + 1e-9
    # the pilot's cost: 8 directions at each of 8 eps
    assert all(c.table["directions"].sum() == 64 for c in chosen)


def test_a_settled_diagonal_map_drops_its_curvature_and_keeps_its_directions():
    net, X = small_mlp()
    est = LocalVolumeEstimator(preconditioner="diag_hessian", n_samples=4, random_state=0)
    result = run_pipeline(net, X, None, est._settings(), eps="auto", n_samples=4, seed=0)
    P = result.problem.preconditioner
    assert isinstance(P, DiagonalMap) and P.curvature is None  # dropped once eps is chosen
    with pytest.raises(ValueError, match="built from scales"):
        P.with_eps(1e-3)
    h = torch.rand(50, dtype=torch.float64) + 0.1
    full = DiagonalMap.from_curvature(h, 1e-2, 0.5)
    settled = full.settled()
    assert settled.curvature is None and full.curvature is not None  # a copy
    assert settled.scale is full.scale and settled.settled() is settled
    G = torch.randn(3, 50, dtype=torch.float64)
    assert torch.equal(settled.apply(G), full.apply(G))
    fitted = est.fit(net, X)  # the estimator runs this pipeline: the same records
    np.testing.assert_array_equal(fitted.sample_log_volumes_,
                                  result.records.log_volume)
