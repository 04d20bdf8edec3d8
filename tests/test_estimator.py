"""LocalVolumeEstimator: reproducibility, the user's model untouched, bad input, flatness."""

import math
import pickle
import warnings

import numpy as np
import pytest
import torch

from models import quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk._math import log_ball_volume


def snapshot(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in
                  model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "device": {k: v.device for k, v in model.named_parameters()},
        "dtype": {k: v.dtype for k, v in model.named_parameters()},
    }


def assert_same(before, after):
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["device"] == after["device"] and before["dtype"] == after["dtype"]
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for k in before[key]:
            assert torch.equal(before[key][k], after[key][k]), k  # bit-identical
    for k, g in before["grads"].items():
        if g is None:
            assert after["grads"][k] is None, k
        else:
            assert torch.equal(g, after["grads"][k]), k


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.lin(x)))))


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_same_random_state_gives_identical_samples_whatever_the_batch_size(batch_size):
    net, X = small_mlp()
    ref = LocalVolumeEstimator(sigma=0.5, n_samples=15, batch_size=15, random_state=4).fit(net, X)
    est = LocalVolumeEstimator(sigma=0.5, n_samples=15, batch_size=batch_size,
                               random_state=4).fit(net, X)
    np.testing.assert_array_equal(est.sample_log_volumes_, ref.sample_log_volumes_)
    np.testing.assert_array_equal(est.radii_, ref.radii_)


def test_different_random_state_gives_different_samples():
    net, X = small_mlp()
    a = LocalVolumeEstimator(sigma=0.5, n_samples=5, random_state=0).fit(net, X)
    b = LocalVolumeEstimator(sigma=0.5, n_samples=5, random_state=1).fit(net, X)
    assert not np.array_equal(a.sample_log_volumes_, b.sample_log_volumes_)


def test_fit_leaves_model_bit_identical():
    torch.manual_seed(0)
    net = BNNet().train()
    X = torch.randn(30, 5)
    net(X).sum().backward()  # grads present before fit must survive unchanged
    net.lin.bias.requires_grad_(False)
    before = snapshot(net)
    LocalVolumeEstimator(sigma=0.5, n_samples=8, random_state=0).fit(net, X)
    assert_same(before, snapshot(net))
    assert net.training


def test_fit_leaves_model_bit_identical_when_cost_raises():
    net, X = small_mlp()
    net.train()
    before = snapshot(net)
    calls = {"n": 0}

    def exploding_cost(outputs, anchor):
        calls["n"] += 1
        if calls["n"] > 3:  # fails in the middle of the radius search
            raise RuntimeError("boom")
        return torch.nn.functional.mse_loss(outputs, anchor)

    with pytest.raises(RuntimeError, match="boom"):
        LocalVolumeEstimator(cost=exploding_cost, sigma=0.5, n_samples=8,
                             random_state=0).fit(net, X)
    assert calls["n"] > 3
    assert_same(before, snapshot(net))


def test_fitted_attributes_are_consistent():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=12, random_state=0).fit(net, X)
    k = 12
    assert est.sample_log_volumes_.shape == (k,) and est.radii_.shape == (k,)
    assert est.n_parameters_ == sum(p.numel() for p in net.parameters())
    assert est.n_evaluations_ == int(est.samples_["evaluations"].sum())
    assert 1.0 <= est.effective_sample_size_ <= k
    from scipy.special import logsumexp

    assert est.log_volume_ == pytest.approx(logsumexp(est.sample_log_volumes_) - math.log(k))
    assert est.log10_volume_ == pytest.approx(est.log_volume_ / math.log(10))
    assert est.bits_ == pytest.approx(-est.log_volume_ / math.log(2))
    assert est.log_volume_lower_bound(0.95) == pytest.approx(est.log_volume_ + math.log(0.05))
    assert est.score() == est.log_volume_
    assert list(est.samples_.columns[:4]) == ["direction", "log_volume", "radius",
                                              "cost_at_radius"]
    # every radius meets the boundary accuracy
    costs = est.samples_["cost_at_radius"].to_numpy()
    assert np.all(np.abs(costs - 1e-2) <= 1e-3 * 1e-2 + 1e-15)
    frame = est.results_frame()
    assert frame.loc[0, "log_volume"] == est.log_volume_


def test_evaluations_per_direction_are_few_on_a_smooth_net():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=50, rtol=1e-3, random_state=0).fit(net, X)
    assert est.n_evaluations_ / 50 <= 5.0


def test_refit_resets_state_and_pickle_round_trip():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0).fit(net, X)
    first = est.sample_log_volumes_.copy()
    est.set_params(n_samples=3).fit(net, X)
    assert est.sample_log_volumes_.shape == (3,)
    np.testing.assert_array_equal(est.sample_log_volumes_, first[:3])
    clone = pickle.loads(pickle.dumps(est))
    assert clone.log_volume_ == est.log_volume_
    assert "_evaluator" not in vars(clone)


