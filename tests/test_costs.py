"""Costs: KL (masked), cross-entropy (which can decrease), mse and user callables."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call

from models import quadratic_problem
from volsk import LocalVolumeEstimator
from volsk._sampling import draw_directions
from volsk.costs import make_cost
from volsk.preconditioners import Identity, PreconditionerContext


def hand_kl(anchor_logits, logits, mask):
    """Σ_v p log(p/q) averaged over the tokens where mask is 1, with explicit loops."""
    p_all = torch.softmax(anchor_logits.double(), -1).numpy()
    q_all = torch.softmax(logits.double(), -1).numpy()
    total, count = 0.0, 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                p, q = p_all[i, t], q_all[i, t]
                total += sum(p[v] * math.log(p[v] / q[v]) for v in range(p.size))
                count += 1
    return total / count


def test_masked_kl_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    other = anchor + 0.3 * torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    cost = make_cost("kl", anchor, mask=mask)
    assert float(cost(other)) == pytest.approx(hand_kl(anchor, other, mask), rel=1e-12)
    # masked tokens change nothing, whatever their outputs
    scrambled = other.clone()
    scrambled[mask == 0] = 100.0 * torch.randn(int((mask == 0).sum()), 7, generator=gen,
                                               dtype=torch.float64)
    assert float(cost(scrambled)) == float(cost(other))
    assert float(cost(anchor)) == 0.0


def test_token_mask_must_fit_the_outputs():
    anchor = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 3\)"):
        make_cost("kl", anchor, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention_mask is 0 everywhere"):
        make_cost("kl", anchor, mask=torch.zeros(2, 4))
    # a sequence classifier (one row per example): the mask only serves the forward pass
    logits = torch.randn(2, 5)
    assert float(make_cost("kl", logits, mask=torch.ones(2, 9))(logits)) == 0.0


def test_half_precision_outputs_are_compared_in_float32():
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(8, 5, generator=gen)
    other = anchor + 0.05 * torch.randn(8, 5, generator=gen)
    low = make_cost("kl", anchor.bfloat16())(other.bfloat16())
    assert low.dtype == torch.float32
    ref = make_cost("kl", anchor.bfloat16().float())(other.bfloat16().float())
    assert float(low) == float(ref)


def test_cross_entropy_is_the_increase_over_the_anchor_and_can_be_negative():
    anchor = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    cost = make_cost("cross_entropy", anchor, y=y)
    base = torch.nn.functional.cross_entropy(anchor, y)
    better = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(cost(anchor)) == 0.0
    expected = torch.nn.functional.cross_entropy(better, y) - base
    assert float(cost(better)) == pytest.approx(float(expected), rel=1e-6) and expected < 0


def test_cross_entropy_ignores_label_minus_100_and_masked_tokens():
    gen = torch.Generator().manual_seed(2)
    anchor = torch.randn(2, 4, 6, generator=gen)
    other = torch.randn(2, 4, 6, generator=gen)
    y = torch.randint(0, 6, (2, 4), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    y_ignored = y.clone()
    y_ignored[1, 0] = -100
    keep = (mask == 1)
    keep[1, 0] = False
    ce = torch.nn.functional.cross_entropy
    expected = ce(other[keep], y[keep]) - ce(anchor[keep], y[keep])
    got = make_cost("cross_entropy", anchor, y=y_ignored, mask=mask)(other)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "y, match",
    [
        (None, r"needs labels: call fit\(model, X, y\)"),
        (torch.tensor([0, 1, 2]), r"y of shape \(3,\)"),
        (torch.tensor([0, 5]), r"y must hold class indices in \[0, 3\)"),
        (torch.tensor([0.5, 1.0]), "y must hold integer class indices"),
    ],
)
def test_cross_entropy_with_bad_or_missing_y_raises_naming_y(y, match):
    with pytest.raises(ValueError, match=match):
        make_cost("cross_entropy", torch.zeros(2, 3), y=y)


def test_cross_entropy_without_y_in_fit_raises_naming_y():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"cross_entropy.*y"):
        LocalVolumeEstimator(cost="cross_entropy", sigma=1.0, n_samples=2).fit(
            model, torch.randn(4, 3))


def _directions(est, n, k):
    identity = Identity().bind(PreconditionerContext(None, None, torch.ones(n, dtype=bool)))
    U, _ = draw_directions(n, range(k), est.seed_, identity)
    return U


def test_cross_entropy_radius_is_the_first_crossing_also_where_the_loss_first_decreases():
    gen = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    X = torch.randn(40, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)  # labels the net does not fit: slopes both ways
    k, cutoff, rtol = 24, 0.02, 1e-3
    est = LocalVolumeEstimator(cutoff, sigma=1.0, cost="cross_entropy", n_samples=k, rtol=rtol,
                               random_state=0).fit(net, X, y)
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
    U = _directions(est, theta.numel(), k)

    def increase(points):  # (M, n) → (M,) cross-entropy increase, computed independently
        out = []
        for flat in points:
            params = dict(zip(names, [t.reshape(s).float() for t, s in
                                      zip(torch.split(flat, [math.prod(s) for s in shapes]),
                                          shapes, strict=True)], strict=True))
            logits = functional_call(net, params, (X,))
            out.append(float(torch.nn.functional.cross_entropy(logits, y)))
        return np.asarray(out) - float(torch.nn.functional.cross_entropy(net(X), y))

    decreasing = 0
    with torch.no_grad():
        for i in range(k):
            R = est.radii_[i]
            assert np.isfinite(R)
            assert abs(increase((theta + R * U[i])[None])[0] - cutoff) <= rtol * cutoff + 1e-6
            before = increase(theta + torch.linspace(0, R, 41)[1:-1, None].double() * U[i])
            assert (before < cutoff).all(), i  # no earlier crossing was skipped
            decreasing += bool(before[0] < 0)
    assert decreasing >= 3, "the check needs directions along which the loss first decreases"


def test_decreasing_cost_radii_match_the_off_centre_ball_exactly():
    # cost(δ) = |δ − c|² − |c|²: negative towards c; the neighbourhood is the ball of radius
    # √(ε + |c|²) around c, and along u the radius is u·c + √((u·c)² + ε)
    n, cutoff = 5, 0.01
    c = torch.tensor([0.08, -0.05, 0.0, 0.03, 0.1], dtype=torch.float64)
    model, X = quadratic_problem(np.ones(n))
    t = (math.sqrt(n) * c)[:, None]  # outputs − anchor = √n·δ per example

    def shifted(outputs, anchor):
        return ((outputs - anchor - t) ** 2).mean() - (t**2).mean()

    k = 80
    est = LocalVolumeEstimator(cutoff, "lebesgue", cost=shifted, n_samples=k, rtol=1e-6,
                               random_state=0).fit(model, X)
    uc = _directions(est, n, k) @ c
    expected = (uc + torch.sqrt(uc**2 + cutoff)).numpy()
    assert (uc > 0.05).sum() >= 5  # cost decreasing at first along several directions
    np.testing.assert_allclose(est.radii_, expected, rtol=1e-5)


def test_mse_is_torch_mse_loss_and_masked_over_tokens():
    gen = torch.Generator().manual_seed(4)
    anchor = torch.randn(3, 4, 2, generator=gen)
    other = torch.randn(3, 4, 2, generator=gen)
    assert float(make_cost("mse", anchor)(other)) == pytest.approx(
        float(torch.nn.functional.mse_loss(other, anchor)))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    keep = mask.bool()
    expected = torch.nn.functional.mse_loss(other[keep], anchor[keep])
    assert float(make_cost("mse", anchor, mask=mask)(other)) == pytest.approx(float(expected))


def test_user_callables_get_y_and_mask_only_when_they_take_them():
    anchor = torch.randn(4, 3)
    other = anchor + 1.0
    y = torch.tensor([0, 1, 2, 0])
    seen = {}

    def two(outputs, anchor_outputs):
        return (outputs - anchor_outputs).abs().mean()

    def three(outputs, anchor_outputs, y):
        seen["y"] = y
        return (outputs - anchor_outputs).abs().mean()

    assert float(make_cost(two, anchor, y=y)(other)) == 1.0  # y given but not wanted
    assert float(make_cost(three, anchor, y=y)(other)) == 1.0 and seen["y"] is y
    with pytest.raises(ValueError, match="takes labels y, but fit got y=None"):
        make_cost(three, anchor)

    seq = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    def with_mask(outputs, anchor_outputs, mask=None):
        seen["mask"] = mask
        return (outputs - anchor_outputs).abs().mean()

    make_cost(with_mask, seq, mask=mask)(seq)
    assert seen["mask"] is mask


def test_user_callable_must_return_a_scalar_tensor():
    anchor = torch.randn(4, 3)
    with pytest.raises(ValueError, match="scalar"):
        make_cost(lambda out, a: (out - a).pow(2), anchor)(anchor)
    with pytest.raises(TypeError, match="torch.Tensor"):
        make_cost(lambda out, a: 0.0, anchor)(anchor)


def test_mse_and_callable_costs_run_on_a_regressor():
    gen = torch.Generator().manual_seed(5)
    reg = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    X = torch.randn(30, 3, generator=gen)
    mse = LocalVolumeEstimator(1e-3, cost="mse", sigma=0.5, n_samples=6,
                               random_state=0).fit(reg, X)
    same = LocalVolumeEstimator(
        1e-3, cost=lambda out, a: torch.nn.functional.mse_loss(out, a), sigma=0.5, n_samples=6,
        random_state=0).fit(reg, X)
    assert np.isfinite(mse.log_volume_)
    # the same cost, up to rounding: "mse" on a plain MLP is reduced in the fast path's
    # transposed layout (volsk._stacked), the callable under vmap. Both searches stop within
    # rtol of the cutoff, so radii agree to ~rtol and log-volumes to ~n·rtol.
    assert mse._evaluator.stacked is not None
    np.testing.assert_allclose(same.radii_, mse.radii_, rtol=2 * mse.rtol)
    np.testing.assert_allclose(same.sample_log_volumes_, mse.sample_log_volumes_,
                               atol=mse.n_parameters_ * mse.rtol)


# --------------------------------------------------------------- what the outputs are


def binary_net(seed=0):
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net, torch.randn(48, 4, generator=gen)


class TwoLogits(torch.nn.Module):
    """The same classifier with the logits (0, z): softmax([0, z]) = (1 − σ(z), σ(z))."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], 1)


