"""HesScale on any model whose forward is a chain of supported layers, traced with torch.fx."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk.costs import make_cost
from volsk.preconditioners import Diagonal, HesScale, PreconditionerContext
from volsk.preconditioners.curvature.target import curvature_target

X = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(8, 1, 5, 5, generator=torch.Generator().manual_seed(2))


def context(model, X, cost="kl", output="logits"):
    ev = FunctionalModel(model, X, "cpu")
    bound = make_cost(cost, ev.anchor_outputs(), output=output)
    return PreconditionerContext(ev, bound, torch.ones(ev.space.n, dtype=torch.bool),
                                 user_module=model)


def hesscale(model, X, cost="kl", output="logits"):
    return HesScale().curvature(context(model, X, cost, output))


def exact_diagonal(model, X, cost="kl", output="logits"):
    target = curvature_target(context(model, X, cost, output), torch.float64)
    return torch.func.hessian(target.cost_of)(target.anchor).diag()


def snapshot(model):
    return copy.deepcopy(model.state_dict()), model.training, [p.requires_grad
                                                              for p in model.parameters()]


def assert_untouched(model, before):
    state, training, flags = before
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert model.training == training
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------- chains it accepts


class ModuleMLP(nn.Module):
    """fc1 → act → fc2 called in turn in forward, as custom modules are written."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 6)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FunctionalMLP(ModuleMLP):
    """The same network through the functional forms: F.linear on its own weights, F.gelu."""

    def forward(self, x):
        h = F.gelu(F.linear(x, self.fc1.weight, self.fc1.bias))
        return F.linear(h, self.fc2.weight, self.fc2.bias)


class ModuleCNN(nn.Module):
    """conv → relu → view(x.size(0), -1) → dropout → fc → log_softmax, functionally."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1)
        x = F.dropout(x, 0.5, self.training)
        return F.log_softmax(self.fc(x), dim=-1)


class FunctionalCNN(ModuleCNN):
    """F.conv2d with the conv's own settings, an in-place relu, x.flatten(1), x.log_softmax."""

    def forward(self, x):
        x = F.conv2d(x, self.conv.weight, self.conv.bias, self.conv.stride, self.conv.padding)
        x = F.relu(x, inplace=True).flatten(1)
        return self.fc(x).log_softmax(-1)


def sequential_mlp(custom):
    return nn.Sequential(copy.deepcopy(custom.fc1), nn.GELU(), copy.deepcopy(custom.fc2))


def sequential_cnn(custom):
    return nn.Sequential(copy.deepcopy(custom.conv), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         copy.deepcopy(custom.fc), nn.LogSoftmax(dim=-1))


@pytest.mark.parametrize("custom", [ModuleMLP, FunctionalMLP])
def test_custom_module_mlp_gives_the_sequential_diagonal(custom):
    model = custom()
    before = snapshot(model)
    np.testing.assert_allclose(hesscale(model, X).numpy(),
                               hesscale(sequential_mlp(model), X).numpy(), rtol=0, atol=1e-12)
    assert_untouched(model, before)


@pytest.mark.parametrize("custom", [ModuleCNN, FunctionalCNN])
def test_custom_module_cnn_gives_the_sequential_diagonal(custom):
    model = custom()
    before = snapshot(model)
    ours = hesscale(model, IMAGES, output="log_probabilities")
    reference = hesscale(sequential_cnn(model), IMAGES, output="log_probabilities")
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=0, atol=1e-12)
    assert_untouched(model, before)


@pytest.mark.parametrize(("custom", "inputs", "output", "n_last"), [
    (ModuleMLP, X, "logits", 6 * 4 + 4),
    (FunctionalMLP, X, "logits", 6 * 4 + 4),
    (ModuleCNN, IMAGES, "log_probabilities", 18 * 3 + 3),
    (FunctionalCNN, IMAGES, "log_probabilities", 18 * 3 + 3),
])
def test_custom_module_last_layer_is_the_exact_hessian_diagonal(custom, inputs, output, n_last):
    model = custom().double()
    inputs = inputs.double()
    ours = hesscale(model, inputs, output=output)
    exact = exact_diagonal(model, inputs, output=output)
    np.testing.assert_allclose(ours[-n_last:].numpy(), exact[-n_last:].numpy(), rtol=1e-9,
                               atol=1e-14)
    assert float((ours - exact).norm() / exact.norm()) < 0.5  # an approximation below it


def test_skorch_module_class_is_a_chain():
    toy = pytest.importorskip("skorch.toy")
    torch.manual_seed(0)
    # two hidden layers share one ReLU instance (no parameters: allowed); softmax output
    model = toy.MLPModule(input_units=5, output_units=3, hidden_units=6, num_hidden=2,
                          dropout=0.2, output_nonlin=nn.Softmax(dim=-1)).double()
    inputs = X.double()
    ours = hesscale(model, inputs, output="probabilities")
    reference = hesscale(copy.deepcopy(model.sequential), inputs, output="probabilities")
    assert torch.equal(ours, reference)
    exact = exact_diagonal(model, inputs, output="probabilities")
    n_last = 6 * 3 + 3
    np.testing.assert_allclose(ours[-n_last:].numpy(), exact[-n_last:].numpy(), rtol=1e-9,
                               atol=1e-14)