def test_partial_fit_equals_one_long_fit():
    net, X = small_mlp()
    long = LocalVolumeEstimator(sigma=0.5, n_samples=10, random_state=2).fit(net, X)
    est = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=2).fit(net, X)
    est.partial_fit(net, X, n_samples=4)
    np.testing.assert_array_equal(est.sample_log_volumes_, long.sample_log_volumes_)
    assert est.log_volume_ == long.log_volume_
    other, _ = small_mlp(seed=1)
    with pytest.raises(ValueError, match="different model, X or y"):
        est.partial_fit(other, X, n_samples=2)


def test_partial_fit_reuses_the_fits_pilots(monkeypatch):
    import volsk._pipeline as pipeline
    from volsk.sweeps import fit_sharded

    net, X = small_mlp()
    kw = dict(sigma=1.0, preconditioner="boundary", preconditioner_eps="auto",
              preconditioner_exponent="auto", random_state=3)
    long = LocalVolumeEstimator(n_samples=10, **kw).fit(net, X)
    est = LocalVolumeEstimator(n_samples=6, **kw).fit(net, X)
    spent = est.n_pilot_evaluations_
    with monkeypatch.context() as patch:  # no pilot may run again
        for stage in ("choose_map", "calibrate_search", "select_eps", "fit_boundary_map"):
            patch.setattr(pipeline, stage, lambda *a, stage=stage, **k: pytest.fail(stage))
        est.partial_fit(net, X, n_samples=4)
    np.testing.assert_array_equal(est.sample_log_volumes_, long.sample_log_volumes_)
    assert est.n_pilot_evaluations_ == spent == long.n_pilot_evaluations_
    assert est.preconditioner_exponent_ == long.preconditioner_exponent_
    # an estimate replaced by a sharded fit of other data keeps no pilots of the first one
    other = X[:25]
    est = LocalVolumeEstimator(n_samples=6, **kw).fit(net, X)
    fit_sharded(est, net, other)
    est.partial_fit(net, other, n_samples=4)
    whole = LocalVolumeEstimator(n_samples=10, **kw).fit(net, other)
    np.testing.assert_array_equal(est.sample_log_volumes_, whole.sample_log_volumes_)


def test_score_on_new_data_uses_the_same_anchor():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0).fit(net, X)
    same = est.score(X)
    assert same == pytest.approx(est.log_volume_, abs=1e-9)
    other = est.score(X[:10])
    assert np.isfinite(other) and other != same


def _fit(**kw):
    net, X = small_mlp()
    model = kw.pop("model", net)
    X = kw.pop("X", X)
    y = kw.pop("y", None)
    params = {"sigma": 0.5, "n_samples": 2, "random_state": 0} | kw
    return LocalVolumeEstimator(**params).fit(model, X, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cutoff": 0.0}, "cutoff"),
        ({"cutoff": -1.0}, "cutoff"),
        ({"cutoff": float("nan")}, "cutoff"),
        ({"n_samples": 0}, "n_samples"),
        ({"measure": "cauchy"}, "measure"),
        ({"preconditioner": "newton"}, "preconditioner"),
        ({"cost": "hinge"}, "cost"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -2.0}, "sigma"),
        ({"sigma": np.full(3, 0.5)}, "sigma"),
        ({"sigma": np.r_[np.full(58, 0.5), -1.0]}, "sigma"),
        ({"preconditioner": np.ones(3)}, "preconditioner"),
        ({"preconditioner": np.r_[np.ones(58), np.nan]}, "preconditioner"),
        ({"preconditioner": np.r_[np.ones(58), -1.0]}, "preconditioner"),
        ({"X": torch.zeros(0, 5)}, "X"),
        ({"X": torch.full((4, 5), float("nan"))}, "X"),
        ({"X": torch.zeros(4, 7)}, "X"),
        ({"cost": "cross_entropy"}, "y"),
        ({"rtol": 0.0}, "rtol"),
        ({"output": "scores"}, "output"),
        ({"cutoff": 1e-2, "cost": lambda out, anchor: out.sum() * 0 + 1.0}, "cutoff"),
    ],
)
def test_bad_input_raises_a_clear_error_naming_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _fit(**kwargs)


def test_model_without_trainable_parameters_raises():
    net, X = small_mlp()
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        _fit(model=net, X=X)


def test_not_a_model_raises():
    with pytest.raises(TypeError, match="model"):
        _fit(model=np.eye(3))