def test_one_logit_is_a_bernoulli_kl_equal_to_the_two_class_kl():
    net, X = binary_net()
    anchor, other = net(X).detach(), net(X).detach() + 0.3
    bernoulli = make_cost("kl", anchor, output="binary_logits")(other)
    two = make_cost("kl", TwoLogits(torch.nn.Identity())(anchor))(TwoLogits(
        torch.nn.Identity())(other))
    assert float(bernoulli) > 0
    torch.testing.assert_close(bernoulli, two, rtol=1e-5, atol=0)
    probs = make_cost("kl", torch.sigmoid(anchor), output="binary_probabilities")
    torch.testing.assert_close(probs(torch.sigmoid(other)), two, rtol=1e-4, atol=0)


def test_a_one_logit_classifier_is_read_as_binary_and_matches_its_two_logit_twin():
    net, X = binary_net()
    est = LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=12, random_state=0).fit(net, X)
    twin = LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=12, random_state=0).fit(
        TwoLogits(net), X)
    assert (est.samples_["status"] == "crossed").all()  # not "unbounded": the KL is not 0
    np.testing.assert_allclose(est.sample_log_volumes_, twin.sample_log_volumes_, rtol=1e-5)


def test_a_skorch_net_with_a_binary_criterion_is_read_as_binary():
    from skorch import NeuralNetBinaryClassifier

    net, X = binary_net()
    Xn, y = X.numpy(), (X[:, 0] > 0).float().numpy()

    class Squeezed(torch.nn.Module):  # skorch's binary classifier wants (N,) logits
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).squeeze(-1)

    clf = NeuralNetBinaryClassifier(Squeezed, max_epochs=1, train_split=None, verbose=0)
    clf.fit(Xn, y)
    est = LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=6, random_state=0).fit(clf, Xn)
    assert np.isfinite(est.log_volume_)
    assert (est.samples_["status"] == "crossed").all()


