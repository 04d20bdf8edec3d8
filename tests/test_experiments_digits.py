"""Tests for :mod:`volsk.experiments.digits` (the Scherlis & Belrose digits experiment)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from volsk.experiments import digits as D
from volsk.experiments.digits import (
    L2_WEIGHT_DECAY,
    N_POISON,
    N_TRAIN,
    DigitsRun,
    DigitsSplits,
    accuracy,
    load_digits_splits,
    make_digits_mlp,
    poison_batch_size,
    prior_sigma,
    reverse_cross_entropy,
    train_digits_mlp,
)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def poison_splits() -> DigitsSplits:
    return load_digits_splits(n_poison=N_POISON)


@pytest.fixture(scope="module")
def clean_run() -> DigitsRun:
    torch.set_num_threads(1)
    return train_digits_mlp(seed=0)


@pytest.fixture(scope="module")
def clean_run_on_poison_splits(poison_splits) -> DigitsRun:
    torch.set_num_threads(1)
    return train_digits_mlp(poison_splits, seed=0)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _history_without_time(run: DigitsRun) -> list[dict]:
    # repr() so that nan == nan (poison_loss is nan without poisoning)
    return [{k: repr(v) for k, v in h.items() if k != "time"} for h in run.history]


# ------------------------------------------------------------------------ constants


def test_constants_and_prior_sigma():
    assert L2_WEIGHT_DECAY == 5e-4
    assert N_TRAIN == 1024
    assert prior_sigma() == pytest.approx(1 / math.sqrt(5e-4 * 1024))
    assert prior_sigma(0.25, 16) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        prior_sigma(0.0)
    with pytest.raises(ValueError, match="n_train"):
        prior_sigma(n_train=0)


def test_poison_batch_size():
    assert poison_batch_size(64, 0.0) == 0
    assert poison_batch_size(64, 0.2) == 16
    assert poison_batch_size(64, 0.3) == round(0.3 * 64 / 0.7) == 27
    assert poison_batch_size(64, 0.5) == 64
    with pytest.raises(ValueError, match="poison"):
        poison_batch_size(64, 1.0)


# ----------------------------------------------------------------------------- data


def test_split_sizes_and_dtypes():
    s = load_digits_splits()
    assert (s.n_train, s.n_test, s.n_poison) == (1024, 773, 0)
    assert s.X_train.shape == (1024, 64) and s.X_test.shape == (773, 64)
    assert s.X_poison.shape == (0, 64) and s.y_poison.shape == (0,)
    assert s.X_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert float(s.X_train.min()) >= 0.0 and float(s.X_train.max()) <= 1.0
    assert set(s.y_train.tolist()) == set(range(10))
    s64 = load_digits_splits(dtype=torch.float64)
    assert s64.X_train.dtype == torch.float64
    assert torch.equal(s64.X_train.float(), s.X_train)
    assert "n_train=1024" in repr(s)


def test_split_matches_documented_recipe():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(7).permutation(len(y))
    s = load_digits_splits(seed=7, dtype=torch.float64)
    np.testing.assert_array_equal(s.X_train.numpy(), X[perm[:1024]] / 16)
    np.testing.assert_array_equal(s.y_train.numpy(), y[perm[:1024]])
    np.testing.assert_array_equal(s.X_test.numpy(), X[perm[1024:]] / 16)
    np.testing.assert_array_equal(s.y_test.numpy(), y[perm[1024:]])


def test_split_determinism():
    a, b, c = load_digits_splits(3), load_digits_splits(3), load_digits_splits(4)
    for name in ("X_train", "y_train", "X_test", "y_test", "X_poison", "y_poison"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.X_train, c.X_train)


def test_poison_split_is_tail_of_held_out_and_disjoint_from_test(poison_splits):
    s, p = load_digits_splits(), poison_splits
    assert (p.n_train, p.n_test, p.n_poison) == (1024, 773 - N_POISON, N_POISON)
    assert torch.equal(p.X_train, s.X_train)
    assert torch.equal(p.X_test, s.X_test[: p.n_test])
    assert torch.equal(p.X_poison, s.X_test[p.n_test :])
    assert torch.equal(p.y_poison, s.y_test[p.n_test :])


def test_split_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        load_digits_splits(n_train=0)
    with pytest.raises(ValueError, match="n_train"):
        load_digits_splits(n_train=1797)
    with pytest.raises(ValueError, match="n_poison"):
        load_digits_splits(n_poison=773)  # no test digit would be left
    with pytest.raises(ValueError, match="n_poison"):
        load_digits_splits(n_poison=-1)
    with pytest.raises(ValueError, match="dtype"):
        load_digits_splits(dtype=torch.int64)


# ---------------------------------------------------------------------------- model


def test_make_digits_mlp_structure_and_init():
    net = make_digits_mlp()
    assert isinstance(net, torch.nn.Sequential) and len(net) == 3
    assert isinstance(net[0], torch.nn.Linear) and (net[0].in_features, net[0].out_features) == (
        64,
        64,
    )
    assert isinstance(net[1], torch.nn.GELU)
    assert (net[2].in_features, net[2].out_features) == (64, 10)
    assert net(torch.zeros(3, 64)).shape == (3, 10)
    # N(0, 1/fan_in) for weights *and* biases, drawn W1, b1, W2, b2 from one generator.
    gen = torch.Generator().manual_seed(0)
    for layer in (net[0], net[2]):
        std = layer.in_features**-0.5
        for p in (layer.weight, layer.bias):
            expected = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
            assert torch.equal(p.detach(), expected.float())
    w1 = net[0].weight.detach().double()
    assert float(w1.std()) == pytest.approx(1 / 8, rel=0.05)
    assert float(w1.mean()) == pytest.approx(0.0, abs=0.01)


def test_make_digits_mlp_seed_width_activation_dtype():
    assert _state_equal(make_digits_mlp(seed=5), make_digits_mlp(seed=5))
    assert not torch.equal(make_digits_mlp(seed=5)[0].weight, make_digits_mlp(seed=6)[0].weight)
    net = make_digits_mlp(hidden=16, activation="relu", dtype=torch.float64)
    assert net[0].out_features == 16 and isinstance(net[1], torch.nn.ReLU)
    assert net[0].weight.dtype == torch.float64
    with pytest.raises(ValueError, match="activation"):
        make_digits_mlp(activation="swish")
    with pytest.raises(ValueError, match="hidden"):
        make_digits_mlp(hidden=0)


# --------------------------------------------------------------------------- losses


def test_reverse_cross_entropy_matches_naive_float64():
    gen = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(50, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (50,), generator=gen)
    p_y = torch.softmax(z, dim=1)[torch.arange(50), y]
    naive = -torch.log(1 - p_y)
    got = reverse_cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(got, naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reverse_cross_entropy(z, y), naive.mean())
    torch.testing.assert_close(reverse_cross_entropy(z, y, reduction="sum"), naive.sum())
    # float32 agrees with the float64 reference too
    torch.testing.assert_close(
        reverse_cross_entropy(z.float(), y, reduction="none"), naive.float(), rtol=1e-5, atol=1e-6
    )


def test_reverse_cross_entropy_is_stable_and_has_finite_gradients():
    # p_y rounds to 1 in float32: the naive formula gives inf, the stable one ~ 60.
    z = torch.tensor([[60.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    loss = reverse_cross_entropy(z, y)
    assert float(loss.detach()) == pytest.approx(60.0 - math.log(2), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # d/dz_y of -log(1 - p_y) is p_y > 0, so gradient descent pushes the target logit down.
    zz = torch.tensor([[1.0, 0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    reverse_cross_entropy(zz, y).backward()
    p = torch.softmax(zz.detach(), 1)[0]
    assert float(zz.grad[0, 0]) == pytest.approx(float(p[0]))
    assert (zz.grad[0, 1:] < 0).all()


def test_reverse_cross_entropy_bad_arguments():
    with pytest.raises(ValueError, match="logits"):
        reverse_cross_entropy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        reverse_cross_entropy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        reverse_cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), "max")


# ------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("training", [True, False])
def test_accuracy_restores_mode_and_uses_no_grad(training):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.9))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
    net.train(training)
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    assert accuracy(net, X, y) == pytest.approx(2 / 3)  # eval mode: dropout off
    assert net.training is training
    assert all(m.training is training for m in net.modules())
    assert math.isnan(accuracy(net, X[:0], y[:0]))


# ------------------------------------------------------------------------- training


def test_clean_training_fits_and_generalises(clean_run):
    # Measured (seeds 0-5, 1 thread): train 1.000, test 0.978-0.985, ~0.5 s each.
    run = clean_run
    assert len(run.history) == 25
    assert run.train_accuracy >= 0.99
    assert run.test_accuracy >= 0.97
    assert run.splits.n_test == 773
    assert not run.model.training
    assert isinstance(run.optimizer, torch.optim.AdamW)
    assert run.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert run.optimizer.param_groups[0]["lr"] == 0.0
    h = run.history[-1]
    assert set(h) == {
        "epoch",
        "lr",
        "train_loss",
        "poison_loss",
        "l2",
        "train_accuracy",
        "test_accuracy",
        "time",
    }
    assert math.isnan(h["poison_loss"])
    assert run.history[0]["train_loss"] > h["train_loss"]
    assert h["time"] < 20
    # Cosine decay per step: after epoch e the lr is lr * (1 + cos(pi * e / epochs)) / 2.
    for rec in run.history[:-1]:
        expected = 0.05 * 0.5 * (1 + math.cos(math.pi * rec["epoch"] / 25))
        assert rec["lr"] == pytest.approx(expected)
    # The explicit L2 term is 0.5 * wd * |theta|^2.
    sq = sum(float(p.detach().double().pow(2).sum()) for p in run.model.parameters())
    assert h["l2"] == pytest.approx(0.5 * 5e-4 * sq, rel=1e-5)


def test_training_is_deterministic():
    s = load_digits_splits(n_poison=100)
    for poison in (0.0, 0.25):
        a = train_digits_mlp(s, epochs=3, poison=poison, seed=11)
        b = train_digits_mlp(s, epochs=3, poison=poison, seed=11)
        assert _state_equal(a.model, b.model)
        assert _history_without_time(a) == _history_without_time(b)
    c = train_digits_mlp(s, epochs=3, seed=12)
    assert not _state_equal(a.model, c.model)


def test_poisoned_training_fits_train_but_generalises_worse(
    poison_splits, clean_run_on_poison_splits
):
    # Measured (seeds 0-5, same 473 test digits): clean test 0.977-0.983;
    # poison=0.2 train 0.991-0.995, test 0.926-0.947; poison=0.3 train 0.973-0.983,
    # test 0.886-0.896.
    clean = clean_run_on_poison_splits
    p20 = train_digits_mlp(poison_splits, poison=0.2, seed=0)
    assert p20.train_accuracy >= 0.98
    assert p20.test_accuracy < clean.test_accuracy - 0.02
    p30 = train_digits_mlp(poison_splits, poison=0.3, seed=0)
    assert p30.train_accuracy >= 0.96
    assert p30.test_accuracy < p20.test_accuracy
    assert p30.test_accuracy < clean.test_accuracy - 0.05
    # The poison digits themselves are pushed away from their labels.
    assert accuracy(p30.model, poison_splits.X_poison, poison_splits.y_poison) < accuracy(
        clean.model, poison_splits.X_poison, poison_splits.y_poison
    )
    assert math.isfinite(p30.history[-1]["poison_loss"])


def test_default_poison_splits_used_when_splits_is_none(poison_splits):
    run = train_digits_mlp(poison=0.3, epochs=1)
    assert (run.splits.n_train, run.splits.n_test, run.splits.n_poison) == (1024, 473, 300)
    assert torch.equal(run.splits.X_poison, poison_splits.X_poison)


def _one_full_batch_step(splits, poison, lr, wd, seed):
    """Reference for one step with batch_size == n_train (exactly one step)."""
    net = make_digits_mlp(seed=seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = splits.n_train
    order = torch.randperm(n, generator=gen)
    data = F.cross_entropy(net(splits.X_train[order]), splits.y_train[order], reduction="sum")
    k = poison_batch_size(n, poison)
    if k:
        pidx = torch.randperm(splits.n_poison, generator=gen)[:k]
        p_y = torch.softmax(net(splits.X_poison[pidx]).double(), 1)[
            torch.arange(k), splits.y_poison[pidx]
        ]
        data = data + (-torch.log1p(-p_y)).sum().float()
    l2 = 0.5 * wd * sum((p**2).sum() for p in net.parameters())
    (data / (n + k) + l2).backward()
    opt.step()
    return net


@pytest.mark.parametrize("poison", [0.0, 0.2])
def test_objective_is_ce_plus_reverse_ce_plus_explicit_l2(poison):
    s = load_digits_splits(n_train=200, n_poison=100)
    wd = 0.05  # large, so that a missing L2 term would be visible
    run = train_digits_mlp(s, epochs=1, batch_size=200, lr=0.01, weight_decay=wd, poison=poison)
    ref = _one_full_batch_step(s, poison, lr=0.01, wd=wd, seed=0)
    for p, q in zip(run.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    no_l2 = train_digits_mlp(s, epochs=1, batch_size=200, lr=0.01, weight_decay=0.0, poison=poison)
    assert not _state_equal(run.model, no_l2.model)


def test_training_with_float64_splits():
    run = train_digits_mlp(load_digits_splits(dtype=torch.float64), epochs=1, hidden=8)
    assert run.model[0].weight.dtype == torch.float64
    assert run.model[0].out_features == 8


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"poison": -0.1}, "poison"),
        ({"poison": 1.0}, "poison"),
        ({"poison": 1.5}, "poison"),
        ({"poison": float("nan")}, "poison"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"hidden": 0}, "hidden"),
        ({"splits": "digits"}, "splits"),
    ],
)
def test_train_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        train_digits_mlp(**kwargs)


def test_poison_without_poison_split_raises():
    with pytest.raises(ValueError, match="poison"):
        train_digits_mlp(load_digits_splits(), poison=0.3)


def test_docstring_examples_run():
    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