def test_flat_parameter_makes_lebesgue_volume_infinite_with_a_warning():
    # input feature 2 is zero on every example: the weight reading it cannot change the outputs
    model, X = quadratic_problem(np.ones(4))
    X[:, 2] = 0.0
    with pytest.warns(RuntimeWarning, match=r"weight\[0, 2\]"):
        est = LocalVolumeEstimator(0.01, "lebesgue", cost="mse", n_samples=8,
                                   random_state=0).fit(model, X)
    assert est.log_volume_ == math.inf
    assert est.flat_parameters_ == ["weight[0, 2]"]


def test_flat_parameter_is_integrated_out_under_a_gaussian_prior():
    from scipy import stats

    model, X = quadratic_problem(np.ones(4) / 0.25, anchor=[0.3, -0.2, 5.0, 0.1])
    X[:, 2] = 0.0  # coordinate 2 is flat, however far its anchor value is from the prior mean
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = LocalVolumeEstimator(1.0, "gaussian", cost="mse", sigma=0.5, n_samples=300,
                                   rtol=1e-6, random_state=0).fit(model, X)
    # remaining 3 coordinates: whitened ball of radius 1 around (0.3, -0.2, 0.1)/0.5
    truth = stats.ncx2.logcdf(1.0, df=3, nc=(0.09 + 0.04 + 0.01) / 0.25)
    assert est.flat_parameters_ == ["weight[0, 2]"]
    assert abs(est.log_volume_ - truth) < 0.05


def test_direction_that_never_crosses_gives_infinite_lebesgue_volume():
    # a cost that saturates below the cutoff along every direction with a negative first weight
    net = torch.nn.Linear(2, 1, bias=False).double()
    X = torch.eye(2, dtype=torch.float64)

    def saturating(outputs, anchor):
        d = outputs - anchor
        return torch.tanh(d.pow(2).mean()) * 0.5  # never reaches 0.9

    with pytest.warns(RuntimeWarning, match="never reached the cutoff"):
        est = LocalVolumeEstimator(0.9, "lebesgue", cost=saturating, n_samples=4,
                                   random_state=0).fit(net, X)
    assert est.log_volume_ == math.inf
    assert (est.samples_["status"] == "unbounded").all()


def test_lebesgue_ball_with_float32_model_is_accurate_to_rtol():
    model, X = quadratic_problem(np.ones(20), dtype=torch.float32)
    est = LocalVolumeEstimator(0.01, "lebesgue", cost="mse", n_samples=4, rtol=1e-4,
                               random_state=0).fit(model, X)
    assert abs(est.log_volume_ - log_ball_volume(20, 0.1)) < 20 * 1e-4


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_n_jobs_gives_identical_samples_under_any_backend(backend):
    import joblib

    net, X = small_mlp()
    ref = LocalVolumeEstimator(sigma=0.5, n_samples=9, random_state=3).fit(net, X)
    with joblib.parallel_config(backend=backend):
        est = LocalVolumeEstimator(sigma=0.5, n_samples=9, random_state=3, n_jobs=2).fit(net, X)
    np.testing.assert_array_equal(est.sample_log_volumes_, ref.sample_log_volumes_)
    np.testing.assert_array_equal(est.samples_["direction"], np.arange(9))


def test_concurrent_fits_in_threads_equal_sequential_fits():
    # torch's forward-mode AD state is process-wide: unguarded JVPs in two threads corrupt
    # each other's tangents (the Taylor guess), which changes the search path
    import threading

    net, X = small_mlp()
    ref = LocalVolumeEstimator(sigma=0.5, n_samples=20, random_state=0).fit(net, X)
    results = [None] * 4

    def run(i):
        est = LocalVolumeEstimator(sigma=0.5, n_samples=20, random_state=0)
        results[i] = est.fit(net, X).sample_log_volumes_

    for _ in range(3):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            np.testing.assert_array_equal(r, ref.sample_log_volumes_)


def test_auto_eps_is_recorded_reused_by_partial_fit_and_score():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=8, preconditioner="diag_hessian",
                               preconditioner_eps="auto", random_state=0).fit(net, X)
    half_decades = -2 * np.log10(est.preconditioner_eps_)  # the search's lattice
    assert half_decades == pytest.approx(round(half_decades), abs=1e-9)
    assert est.eps_pilot_["selected"].sum() == 1
    chosen = est.eps_pilot_.loc[est.eps_pilot_["selected"], "eps"].item()
    assert chosen == est.preconditioner_eps_
    fixed = LocalVolumeEstimator(sigma=0.5, n_samples=12, preconditioner="diag_hessian",
                                 preconditioner_eps=est.preconditioner_eps_,
                                 random_state=0).fit(net, X)
    np.testing.assert_array_equal(fixed.sample_log_volumes_[:8], est.sample_log_volumes_)
    est.partial_fit(net, X, n_samples=4)
    np.testing.assert_array_equal(fixed.sample_log_volumes_, est.sample_log_volumes_)
    assert est.score(X) == pytest.approx(est.log_volume_, abs=1e-9)
    naive = LocalVolumeEstimator(sigma=0.5, n_samples=4, preconditioner_eps="auto",
                                 random_state=0).fit(net, X)
    assert naive.preconditioner_eps_ is None and naive.eps_pilot_ is not None


