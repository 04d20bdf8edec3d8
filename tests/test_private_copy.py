"""volsk's private copy of the model: no user hook runs on it, and weights computed from other
parameters (weight normalisation, spectral normalisation, pruning) follow those parameters."""

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel, ParameterSpace
from volsk.costs import make_cost
from volsk.measures import Gaussian


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_state_equal(before, model):
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k].detach()), k


def mlp(seed=0):
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    X = torch.randn(24, 4, generator=gen)
    return net.double(), X.double()


def weight_normed(kind, seed=0):
    """``mlp(seed)`` with weight normalisation on both Linear layers (kind "new" or "legacy")."""
    net, X = mlp(seed)
    for i in (0, 2):
        if kind == "new":
            torch.nn.utils.parametrizations.weight_norm(net[i])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in use
                torch.nn.utils.weight_norm(net[i])
    return net, X


def set_flat(model, flat):
    """Write the flat vector into the model's trainable parameters (named_parameters order)."""
    space = ParameterSpace.of(model)
    values = space.unflatten(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in values:
                p.copy_(values[name])


# --------------------------------------------------------------------- weight normalisation


@pytest.mark.parametrize("kind", ["new", "legacy"])
def test_weight_normed_model_fits_untouched_with_zero_cost_at_the_anchor(kind):
    net, X = weight_normed(kind)
    expected = net(X).detach()
    before = state(net)
    names = [k for k, _ in net.named_parameters()]
    assert ("0.weight_g" in names) == (kind == "legacy")
    assert ("0.parametrizations.weight.original0" in names) == (kind == "new")
    for preconditioner in (None, "diag_hessian"):
        est = LocalVolumeEstimator(sigma=0.5, n_samples=6, preconditioner=preconditioner,
                                   random_state=0).fit(net, X)
        assert np.isfinite(est.log_volume_)
        assert est.n_parameters_ == sum(p.numel() for p in net.parameters())
    assert_state_equal(before, net)  # originals (g, v) included
    assert torch.equal(net(X).detach(), expected)

    ev = FunctionalModel(net, X, "cpu")
    assert ev.stacked is None  # the plain-MLP fast path would read the wrong tensors
    anchor = ev.anchor_outputs()
    torch.testing.assert_close(anchor, expected, rtol=1e-12, atol=1e-12)
    assert float(make_cost("mse", anchor)(ev.outputs(ev.theta))) == 0.0
    assert float(make_cost("kl", anchor)(ev.outputs(ev.theta))) == 0.0


@pytest.mark.parametrize("kind", ["new", "legacy"])
def test_private_copy_recomputes_the_weight_from_perturbed_g_and_v(kind):
    # the weight is a function of its originals: the copy's outputs at θ' are the model's
    # outputs with θ' written into g and v (the user's model recomputes it in its own forward)
    net, X = weight_normed(kind)
    ev = FunctionalModel(net, X, "cpu")
    gen = torch.Generator().manual_seed(1)
    thetas = ev.theta + 0.3 * torch.randn(5, ev.space.n, generator=gen, dtype=torch.float64)
    reference, _ = weight_normed(kind)
    for theta in thetas:
        set_flat(reference, theta)
        torch.testing.assert_close(ev.outputs(theta), reference(X).detach(), rtol=1e-12,
                                   atol=1e-12)
    # and the batched costs (vmap) agree with one-at-a-time evaluations
    cost = make_cost("mse", ev.anchor_outputs())
    one_by_one = torch.stack([cost(ev.outputs(t)) for t in thetas]).double()
    torch.testing.assert_close(ev.costs(cost, thetas), one_by_one, rtol=1e-12, atol=1e-15)


def test_legacy_and_parametrization_weight_norm_give_identical_estimates():
    new, X = weight_normed("new")
    legacy, _ = weight_normed("legacy")
    # the same g, v, b in the same order: bias, g, v per layer under both APIs
    assert [p.shape for p in new.parameters()] == [p.shape for p in legacy.parameters()]
    for a, b in zip(new.parameters(), legacy.parameters(), strict=True):
        assert torch.equal(a, b)
    kw = dict(sigma=0.5, n_samples=8, random_state=3)
    a = LocalVolumeEstimator(**kw).fit(new, X)
    b = LocalVolumeEstimator(**kw).fit(legacy, X)
    np.testing.assert_array_equal(a.sample_log_volumes_, b.sample_log_volumes_)


def test_weight_norm_probability_matches_brute_force_monte_carlo():
    # w = g·v/|v| on a 2-input linear model: 3 parameters, one of them (the length of v) flat
    # along a half-line. Ground truth: the fraction of prior draws θ' whose whole segment
    # θ → θ' stays below the cutoff (the star domain), on a fine grid of the segment.
    lin = torch.nn.Linear(2, 1, bias=False).double()
    torch.nn.utils.parametrizations.weight_norm(lin)
    theta = torch.tensor([1.0, 0.6, 0.8], dtype=torch.float64)  # g, v
    set_flat(lin, theta)
    X = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma, cutoff = 0.3, 0.05

    gen = torch.Generator().manual_seed(1)
    anchor = theta[0] * (X @ theta[1:]) / theta[1:].norm()  # (N,)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)[1:]
    draws, inside = 40_000, 0
    for _ in range(draws // 10_000):
        ends = theta + sigma * torch.randn(10_000, 3, generator=gen, dtype=torch.float64)
        path = theta + t[None, :, None] * (ends - theta)[:, None, :]  # (m, T, 3)
        out = path[..., :1] * (path[..., 1:] @ X.T) / path[..., 1:].norm(dim=-1, keepdim=True)
        cost = (out - anchor).pow(2).mean(-1)  # (m, T)
        inside += int((cost.max(dim=1).values < cutoff).sum())
    p = inside / draws
    truth, truth_se = math.log(p), math.sqrt((1 - p) / (p * draws))

    est = LocalVolumeEstimator(cutoff, Gaussian(sigma=sigma, mean=theta.numpy()), cost="mse",
                               n_samples=3000, random_state=0).fit(lin, X)
    w = np.exp(est.sample_log_volumes_ - est.sample_log_volumes_.max())
    se = math.hypot(w.std() / w.mean() / math.sqrt(w.size), truth_se)
    assert 0.1 < p < 0.3 and se < 0.03
    assert abs(est.log_volume_ - truth) < 4 * se


def test_diag_hessian_of_weight_normed_model_is_the_hessian_in_g_and_v():
    # ground truth: autograd's Hessian of a hand-written mse cost of (b, g, v) per layer; given
    # as the diagonal curvature, it must give the directions "diag_hessian" gives
    net, X = weight_normed("new")
    space = ParameterSpace.of(net)
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    anchor = net(X).detach()

    def layer(p, prefix, h):
        g = p[f"{prefix}.parametrizations.weight.original0"]
        v = p[f"{prefix}.parametrizations.weight.original1"]
        return h @ (g * v / v.norm(dim=1, keepdim=True)).T + p[f"{prefix}.bias"]

    def cost(flat):
        p = space.unflatten(flat)
        return (layer(p, "2", torch.tanh(layer(p, "0", X))) - anchor).pow(2).mean()

    exact = torch.autograd.functional.hessian(cost, theta).diagonal()
    kw = dict(sigma=0.5, cost="mse", n_samples=8, random_state=0)
    by_volsk = LocalVolumeEstimator(preconditioner="diag_hessian", **kw).fit(net, X)
    by_hand = LocalVolumeEstimator(preconditioner=exact.numpy(), **kw).fit(net, X)
    np.testing.assert_allclose(by_volsk.sample_log_volumes_, by_hand.sample_log_volumes_,
                               rtol=1e-9)
    assert not np.allclose(
        by_hand.sample_log_volumes_,
        LocalVolumeEstimator(preconditioner=None, **kw).fit(net, X).sample_log_volumes_)


def test_weight_normed_model_runs_in_process_workers():
    # torch's parametrized modules refuse to pickle; volsk's private copy does not
    import joblib

    net, X = weight_normed("new")
    ref = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0).fit(net, X)
    with joblib.parallel_config(backend="loky"):
        est = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0, n_jobs=2).fit(net, X)
    np.testing.assert_array_equal(est.sample_log_volumes_, ref.sample_log_volumes_)
    ev = pickle.loads(pickle.dumps(FunctionalModel(net, X, "cpu")))
    torch.testing.assert_close(ev.anchor_outputs(), net(X).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["prune", "spectral_norm"])
