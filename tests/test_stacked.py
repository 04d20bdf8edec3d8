"""The plain-MLP fast path for batched costs (volsk._stacked): same numbers as vmap, or unused."""

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
}


def vmap_costs(ev, cost, thetas):
    return _vmap_rows(lambda flat: cost(ev.outputs(flat)), thetas).double()


@pytest.mark.parametrize("name", list(ELIGIBLE))
@pytest.mark.parametrize("cost_name", ["kl", "mse"])
def test_stacked_costs_equal_the_vmapped_path_bit_for_bit(name, cost_name):
    net = ELIGIBLE[name]()
    dtype = next(net.parameters()).dtype
    X = torch.randn(30, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    ev = FunctionalModel(net, X, "cpu")
    assert ev.stacked is not None
    cost = make_cost(cost_name, ev.anchor_outputs())
    gen = torch.Generator().manual_seed(2)
    for B in (1, 2, 5, 16):
        thetas = ev.theta + 0.3 * torch.randn(B, ev.theta.numel(), generator=gen,
                                              dtype=torch.float64)
        fast = ev.costs(cost, thetas)
        slow = vmap_costs(ev, cost, thetas)
        assert torch.equal(fast, slow), (B, (fast - slow).abs().max())


def test_stacked_costs_over_data_batches_equal_the_vmapped_path():
    net = ELIGIBLE["linear-gelu-linear"]()
    X = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    est = LocalVolumeEstimator(sigma=0.5, n_samples=12, data_batch_size=16, random_state=0)
    est.fit(net, X)
    assert est._problem.evaluator.stacked is not None
    off = LocalVolumeEstimator(sigma=0.5, n_samples=12, data_batch_size=16, random_state=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacked_module.StackedMLP, "of", classmethod(lambda cls, *a: None))
        off.fit(net, X)
    assert off._problem.evaluator.stacked is None
    np.testing.assert_array_equal(est.sample_log_volumes_, off.sample_log_volumes_)
    assert est.n_evaluations_ == off.n_evaluations_


class Scaled(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _hooked():
    net = ELIGIBLE["linear-gelu-linear"]()
    net[0].register_forward_hook(lambda m, i, o: o * 0.5)
    return net


def _frozen():
    net = ELIGIBLE["linear-gelu-linear"]()
    net[2].bias.requires_grad_(False)
    return net


INELIGIBLE = {
    "subclass of Linear": lambda: mlp(Scaled(6, 8), nn.GELU(), nn.Linear(8, 3)),
    "forward hook": _hooked,
    "frozen parameter": _frozen,
    "batch norm (buffers)": lambda: mlp(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
    "softmax (not pointwise)": lambda: mlp(nn.Linear(6, 8), nn.Softmax(-1), nn.Linear(8, 3)),
    "nested Sequential": lambda: mlp(nn.Sequential(nn.Linear(6, 8), nn.GELU()),
                                     nn.Linear(8, 3)),
    "PReLU (a parameter)": lambda: mlp(nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 3)),
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


def test_sequence_inputs_take_the_general_path():
    net = ELIGIBLE["linear-gelu-linear"]()
    X = torch.randn(4, 5, 6)  # (N, T, features): not one (N, features) matrix
    assert FunctionalModel(net, X, "cpu").stacked is None