# ------------------------------------------------------------- the question a fit answers


def fitted_state(est):
    """Every fitted attribute (trailing underscore), arrays and frames copied for comparison."""
    out = {}
    for k, v in vars(est).items():
        if k.endswith("_") and not k.startswith("__"):
            out[k] = v.copy() if hasattr(v, "copy") else v
    return out


def assert_fitted_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        elif hasattr(a[k], "equals"):
            assert a[k].equals(b[k]), k
        else:
            assert a[k] == b[k], k


class RaisingCost:
    """A callable cost that raises ``exc`` on its ``after``-th call (inside the fit)."""

    def __init__(self, exc, after):
        self.exc, self.after, self.calls = exc, after, 0

    def __call__(self, outputs, anchor):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return ((outputs - anchor) ** 2).mean()


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("cost failed")])
def test_failed_fit_leaves_the_previous_fit_exactly_as_it_was(exc):
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0).fit(net, X)
    before = fitted_state(est)
    est.set_params(cost=RaisingCost(exc, after=30), preconditioner_eps="auto",
                   preconditioner="diag_hessian")
    with pytest.raises(type(exc)):
        est.fit(net, X)
    est.set_params(cost="kl", preconditioner_eps=1e-3, preconditioner=None)
    assert_fitted_state_equal(before, fitted_state(est))
    assert est.score() == est.log_volume_


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("cost failed")])
def test_failed_fit_leaves_an_unfitted_estimator_unfitted(exc):
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=6, preconditioner="diag_hessian",
                               preconditioner_eps="auto", cost=RaisingCost(exc, after=8),
                               random_state=0)
    with pytest.raises(type(exc)):
        est.fit(net, X)
    assert fitted_state(est) == {}
    with pytest.raises(NotFittedError):
        check_is_fitted(est)


@pytest.mark.parametrize("change", [
    {"cutoff": 2e-2}, {"sigma": 0.7}, {"measure": "uniform"}, {"bounds": 2.0},
    {"cost": "mse"}, {"preconditioner": "diag_hessian"}, {"preconditioner_eps": 1e-2},
    {"preconditioner_exponent": 0.25}, {"rtol": 1e-2}, {"output": "probabilities"},
])
def test_partial_fit_refuses_a_changed_question(change):
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=4, random_state=0).fit(net, X)
    before = fitted_state(est)
    est.set_params(**change)
    with pytest.raises(ValueError, match=f"{next(iter(change))}.*changed since fit.*Call fit"):
        est.partial_fit(net, X, n_samples=2)
    assert_fitted_state_equal(before, fitted_state(est))


def test_partial_fit_refuses_other_labels_and_allows_bookkeeping_parameters():
    net, X = small_mlp()
    y = torch.arange(X.shape[0]) % 3
    est = LocalVolumeEstimator(sigma=0.5, n_samples=4, cost="cross_entropy",
                               random_state=0).fit(net, X, y)
    with pytest.raises(ValueError, match="different model, X or y"):
        est.partial_fit(net, X, (y + 1) % 3, n_samples=2)
    # n_samples, n_jobs, verbose, batch_size do not change the question
    est.set_params(n_samples=9, batch_size=3, n_jobs=1, verbose=0)
    est.partial_fit(net, X, y, n_samples=2)
    long = LocalVolumeEstimator(sigma=0.5, n_samples=6, cost="cross_entropy",
                                random_state=0).fit(net, X, y)
    np.testing.assert_array_equal(est.sample_log_volumes_, long.sample_log_volumes_)


def test_one_dimensional_X_is_refused_with_its_shape():
    net, _ = small_mlp()  # takes (N, 5)
    with pytest.raises(ValueError, match=r"one output row per example.*reshape\(1, -1\)"):
        LocalVolumeEstimator(sigma=0.5, n_samples=2).fit(net, torch.randn(5))


def test_fitted_estimator_keeps_no_matrix_and_pickles_small():
    net, X = small_mlp()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=8, preconditioner="hessian",
                               random_state=0).fit(net, X)
    n = est.n_parameters_
    for name, value in vars(est).items():
        for obj in ([value] if not hasattr(value, "__dict__") else vars(value).values()):
            if isinstance(obj, torch.Tensor):
                assert obj.numel() < n * n, name  # nothing n × n is kept
    assert len(pickle.dumps(est)) < 32_000
