"""Preconditioners: maps with det P = 1, Adam state mapping, exactness on ellipsoids, eps pilot."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models import log_ellipsoid_volume, rotated_quadratic_problem
from volsk import LocalVolumeEstimator
from volsk._engine import estimate_directions, prepare_problem
from volsk._evaluate import FunctionalModel
from volsk.costs import make_cost
from volsk.measures import Gaussian
from volsk.preconditioners import (
    EPS_GRID,
    Adam,
    DiagHessian,
    DiagonalMap,
    EigenMap,
    Fisher,
    Hessian,
    Identity,
    PreconditionerContext,
    pilot_seed,
    resolve_preconditioner,
    select_eps,
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


def trained(model, optimizer, steps=3):
    X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        optimizer.step()
    return X


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
    assert list(first.table["eps"]) == list(EPS_GRID)
    assert int(first.table["selected"].sum()) == 1
    chosen = first.table.loc[first.table["selected"]].iloc[0]
    assert chosen["eps"] == first.eps
    assert chosen["log_volume"] == first.table["log_volume"].max()
    assert first.problem.preconditioner.eps == first.eps
    assert problem.preconditioner.eps == EPS_GRID[0]  # the input problem is not modified


def test_select_eps_pilot_directions_are_not_the_estimate_directions():
    # choosing eps on the estimate's own directions would bias the estimate upwards
    problem = small_problem(DiagHessian())
    pilot = select_eps(problem, grid=(1e-2,), n_directions=6, random_state=0)
    main = estimate_directions(pilot.problem, range(6), 0)
    assert pilot_seed(0) != 0
    assert pilot.table["log_volume"].iloc[0] != aggregate_log_volume(main["log_volume"])


def test_select_eps_naive_runs_no_pilot_and_bad_grids_raise():
    result = select_eps(small_problem(Identity()))
    assert result.eps is None and result.table.empty
    with pytest.raises(ValueError, match="grid"):
        select_eps(small_problem(DiagHessian()), grid=(-1.0,))


def test_auto_eps_on_digits_never_falls_below_naive():
    from volsk.experiments.digits import prior_sigma, train_digits_mlp

    run = train_digits_mlp()
    k = 24
    problem = prepare_problem(
        run.model, run.splits.X_test, cost="kl", output="logits", cutoff=1e-2, rtol=1e-3,
        measure=Gaussian(sigma=prior_sigma()), preconditioner=DiagHessian(), eps=EPS_GRID[0],
        exponent=0.5, device="cpu", batch_size=None, n_directions=k, random_state=0)
    chosen = select_eps(problem, n_directions=16, random_state=0)
    auto = estimate_directions(chosen.problem, range(k), 0)["log_volume"]
    naive = LocalVolumeEstimator(1e-2, "gaussian", sigma=prior_sigma(), n_samples=k,
                                 random_state=0).fit(run.model, run.splits.X_test)
    log_auto = float(np.logaddexp.reduce(auto) - math.log(k))
    assert chosen.eps in EPS_GRID
    assert log_auto >= naive.log_volume_
