"""Model kinds: frozen parameters, BatchNorm/Dropout CNNs, tuple outputs and a tiny Hugging Face
causal LM with padding masks."""

import copy
import math

import numpy as np
import pytest
import torch

from models import quadratic_problem
from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk._math import log_ball_volume
from volsk.costs import make_cost
from volsk.priors import InitPriorWarning


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_state_equal(before, model):
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k].detach()), k


class FrozenShift(torch.nn.Module):
    """The quadratic problem's linear model plus a frozen parameter that moves every output."""

    def __init__(self, n):
        super().__init__()
        self.linear, self.X = quadratic_problem(np.ones(n))
        self.shift = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64),
                                        requires_grad=False)

    def forward(self, x):
        return self.linear(x) + self.shift * x.sum(1, keepdim=True)


def test_only_trainable_parameters_are_perturbed():
    n, cutoff = 6, 0.01
    model = FrozenShift(n)
    est = LocalVolumeEstimator(cutoff, "lebesgue", cost="mse", n_samples=6, rtol=1e-6,
                               random_state=0).fit(model, model.X)
    # were the frozen shift perturbed too, the neighbourhood would live in n + 1 dimensions
    assert est.n_parameters_ == n
    assert abs(est.log_volume_ - log_ball_volume(n, math.sqrt(cutoff))) < 1e-4
    assert not model.shift.requires_grad and float(model.shift) == 0.3


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


def test_cnn_with_batchnorm_and_dropout_is_evaluated_in_eval_mode_and_left_untouched():
    torch.manual_seed(0)
    cnn = SmallCNN().train()
    X = torch.randn(16, 1, 6, 6)
    for _ in range(3):  # give the running statistics non-trivial values
        cnn(torch.randn(16, 1, 6, 6) + 0.5)
    before = state(cnn)
    with pytest.warns(InitPriorWarning, match=r"bn\.weight, bn\.bias"):
        est = LocalVolumeEstimator(1e-2, sigma="init", n_samples=6, random_state=0).fit(cnn, X)
    again = LocalVolumeEstimator(1e-2, sigma=0.1, n_samples=6, random_state=0)
    first = again.fit(cnn, X).sample_log_volumes_.copy()
    np.testing.assert_array_equal(again.fit(cnn, X).sample_log_volumes_, first)  # no dropout
    assert np.isfinite(est.log_volume_)
    assert_state_equal(before, cnn)  # parameters and buffers (running stats, counts)
    assert cnn.training and all(m.training for m in cnn.modules())
    # evaluated as in eval mode: running statistics, no dropout
    reference = copy.deepcopy(cnn).eval()
    with torch.no_grad():
        torch.testing.assert_close(again._evaluator.anchor_outputs(), reference(X))


class TupleOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(x), {"hidden": x}


class Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.lin = inner

    def forward(self, x):
        return self.lin(x)


def test_tuple_outputs_use_their_first_item():
    model = TupleOutput()
    X = torch.randn(10, 3)
    plain = Wrapped(model.lin)  # the same arithmetic (a Sequential would take the MLP fast path)
    a = LocalVolumeEstimator(sigma=0.5, n_samples=4, random_state=0).fit(model, X)
    b = LocalVolumeEstimator(sigma=0.5, n_samples=4, random_state=0).fit(plain, X)
    np.testing.assert_array_equal(a.sample_log_volumes_, b.sample_log_volumes_)


# --------------------------------------------------------------------------- Hugging Face
VOCAB, T = 30, 6