def test_pruned_and_spectral_normed_weights_follow_their_parameters(kind):
    # both recompute the weight in a forward pre-hook; the copy recomputes it from the
    # perturbed parameters although it runs no hooks
    def build():
        net, X = mlp(2)
        if kind == "prune":
            torch.nn.utils.prune.random_unstructured(net[0], "weight", amount=0.5)
            net[0].weight_mask.copy_(torch.arange(24).reshape(6, 4) % 3 != 0)
        else:
            torch.nn.utils.spectral_norm(net[0])
            net.eval()
        net(X)  # the hook computes the weight once, as after any forward
        return net, X

    net, X = build()
    before = state(net)
    ev = FunctionalModel(net, X, "cpu")
    gen = torch.Generator().manual_seed(0)
    reference, _ = build()
    with torch.no_grad():  # the same mask / power-iteration vectors
        for (_, a), (_, b) in zip(reference.named_buffers(), net.named_buffers(), strict=True):
            a.copy_(b)
    for _ in range(3):
        theta = ev.theta + 0.2 * torch.randn(ev.space.n, generator=gen, dtype=torch.float64)
        set_flat(reference, theta)
        torch.testing.assert_close(ev.outputs(theta), reference(X).detach(), rtol=1e-12,
                                   atol=1e-12)
    est = LocalVolumeEstimator(sigma=0.5, n_samples=4, random_state=0).fit(net, X)
    assert np.isfinite(est.log_volume_)
    if kind == "prune":  # the masked-out entries of weight_orig cannot change the outputs
        assert len(est.flat_parameters_) == 8
    assert_state_equal(before, net)