def test_silu_second_derivative_falls_back_to_reverse_mode():
    # torch has no forward-mode derivative of silu_backward: f'' comes from reverse over forward
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 4)).double()
    ours = hesscale(model, X.double())
    z = model[0](X.double()).detach()
    s = torch.sigmoid(z)
    d2 = s * (1 - s) * (2 + z * (1 - 2 * s))  # silu''(z)
    tanh = nn.Sequential(copy.deepcopy(model[0]), nn.Tanh(), copy.deepcopy(model[2]))
    assert torch.isfinite(ours).all() and not torch.equal(ours, hesscale(tanh, X.double()))
    from volsk.preconditioners.curvature.hesscale import _elementwise_derivatives

    d1_silu, d2_silu = _elementwise_derivatives(nn.SiLU(), z)
    torch.testing.assert_close(d2_silu, d2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d1_silu, s * (1 + z * (1 - s)), rtol=1e-12, atol=1e-14)


def test_fit_with_a_custom_module_uses_the_sequential_curvature_and_leaves_it_untouched():
    model = ModuleMLP()
    before = snapshot(model)
    settings = dict(sigma=1.0, n_samples=6, preconditioner_eps=1e-3, random_state=0)
    est = LocalVolumeEstimator(preconditioner="hesscale", **settings).fit(model, X)
    h = hesscale(sequential_mlp(model), X).numpy()
    same = LocalVolumeEstimator(preconditioner=Diagonal(h), **settings).fit(model, X)
    assert est.log_volume_ == same.log_volume_
    assert_untouched(model, before)


# ----------------------------------------------------------------------- graphs it refuses


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x):
        return self.out(x + torch.tanh(self.fc(x)))


class Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(self.norm(self.fc(x)))


class FunctionalNorm(Normalised):
    def forward(self, x):
        return self.out(F.layer_norm(self.fc(x), (6,)))


class SelfAttention(nn.Module):
    """One-head self-attention over a (N, T, d) sequence: fx traces it, it is no chain."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(5, 15)
        self.out = nn.Linear(5, 4)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / 5 ** 0.5, dim=-1)
        return self.out(weights @ v)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(5, 5)
        self.decode = nn.Linear(5, 5)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.tanh(self.encode(x)))


class Concatenated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=-1)


class SoftmaxInside(ModuleMLP):
    def forward(self, x):
        return self.fc2(F.softmax(self.fc1(x), dim=-1))


class TrainingDropout(ModuleMLP):
    def forward(self, x):
        return self.fc2(F.dropout(self.fc1(x), 0.5))  # training=True: not a function of x


class DataDependent(ModuleMLP):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h if h.sum() > 0 else -h)


SEQUENCE = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(("model", "inputs", "match"), [
    (ResidualBlock(), X, r"node 'add' \(call_function add\) combines the previous layer's "
                         r"output with another tensor \('x'\)"),
    (nn.Sequential(nn.Linear(5, 5), ResidualBlock()), X,
     r"node 'add' \(call_function add\) in '1' \(ResidualBlock\)"),
    (Normalised(), X, r"layer 'norm' \(LayerNorm\) is not one of them"),
    (FunctionalNorm(), X, r"node 'layer_norm' \(call_function layer_norm\) is not one of them"),
    (SelfAttention(), SEQUENCE, r"node 'chunk' \(call_method chunk\) is not one of them"),
    (CalledTwice(), X, r"layer 'fc' \(Linear\) uses the parameter 'fc.weight' a second time"),
    (TiedWeights(), X, r"layer 'decode' \(Linear\) uses the parameter 'encode.weight' a second "
                       r"time \(shared weights\)"),
    (Concatenated(), X, r"layer 'b' \(Linear\) is not called on the previous layer's output "
                        r"\('a'\) alone but on 'x': a branch"),
    (SoftmaxInside(), X, r"node 'softmax' .* is followed by layer 'fc2' \(Linear\): only a "
                         r"final Softmax/LogSoftmax"),
    (TrainingDropout(), X, r"node 'dropout' .* is dropout in training mode"),
    (DataDependent(), X, r"torch.fx cannot trace DataDependent.forward \(TraceError"),
])
def test_refusal_names_the_first_offending_node(model, inputs, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        hesscale(model, inputs)
    assert "Use 'diag_hessian' or 'kfac'" in str(info.value)
    assert_untouched(model, before)


def test_attention_language_model_is_refused_by_the_estimator():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64,
                                        vocab_size=97)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    est = LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner="hesscale",
                               preconditioner_eps=1e-3, random_state=0)
    with pytest.raises(ValueError, match=r"torch.fx cannot trace GPTNeoXForCausalLM.forward.*"
                                         r"Use 'diag_hessian' or 'kfac'"):
        est.fit(model, tokens)
    assert_untouched(model, before)
