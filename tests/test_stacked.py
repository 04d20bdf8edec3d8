"""The plain-MLP fast path for batched costs (volsk._stacked): the numbers of the vmapped path
up to rounding (checked against float64), independent of the batch, or unused."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import volsk._stacked as stacked_module
from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel, _vmap_rows
from volsk.costs import make_cost


def mlp(*layers, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(*layers).to(dtype)


ELIGIBLE = {
    "linear-gelu-linear": lambda: mlp(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)),
    "three layers, relu, dropout": lambda: mlp(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3),
                                               nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)),
    "no bias": lambda: mlp(nn.Linear(6, 5, bias=False), nn.SiLU(), nn.Linear(5, 3, bias=False)),
    "one layer, float64": lambda: mlp(nn.Linear(6, 3), dtype=torch.float64),
    "identity and sigmoid": lambda: mlp(nn.Identity(), nn.Linear(6, 4), nn.Sigmoid(),
                                        nn.Linear(4, 2)),
    "one activation instance used twice": lambda: _shared_activation(),
}


def _shared_activation():
    act = nn.Tanh()  # named_children() would yield it once
    return mlp(nn.Linear(6, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3))


def _tied():
    lin = nn.Linear(8, 8)
    return mlp(nn.Linear(6, 8), nn.ReLU(), lin, nn.ReLU(), lin, nn.Linear(8, 3))


def vmap_costs(ev, cost, thetas):
    return _vmap_rows(lambda flat: cost(ev.outputs(flat)), thetas).double()


def exact_outputs(net, X, thetas):
    """The outputs at each (model-dtype-rounded) row of ``thetas``, computed in float64."""
    ev64 = FunctionalModel(copy.deepcopy(net).double(), X.double(), "cpu")
    dtype = next(net.parameters()).dtype
    with torch.no_grad():
        return torch.stack([ev64.outputs(row.to(dtype).double()) for row in thetas])


def setup(name, cost_name, B, seed=2):
    net = ELIGIBLE[name]()
    dtype = next(net.parameters()).dtype
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    ev = FunctionalModel(net, X, "cpu")
    assert ev.stacked is not None
    cost = make_cost(cost_name, ev.anchor_outputs())
    gen = torch.Generator().manual_seed(seed)
    thetas = ev.theta + 0.3 * torch.randn(B, ev.theta.numel(), generator=gen,
                                          dtype=torch.float64)
    return net, X, ev, cost, thetas


@pytest.mark.parametrize("name", list(ELIGIBLE))
def test_stacked_outputs_at_the_anchor_are_the_models_own(name):
    net = ELIGIBLE[name]()
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1)).to(
        next(net.parameters()).dtype)
    ev = FunctionalModel(net, X, "cpu")
    with torch.no_grad():
        fast = ev.stacked.outputs(ev.theta[None], X)[0]
        own = net.eval()(X)
    eps = torch.finfo(own.dtype).eps
    assert float((fast - own).abs().max()) <= 50 * eps * float(own.abs().max())


@pytest.mark.parametrize("name", list(ELIGIBLE))
@pytest.mark.parametrize("B", [1, 2, 5, 16])
def test_stacked_outputs_are_as_accurate_as_the_vmapped_path(name, B):
    """Both paths against a float64 evaluation: the fast path differs by rounding only."""
    net, X, ev, _, thetas = setup(name, "mse", B)
    exact = exact_outputs(net, X, thetas)
    with torch.no_grad():
        fast = ev.stacked.outputs(thetas, X)[:B].double()
        slow = torch.stack([ev.outputs(row) for row in thetas]).double()
    assert fast.shape == exact.shape
    eps = torch.finfo(next(net.parameters()).dtype).eps
    scale = float(exact.abs().max())
    err_fast = float((fast - exact).abs().max())
    err_slow = float((slow - exact).abs().max())
    # a few roundings per layer of a width-8 product: well within 50·eps of the largest output
    assert err_fast <= 50 * eps * scale, (err_fast, scale)
    assert err_fast <= max(4 * err_slow, 4 * eps * scale)


def user_cost(outputs, anchor):
    return (outputs - anchor).abs().mean()


@pytest.mark.parametrize("name", list(ELIGIBLE))
@pytest.mark.parametrize("cost_name", ["kl", "mse", user_cost])
def test_stacked_costs_agree_with_the_vmapped_path(name, cost_name):
    """kl and mse through their ``features_first`` reductions, other costs through vmap."""
    net, X, ev, cost, thetas = setup(name, cost_name, 16)
    assert hasattr(cost, "features_first") == (cost_name in ("kl", "mse"))
    fast = ev.costs(cost, thetas)
    slow = vmap_costs(ev, cost, thetas)
    eps = torch.finfo(next(net.parameters()).dtype).eps
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=1e3 * eps, atol=1e3 * eps)


@pytest.mark.parametrize("name", list(ELIGIBLE))
@pytest.mark.parametrize("cost_name", ["kl", "mse"])
def test_a_rows_cost_does_not_depend_on_its_batch(name, cost_name):
    """Bit for bit: the guarantee behind batch_size / n_jobs / partial_fit invariance."""
    _, _, ev, cost, thetas = setup(name, cost_name, 16)
    together = ev.costs(cost, thetas)
    for B in (1, 2, 5, 7):
        parts = torch.cat([ev.costs(cost, thetas[i : i + B]) for i in range(0, 16, B)])
        assert torch.equal(parts, together), (B, (parts - together).abs().max())


def test_fits_with_and_without_the_fast_path_agree():
    net = ELIGIBLE["linear-gelu-linear"]()
    X = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    rtol = 1e-3
    est = LocalVolumeEstimator(sigma=0.5, n_samples=12, data_batch_size=16, rtol=rtol,
                               random_state=0)
    est.fit(net, X)
    assert est._evaluator.stacked is not None
    off = LocalVolumeEstimator(sigma=0.5, n_samples=12, data_batch_size=16, rtol=rtol,
                               random_state=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacked_module.StackedMLP, "of", classmethod(lambda cls, *a: None))
        off.fit(net, X)
    assert off._evaluator.stacked is None
    # both searches stop within rtol of the cutoff, so radii agree to ~rtol and each sample's
    # log-volume (a radial integral over n dimensions) to ~n·rtol
    np.testing.assert_allclose(est.radii_, off.radii_, rtol=2 * rtol)
    np.testing.assert_allclose(est.sample_log_volumes_, off.sample_log_volumes_,
                               atol=est.n_parameters_ * rtol)


class Scaled(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _weight_normed():
    net = ELIGIBLE["linear-gelu-linear"]()
    nn.utils.parametrizations.weight_norm(net[0])  # net[0] becomes a subclass of Linear
    return net


def _frozen():
    net = ELIGIBLE["linear-gelu-linear"]()
    net[2].bias.requires_grad_(False)
    return net


INELIGIBLE = {
    "subclass of Linear": lambda: mlp(Scaled(6, 8), nn.GELU(), nn.Linear(8, 3)),
    "weight norm (a parametrized Linear)": _weight_normed,
    "frozen parameter": _frozen,
    "batch norm (buffers)": lambda: mlp(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
    "softmax (not pointwise)": lambda: mlp(nn.Linear(6, 8), nn.Softmax(-1), nn.Linear(8, 3)),
    "nested Sequential": lambda: mlp(nn.Sequential(nn.Linear(6, 8), nn.GELU()),
                                     nn.Linear(8, 3)),
    "PReLU (a parameter)": lambda: mlp(nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 3)),
    "a Linear used twice (tied weights)": _tied,
}


@pytest.mark.parametrize("name", list(INELIGIBLE))
def test_other_modules_take_the_general_path(name):
    net = INELIGIBLE[name]()
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    ev = FunctionalModel(net, X, "cpu")
    assert ev.stacked is None
    # and the general path still evaluates the model as it is (the hook, the subclass)
    cost = make_cost("mse", ev.anchor_outputs())
    thetas = ev.theta + 0.1 * torch.randn(3, ev.theta.numel(), dtype=torch.float64)
    with torch.no_grad():
        expected = []
        for row in thetas:
            net_copy = ev.module
            out = torch.func.functional_call(net_copy, ev.space.unflatten(row), (ev.X,))
            expected.append(float(cost(out)))
    np.testing.assert_allclose(ev.costs(cost, thetas).numpy(), expected, rtol=1e-5)


def test_a_hooked_mlp_takes_the_fast_path_with_the_numbers_of_the_mlp_without_hooks():
    # no hook runs on volsk's private copy (they would see batched tensors): a hook that
    # changes a layer's output is not part of what is measured, and a warning says so
    net = ELIGIBLE["linear-gelu-linear"]()
    plain = copy.deepcopy(net)
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(o) or o * 0.5)
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"forward hooks.*on 0\)"):
        ev = FunctionalModel(net, X, "cpu")
    assert ev.stacked is not None
    ref = FunctionalModel(plain, X, "cpu")
    cost = make_cost("mse", ref.anchor_outputs())
    thetas = ev.theta + 0.1 * torch.randn(5, ev.theta.numel(), dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(2))
    assert torch.equal(ev.costs(cost, thetas), ref.costs(cost, thetas))
    assert torch.equal(ev.anchor_outputs(), ref.anchor_outputs())
    assert calls == []
    net(X)
    assert len(calls) == 1  # the user's model keeps its hook


def test_sequence_inputs_take_the_general_path():
    net = ELIGIBLE["linear-gelu-linear"]()
    X = torch.randn(4, 5, 6)  # (N, T, features): not one (N, features) matrix
    assert FunctionalModel(net, X, "cpu").stacked is None


ACTIVATIONS = [nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.ELU, nn.Softplus, nn.Mish, nn.ReLU]


@pytest.mark.parametrize("seed", range(12))
def test_random_mlps_costs_do_not_depend_on_the_batch(seed):
    """Random widths, depths, activations and numbers of examples: pointwise ops see padded
    rows (volsk._stacked.ROW_ALIGN), so no direction's numbers fall in a kernel's scalar tail
    for one batch size and not for another."""
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 14, size=rng.integers(2, 5))]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[rng.integers(len(ACTIVATIONS))]()]
    net = mlp(*layers[:-1], nn.Linear(widths[-1], 3), seed=seed)
    X = torch.randn(int(rng.integers(3, 60)), widths[0],
                    generator=torch.Generator().manual_seed(seed))
    ev = FunctionalModel(net, X, "cpu")
    assert ev.stacked is not None
    gen = torch.Generator().manual_seed(seed)
    thetas = ev.theta + 0.5 * torch.randn(13, ev.theta.numel(), generator=gen,
                                          dtype=torch.float64)
    for cost_name in ("kl", "mse"):
        cost = make_cost(cost_name, ev.anchor_outputs())
        together = ev.costs(cost, thetas)
        for B in (1, 2, 3, 5, 7):
            parts = torch.cat([ev.costs(cost, thetas[i : i + B]) for i in range(0, 13, B)])
            assert torch.equal(parts, together), (widths, cost_name, B)


@pytest.mark.parametrize("cost_name", ["kl", "mse"])
def test_features_first_reductions_equal_the_per_example_cost(cost_name):
    gen = torch.Generator().manual_seed(3)
    anchor = torch.randn(37, 5, generator=gen)
    cost = make_cost(cost_name, anchor)
    outputs = anchor + 0.3 * torch.randn(6, 37, 5, generator=gen)
    expected = torch.stack([cost(o) for o in outputs])
    got = cost.features_first(outputs.transpose(1, 2).contiguous())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_costs_with_a_mask_or_sequences_have_no_features_first():
    logits = torch.randn(4, 3, 5)
    assert not hasattr(make_cost("kl", logits), "features_first")
    assert not hasattr(make_cost("mse", logits, mask=torch.ones(4, 3)), "features_first")
    assert not hasattr(make_cost("kl", logits[:, 0], output="probabilities"), "features_first")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_mlps_resolve_their_crossings(dtype):
    """θ + r·u is formed in float32 (ray_dtype), each parameter rounded once to the model's
    dtype: a half-precision r would move all parameters in the same coarse steps (0.4 % for
    bfloat16) and the search could not meet rtol. Also: a bfloat16 X hashes (partial_fit's
    fingerprint), though NumPy has no bfloat16."""
    net = ELIGIBLE["linear-gelu-linear"]().to(dtype)
    X = torch.randn(200, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    est = LocalVolumeEstimator(1e-2, sigma=0.5, n_samples=20, rtol=1e-2, random_state=0)
    est.fit(net, X)
    assert est._evaluator.stacked is not None
    assert est._evaluator.ray_dtype == torch.float32
    assert np.isfinite(est.log_volume_)
    samples = est.samples_
    assert (samples["status"] == "crossed").all()
    np.testing.assert_allclose(samples["cost_at_radius"], 1e-2, rtol=1e-2)
    est.partial_fit(net, X, n_samples=5)
    assert len(est.sample_log_volumes_) == 25


def test_fits_of_a_tail_prone_mlp_do_not_depend_on_batch_size():
    """The 6-4-2 sigmoid net whose vmapped costs differ in the last bits between batch sizes
    (torch's scalar kernel tails): on the padded fast path, fits agree bit for bit."""
    net = ELIGIBLE["identity and sigmoid"]()
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    fits = [LocalVolumeEstimator(sigma=0.5, n_samples=13, rtol=1e-6, batch_size=bs,
                                 random_state=0).fit(net, X) for bs in (1, 2, 5, 7, None)]
    assert fits[0]._evaluator.stacked is not None
    for other in fits[1:]:
        np.testing.assert_array_equal(other.sample_log_volumes_, fits[0].sample_log_volumes_)
        np.testing.assert_array_equal(other.radii_, fits[0].radii_)


class Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("wrap", [False, True], ids=["fast path", "general path"])
def test_inplace_activations_leave_X_and_the_model_alone(wrap):
    """inplace=True activations (a leading one would overwrite X, and torch.func refuses to
    mutate a captured tensor): volsk's private copy computes out of place."""
    net = mlp(nn.LeakyReLU(0.1, inplace=True), nn.Linear(6, 8),
              nn.LeakyReLU(0.1, inplace=True), nn.Linear(8, 3))
    model = Wrapped(net) if wrap else net
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    before = X.clone()
    est = LocalVolumeEstimator(sigma=0.5, n_samples=8, random_state=0).fit(model, X)
    assert (est._evaluator.stacked is None) == wrap
    assert torch.equal(X, before)
    assert net[0].inplace and net[2].inplace  # the user's modules keep their flags
    ev = est._evaluator
    with torch.no_grad():
        own = net(before.clone())
        torch.testing.assert_close(ev.anchor_outputs(), own)
        if not wrap:
            torch.testing.assert_close(ev.stacked.outputs(ev.theta[None], X)[0], own)
