"""Curvature at the anchor (volsk.preconditioners.curvature) against torch.func.hessian."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from models import quadratic_problem
from volsk._evaluate import FunctionalModel
from volsk.costs import make_cost
from volsk.preconditioners import DiagHessian, Fisher, HesScale, Hessian, PreconditionerContext
from volsk.preconditioners.curvature.target import curvature_target


def context(model, X, cost="kl", output="logits", y=None, attention_mask=None, mask=None):
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    ev = FunctionalModel(model, X, "cpu", forward_kwargs=kwargs)
    bound = make_cost(cost, ev.anchor_outputs(), output=output, y=y, mask=attention_mask)
    if mask is None:
        mask = torch.ones(ev.space.n, dtype=torch.bool)
    return PreconditionerContext(ev, bound, mask, user_module=model)


def true_hessian(ctx):
    """torch.func.hessian of the cost on the active coordinates, in float64."""
    target = curvature_target(ctx, torch.float64)
    return torch.func.hessian(target.cost_of)(target.anchor)


def mlp(head=None, dtype=torch.float32, act=nn.GELU):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 6), act(), nn.Linear(6, 4)]
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers).to(dtype)


X = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(2))
CASES = {
    "kl-logits": (None, "kl", "logits"),
    "kl-probabilities": (nn.Softmax(dim=-1), "kl", "probabilities"),
    "kl-log_probabilities": (nn.LogSoftmax(dim=-1), "kl", "log_probabilities"),
    "ce-logits": (None, "cross_entropy", "logits"),
    "ce-probabilities": (nn.Softmax(dim=-1), "cross_entropy", "probabilities"),
    "mse": (None, "mse", "logits"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diag_hessian_equals_diagonal_of_torch_func_hessian(case):
    head, cost, output = CASES[case]
    ctx = context(mlp(head), X, cost, output, Y if cost == "cross_entropy" else None)
    H = true_hessian(ctx)
    d = DiagHessian().curvature(ctx)
    np.testing.assert_allclose(d.numpy(), H.diag().numpy(), rtol=1e-5,
                               atol=1e-10 * float(H.diag().abs().max()))


def test_kl_hessian_at_the_anchor_is_the_fisher_and_hessian_matrix_is_exact():
    ctx = context(mlp(), X, "kl")
    H = true_hessian(ctx)
    F = Fisher().curvature(ctx)
    Hm = Hessian().curvature(ctx)
    scale = float(H.abs().max())
    assert float((F - H).abs().max()) < 1e-10 * scale
    assert float((Hm - H).abs().max()) < 1e-10 * scale
    assert torch.equal(Hm, Hm.T)


def test_cross_entropy_hessian_differs_from_its_fisher_and_hessian_tracks_it():
    ctx = context(mlp(), X, "cross_entropy", y=Y)
    H = true_hessian(ctx)
    F = Fisher().curvature(ctx)  # the Gauss–Newton part only
    scale = float(H.abs().max())
    assert float((Hessian().curvature(ctx) - H).abs().max()) < 1e-10 * scale
    assert float((F - H).abs().max()) > 1e-3 * scale


def test_curvature_is_restricted_to_the_active_coordinates():
    model = mlp()
    mask = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
    mask[::3] = False
    full = true_hessian(context(model, X, "kl"))
    keep = torch.nonzero(mask).flatten()
    sub = full[keep][:, keep]
    ctx = context(model, X, "kl", mask=mask)
    assert torch.allclose(Hessian().curvature(ctx), sub, rtol=1e-8, atol=1e-14)
    assert torch.allclose(Fisher().curvature(ctx), sub, rtol=1e-8, atol=1e-14)
    assert torch.allclose(DiagHessian().curvature(ctx), sub.diag(), rtol=1e-8, atol=1e-14)


class TokenModel(nn.Module):
    """Embedding → tanh → Linear over tokens: outputs (N, T, V); accepts attention_mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(ids)))


def test_masked_sequence_kl_diagonal_matches_hessian():
    ids = torch.randint(0, 7, (6, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0]] * 3 + [[1, 1, 1]] * 3)
    ctx = context(TokenModel(), ids, "kl", attention_mask=mask)
    H = true_hessian(ctx)
    d = DiagHessian().curvature(ctx)
    np.testing.assert_allclose(d.numpy(), H.diag().numpy(), rtol=1e-5, atol=1e-12)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_used_above_max_exact():
    lam = np.array([1.0, 3.0, 10.0, 0.5])
    model, Xq = quadratic_problem(lam)

    def callable_cost(outputs, anchor):  # mse written by hand: the HVP route
        return ((outputs - anchor) ** 2).mean()

    ctx = context(model, Xq, callable_cost)
    exact = DiagHessian().curvature(ctx)
    np.testing.assert_allclose(exact.numpy(), 2 * lam, rtol=1e-12)
    # z ⊙ H z = z² diag H = diag H when H is diagonal: one probe is exact
    np.testing.assert_allclose(DiagHessian(probes=1).curvature(ctx).numpy(), 2 * lam, rtol=1e-12)
    with pytest.warns(RuntimeWarning, match="Hutchinson"):
        approx = DiagHessian(max_exact=2).curvature(ctx)
    np.testing.assert_allclose(approx.numpy(), 2 * lam, rtol=1e-12)


def test_float32_model_curvature_is_computed_in_float64():
    ctx = context(mlp(), X, "kl")
    target = curvature_target(ctx)
    assert target.evaluator.model_dtype == torch.float64
    assert ctx.evaluator.model_dtype == torch.float32  # the estimator's copy is untouched
    assert target.evaluator.module is not ctx.evaluator.module