def test_init_prior_of_a_weight_normed_model_names_the_originals():
    net, X = weight_normed("new")
    with pytest.raises(ValueError, match=r"original0.*originals a computed weight"):
        LocalVolumeEstimator(sigma="init", n_samples=2).fit(net, X)


# ------------------------------------------------------------------------------------ hooks


def hooked(net):
    """Register every kind of module hook on ``net``; returns the list they append to."""
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(("forward", o)))
    net[1].register_forward_pre_hook(lambda m, i: calls.append(("pre", i[0])))
    net[2].register_forward_hook(lambda m, a, k, o: calls.append(("kwargs", o)), with_kwargs=True)
    net[2].register_full_backward_hook(lambda m, gi, go: calls.append(("backward", go[0])))
    return calls


@pytest.mark.parametrize("plain_mlp", [True, False])
def test_user_hooks_never_run_during_fit_and_change_nothing(plain_mlp):
    net, X = mlp(1)
    if not plain_mlp:  # off the fast path: vmapped functional_call
        net.append(torch.nn.LayerNorm(3).double())
    reference = copy.deepcopy(net)
    calls = hooked(net)
    for preconditioner in (None, "diag_hessian", "hessian"):
        kw = dict(sigma=0.5, n_samples=6, preconditioner=preconditioner, random_state=0)
        with pytest.warns(UserWarning, match=r"forward hooks or forward pre-hooks \(on 0, 1, 2"):
            est = LocalVolumeEstimator(**kw).fit(net, X)
        assert calls == []
        ref = LocalVolumeEstimator(**kw).fit(reference, X)
        np.testing.assert_array_equal(est.sample_log_volumes_, ref.sample_log_volumes_)
    with pytest.warns(UserWarning, match="forward hooks"):
        assert (FunctionalModel(net, X, "cpu").stacked is not None) == plain_mlp
    # the user's model keeps its hooks, and they fire on its own forward
    net(X).sum().backward()
    assert [c[0] for c in calls] == ["forward", "pre", "kwargs", "backward"]
    assert all(not torch._C._functorch.is_batchedtensor(c[1]) for c in calls)


def test_global_module_hooks_never_run_on_the_private_copy():
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    net, X = mlp(1)
    ref = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0).fit(net, X)
    calls = []
    handles = [register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__)),
               register_module_forward_pre_hook(lambda m, i: calls.append(type(m).__name__))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # process-wide hooks are the process's business
            est = LocalVolumeEstimator(sigma=0.5, n_samples=6, preconditioner="diag_hessian",
                                       random_state=0).fit(net, X)
        assert calls == []
        est = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0).fit(net, X)
        assert FunctionalModel(net, X, "cpu").stacked is not None
        net(X)
        assert "Linear" in calls  # they still see the user's own forward passes
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_array_equal(est.sample_log_volumes_, ref.sample_log_volumes_)