@pytest.mark.parametrize("out_features, output, match", [
    (1, "logits", r"\(48, 1\).*identically 0.*binary_logits"),
    (1, "probabilities", r"\(48, 1\).*binary_probabilities"),
    (3, "binary_logits", r"one output per example.*\(48, 3\)"),
])
def test_outputs_the_cost_cannot_read_are_refused_with_the_shape(out_features, output, match):
    net = torch.nn.Linear(4, out_features)
    with pytest.raises(ValueError, match=match):
        LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=2, output=output).fit(
            net, torch.randn(48, 4))


def test_vector_outputs_are_refused_under_kl():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)  # (N,): one logit per example, not a distribution

    with pytest.raises(ValueError, match=r"shape \(48,\).*binary_logits"):
        LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=2).fit(Flat(), torch.randn(48, 4))
    est = LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=4, output="binary_logits",
                               random_state=0).fit(Flat(), torch.randn(48, 4))
    assert np.isfinite(est.log_volume_)


def test_probability_outputs_read_as_logits_warn():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(-1))
    with pytest.warns(UserWarning, match="look like probabilities.*output='probabilities'"):
        LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=2).fit(net, torch.randn(48, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LocalVolumeEstimator(1e-2, sigma=1.0, n_samples=2, output="probabilities").fit(
            net, torch.randn(48, 4))


def test_binary_cross_entropy_takes_zero_one_labels():
    net, X = binary_net()
    y = (X[:, 0] > 0).long()
    anchor = net(X).detach()
    cost = make_cost("cross_entropy", anchor, output="binary_logits", y=y)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        anchor[:, 0] + 0.5, y.float()) - torch.nn.functional.binary_cross_entropy_with_logits(
        anchor[:, 0], y.float())
    torch.testing.assert_close(cost(anchor + 0.5), expected, rtol=1e-5, atol=1e-7)