# ----------------------------------------------------------------------------------- HesScale


@pytest.mark.parametrize("cost", ["kl", "cross_entropy"])
def test_hesscale_is_exact_for_a_single_linear_layer_with_softmax(cost):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    ctx = context(model, X, cost, y=Y if cost == "cross_entropy" else None)
    H = true_hessian(ctx)
    np.testing.assert_allclose(HesScale().curvature(ctx).numpy(), H.diag().numpy(), rtol=1e-10,
                               atol=1e-14)
    bare = context(model[0], X, cost, y=Y if cost == "cross_entropy" else None)
    np.testing.assert_allclose(HesScale().curvature(bare).numpy(), H.diag().numpy(), rtol=1e-10)


def test_hesscale_folds_a_final_softmax_into_the_loss():
    plain = context(mlp(), X, "kl")
    soft = context(mlp(nn.Softmax(dim=-1)), X, "kl", output="probabilities")
    np.testing.assert_allclose(HesScale().curvature(soft).numpy(),
                               HesScale().curvature(plain).numpy(), rtol=1e-9, atol=1e-14)


def test_hesscale_is_close_on_a_two_layer_mlp_and_exact_in_its_last_layer():
    ctx = context(mlp(), X, "kl")
    exact = true_hessian(ctx).diag()
    hs = HesScale().curvature(ctx)
    last = 6 * 4 + 4  # second Linear's weight and bias
    np.testing.assert_allclose(hs[-last:].numpy(), exact[-last:].numpy(), rtol=1e-9, atol=1e-14)
    relative_error = float((hs - exact).norm() / exact.norm())
    assert relative_error < 0.3, relative_error  # 0.13 measured


def test_hesscale_matches_exact_diagonal_for_conv_stack_under_mse():
    # mse has a diagonal output Hessian and a one-conv stack has no hidden layer to approximate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten())).double()
    Xc = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    ctx = context(model, Xc, "mse")
    exact = true_hessian(ctx).diag()
    np.testing.assert_allclose(HesScale().curvature(ctx).numpy(), exact.numpy(), rtol=1e-9,
                               atol=1e-14)


def test_hesscale_conv_relu_stack_runs_and_is_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(2 * 3 * 3, 3)).double()
    Xc = torch.randn(8, 1, 5, 5, dtype=torch.float64)
    ctx = context(model, Xc, "kl")
    exact = true_hessian(ctx).diag()
    hs = HesScale().curvature(ctx)
    assert float((hs - exact).norm() / exact.norm()) < 0.5
    n_last = 3 * 18 + 3
    np.testing.assert_allclose(hs[-n_last:].numpy(), exact[-n_last:].numpy(), rtol=1e-9,
                               atol=1e-14)


def test_hesscale_callable_cost_uses_exact_output_derivatives():
    def kl_by_hand(outputs, anchor):
        p = torch.softmax(anchor, -1)
        return (p * (torch.log_softmax(anchor, -1) - torch.log_softmax(outputs, -1))).sum(-1).mean()

    model = nn.Sequential(nn.Linear(5, 4)).double()
    by_hand = HesScale().curvature(context(model, X.double(), kl_by_hand))
    builtin = HesScale().curvature(context(model, X.double(), "kl"))
    np.testing.assert_allclose(by_hand.numpy(), builtin.numpy(), rtol=1e-9, atol=1e-15)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return x + self.lin(x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 4)), "'1'.*BatchNorm1d"),
        (nn.Sequential(nn.Sequential(nn.Linear(5, 5), Residual()), nn.Linear(5, 4)),
         r"'0\.1'.*Residual"),
        (Residual(), "nn.Sequential"),
    ],
)
def test_hesscale_names_the_unsupported_layer(model, match):
    with pytest.raises(ValueError, match=match):
        HesScale().curvature(context(model, X, "kl"))


def test_hesscale_needs_a_plain_forward():
    class Shifted(nn.Sequential):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = Shifted(nn.Linear(5, 4))
    with pytest.raises(ValueError, match="composition of its layers"):
        HesScale().curvature(context(model, X, "kl"))


def test_curvature_leaves_the_evaluator_copy_untouched():
    ctx = context(mlp(), X, "kl")
    before = copy.deepcopy(ctx.evaluator.module.state_dict())
    for pre in (DiagHessian(), HesScale(), Hessian(), Fisher()):
        pre.curvature(ctx)
    after = ctx.evaluator.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["diag_hessian", "hesscale", "hessian", "fisher"])
@pytest.mark.parametrize("cost", ["kl", "cross_entropy"])
def test_curvature_does_not_depend_on_data_batching(name, cost):
    from volsk._problem import prepare_problem
    from volsk.measures import Gaussian
    from volsk.preconditioners import resolve_preconditioner

    def bound(data_batch_size):
        problem = prepare_problem(
            mlp(), X, cost=cost, output="logits", cutoff=10.0, rtol=1e-3,
            measure=Gaussian(sigma=1.0), preconditioner=resolve_preconditioner(name), eps=1e-3,
            exponent=0.5, device="cpu", batch_size=None, n_directions=4,
            y=Y if cost == "cross_entropy" else None, data_batch_size=data_batch_size)
        assert len(problem.evaluator.batches) == (1 if data_batch_size is None else 3)
        P = problem.preconditioner
        return P.log_p if hasattr(P, "log_p") else P.eigenvalues

    np.testing.assert_allclose(bound(12).numpy(), bound(None).numpy(), rtol=1e-9, atol=1e-12)