def tiny_causal_lm(attn_implementation="eager", dropout=0.0, seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=2 * T, hidden_dropout=dropout,
        attention_dropout=dropout, attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(config)


def token_batch():
    """Right-padded token ids; every token id that pads also occurs unpadded."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, T), generator=gen)
    mask = torch.ones(4, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return ids, mask


def test_hf_masked_kl_through_the_evaluator_equals_a_hand_computation():
    from test_costs import hand_kl

    model = tiny_causal_lm()
    ids, mask = token_batch()
    ev = FunctionalModel(model, ids, "cpu", forward_kwargs={"attention_mask": mask})
    anchor = ev.anchor_outputs()
    assert anchor.shape == (4, T, VOCAB)
    cost = make_cost("kl", anchor, mask=mask)
    gen = torch.Generator().manual_seed(1)
    thetas = ev.theta + 0.05 * torch.randn(2, ev.theta.numel(), generator=gen,
                                           dtype=torch.float64)
    got = ev.costs(cost, thetas)
    for theta, value in zip(thetas, got, strict=True):
        moved = copy.deepcopy(model).eval()
        torch.nn.utils.vector_to_parameters(theta.float(), moved.parameters())
        with torch.no_grad():
            logits = moved(input_ids=ids, attention_mask=mask).logits
        assert float(value) == pytest.approx(hand_kl(anchor, logits, mask), rel=1e-4)


def test_hf_right_padding_changes_nothing():
    model = tiny_causal_lm()
    ids, mask = token_batch()
    a, b = ids.clone(), ids.clone()
    a[mask == 0] = int(ids[0, 0])  # pad with tokens that also occur unpadded
    b[mask == 0] = int(ids[0, 1])
    ev_a = FunctionalModel(model, a, "cpu", forward_kwargs={"attention_mask": mask})
    ev_b = FunctionalModel(model, b, "cpu", forward_kwargs={"attention_mask": mask})
    keep = mask.bool()
    torch.testing.assert_close(ev_a.anchor_outputs()[keep], ev_b.anchor_outputs()[keep])
    est_a = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=3, random_state=0)
    est_b = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=3, random_state=0)
    est_a.fit(model, a, attention_mask=mask)
    est_b.fit(model, b, attention_mask=mask)
    assert est_a.flat_parameters_ == est_b.flat_parameters_
    np.testing.assert_allclose(est_a.sample_log_volumes_, est_b.sample_log_volumes_, rtol=1e-9)


def test_hf_padding_with_an_otherwise_unused_token_changes_nothing():
    model = tiny_causal_lm()
    ids, mask = token_batch()
    unused = [v for v in range(VOCAB) if not (ids[mask.bool()] == v).any()][:2]
    a, b = ids.clone(), ids.clone()
    a[mask == 0], b[mask == 0] = unused[0], unused[1]
    est_a = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=2, random_state=0)
    est_b = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=2, random_state=0)
    est_a.fit(model, a, attention_mask=mask)
    est_b.fit(model, b, attention_mask=mask)
    np.testing.assert_allclose(est_a.sample_log_volumes_, est_b.sample_log_volumes_, rtol=1e-9)


def test_hf_estimate_end_to_end_in_eval_mode_with_the_model_untouched():
    model = tiny_causal_lm(dropout=0.3).train()  # dropout active in train mode
    ids, mask = token_batch()
    before = state(model)
    with pytest.warns(InitPriorWarning, match="layernorm"):
        # Hugging Face's init is narrow (initializer_range 0.02): at cutoff 1e-2 the prior's
        # mass runs out before the cost gets there; at 1e-3 every ray crosses inside it
        est = LocalVolumeEstimator(1e-3, sigma="init", n_samples=3, random_state=0)
        est.fit(model, ids, attention_mask=mask)
    assert np.isfinite(est.log_volume_) and est.log_volume_ < 0
    assert (est.samples_["status"] == "crossed").all()
    np.testing.assert_allclose(est.samples_["cost_at_radius"], 1e-3, rtol=2e-3)
    assert_state_equal(before, model)
    assert model.training
    # dropout is off during evaluation: the anchor outputs are the eval-mode ones
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(est._evaluator.anchor_outputs(), expected)


def test_hf_model_with_default_sdpa_attention():
    model = tiny_causal_lm(attn_implementation="sdpa")
    ids, mask = token_batch()
    est = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=2, random_state=0)
    est.fit(model, ids, attention_mask=mask)
    assert np.isfinite(est.log_volume_)


def test_hf_sdpa_diag_hessian_equals_the_eager_one():
    # sdpa's mask checks branch on the data, so per-example Jacobians cannot be vmapped over
    # examples there: the curvature falls back to one example at a time, with the same result
    from volsk._problem import prepare_problem
    from volsk.measures import Gaussian
    from volsk.preconditioners import Identity, PreconditionerContext
    from volsk.preconditioners.curvature.ggn import ggn_diagonal
    from volsk.preconditioners.curvature.target import curvature_target

    ids, mask = token_batch()
    diagonals = []
    for impl in ("eager", "sdpa"):
        problem = prepare_problem(
            tiny_causal_lm(attn_implementation=impl), ids, cost="kl", output="logits",
            cutoff=1e-2, rtol=1e-3, measure=Gaussian(sigma=0.05), preconditioner=Identity(),
            eps=1e-3, exponent=0.5, device="cpu", batch_size=None, n_directions=2,
            attention_mask=mask)
        ctx = PreconditionerContext(problem.evaluator, problem.cost, problem.mask)
        diagonals.append(ggn_diagonal(curvature_target(ctx)))
    torch.testing.assert_close(diagonals[1], diagonals[0], rtol=1e-6, atol=1e-12)
    est = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=2, preconditioner="diag_hessian",
                               random_state=0)
    assert np.isfinite(est.fit(tiny_causal_lm(attn_implementation="sdpa"), ids,
                               attention_mask=mask).log_volume_)
