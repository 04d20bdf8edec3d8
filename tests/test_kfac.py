"""K-FAC (volsk.preconditioners.kfac, curvature.kronecker): exact where the Kronecker form is,
close to the Gauss–Newton blocks elsewhere, det P = 1, and the user's model untouched."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from torch import nn

from models import small_mlp
from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk.costs import make_cost
from volsk.preconditioners import (
    KFAC,
    DiagHessian,
    KroneckerMap,
    PreconditionerContext,
    resolve_preconditioner,
)
from volsk.preconditioners.curvature.ggn import ggn_matrix
from volsk.preconditioners.curvature.kronecker import (
    corrected_eigenvalues,
    kronecker_factors,
    kronecker_layers,
)
from volsk.preconditioners.curvature.target import curvature_target


def context(model, X, cost="mse", mask=None, attention_mask=None, eps=1e-3):
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    ev = FunctionalModel(model, X, "cpu", forward_kwargs=kwargs)
    bound = make_cost(cost, ev.anchor_outputs(), mask=attention_mask)
    if mask is None:
        mask = torch.ones(ev.space.n, dtype=torch.bool)
    return PreconditionerContext(ev, bound, mask, eps=eps, user_module=model)


def blocks_and_ggn(ctx, **options):
    """[(layer, K-FAC block kron(G, A), the GGN's block)] and the leftover positions."""
    target = curvature_target(ctx)
    layers, rest = kronecker_layers(target)
    factors = kronecker_factors(target, layers, **options)
    H = ggn_matrix(target)
    out = []
    for layer, (A, G) in zip(layers, factors):
        idx = layer.index.reshape(-1)
        out.append((layer, torch.kron(G, A), H[idx][:, idx]))
    return out, rest


def dense(P, n):
    return P.apply(torch.eye(n, dtype=torch.float64))


def correlated_inputs(n, d, condition, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.logspace(0, math.log10(math.sqrt(condition)), d, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ (Q * scales) @ Q.T


def test_names_resolve_to_kfac():
    assert type(resolve_preconditioner("kfac")) is KFAC
    assert repr(KFAC(eigenvalue_correction=True)) == "KFAC(eigenvalue_correction=True)"


# ------------------------------------------------------------------------------ exactness


def test_kfac_is_exact_on_a_single_linear_layer_ellipsoid():
    # a bias-free 256 → 128 layer under "mse" on correlated inputs: mse(δ) = δᵀ M δ with
    # M = (1/(N·D)) I_D ⊗ XᵀX, an ellipsoid whose volume has a closed form
    N, d_in, d_out, cutoff = 512, 256, 128, 1e-2
    X = correlated_inputs(N, d_in, condition=1e4)
    model = nn.Linear(d_in, d_out, bias=False).double()
    lam = np.repeat(torch.linalg.eigvalsh(X.T @ X).numpy()[None, :] / (N * d_out), d_out, 0)
    n = lam.size
    assert n >= 30_000
    truth = n / 2 * math.log(math.pi) - gammaln(n / 2 + 1) + 0.5 * np.sum(np.log(cutoff / lam))
    est = LocalVolumeEstimator(cutoff, "lebesgue", preconditioner="kfac", cost="mse",
                               preconditioner_eps=0.0, n_samples=4, rtol=1e-8,
                               random_state=0).fit(model, X)
    assert abs(est.log_volume_ - truth) < 1e-6 * abs(truth)
    assert np.ptp(est.sample_log_volumes_) < 1e-6  # every direction gives the same estimate
    naive = LocalVolumeEstimator(cutoff, "lebesgue", cost="mse", n_samples=4, rtol=1e-8,
                                 random_state=0).fit(model, X)
    assert naive.log_volume_ < truth - 10_000  # what the Kronecker structure is worth here


def test_kfac_blocks_equal_the_ggn_blocks_of_a_deep_linear_network_under_mse():
    # G = W_aboveᵀ (2/(N·D)) W_above is the same for every example: K-FAC is exact per block
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4)).double()
    X = correlated_inputs(40, 5, condition=100)
    blocks, rest = blocks_and_ggn(context(model, X, "mse"))
    assert [layer.name for layer, _, _ in blocks] == ["0", "1"] and rest.numel() == 0
    assert [tuple(layer.index.shape) for layer, _, _ in blocks] == [(6, 6), (4, 7)]
    for _layer, kfac, ggn in blocks:
        torch.testing.assert_close(kfac, ggn, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, stride=2, padding=1),
    nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect", bias=False),
    nn.Conv1d(2, 3, 3, padding="same", dilation=2),
])
def test_kfac_block_of_a_convolution_is_exact_under_mse(conv):
    # patches are the layer's examples: the block is (2/numel) I ⊗ Σ patches patchesᵀ
    conv = conv.double()
    shape = (6, 2, 5, 6) if isinstance(conv, nn.Conv2d) else (6, 2, 9)
    X = torch.randn(shape, dtype=torch.float64)
    blocks, rest = blocks_and_ggn(context(nn.Sequential(conv), X, "mse"))
    assert len(blocks) == 1 and rest.numel() == 0
    _layer, kfac, ggn = blocks[0]
    torch.testing.assert_close(kfac, ggn, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cost", ["mse", "kl"])
def test_kfac_blocks_are_close_to_the_ggn_blocks_of_a_nonlinear_mlp(cost):
    model, X = small_mlp(n=60)
    blocks, _ = blocks_and_ggn(context(model.double(), X.double(), cost))
    for layer, kfac, ggn in blocks:
        error = float((kfac - ggn).norm() / ggn.norm())
        diagonal_error = float((torch.diag(ggn.diagonal()) - ggn).norm() / ggn.norm())
        assert error < diagonal_error  # it sees the correlations a diagonal misses
        assert error < 0.75
        assert 0.8 < float(kfac.trace() / ggn.trace()) < 1.5
        if cost == "mse" and layer.name == "2":  # the last layer under mse: G is constant
            assert error < 1e-12


def test_eigenvalue_correction_is_the_ggn_diagonal_in_the_kronecker_eigenbasis():
    model, X = small_mlp(n=30)
    ctx = context(model.double(), X.double(), "kl")
    target = curvature_target(ctx)
    layers, _ = kronecker_layers(target)
    factors = kronecker_factors(target, layers)
    bases = [(torch.linalg.eigh(A).eigenvectors, torch.linalg.eigh(G).eigenvectors)
             for A, G in factors]
    corrected = corrected_eigenvalues(target, layers, bases)
    H = ggn_matrix(target)
    for layer, (U_A, U_G), values in zip(layers, bases, corrected):
        idx = layer.index.reshape(-1)
        Q = torch.kron(U_G, U_A)
        expected = torch.diagonal(Q.T @ H[idx][:, idx] @ Q).reshape(values.shape)
        torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- the map


@pytest.mark.parametrize("correction", [False, True])
def test_kfac_map_is_symmetric_positive_definite_with_unit_determinant(correction):
    model, X = small_mlp()
    ctx = context(model, X, "kl")
    P = KFAC(eigenvalue_correction=correction).bind(ctx)
    D = dense(P, ctx.n)
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(D).min()) > 0
    assert abs(float(torch.linalg.slogdet(D).logabsdet)) < 1e-9
    # the same eps semantics as the full-matrix maps: per block, V (|λ|^½ + eps)⁻¹ Vᵀ
    block = P.blocks[0]
    Q = torch.kron(block.U_G, block.U_A)
    d = 1.0 / (block.eigenvalues.reshape(-1).abs().sqrt() + ctx.eps)
    idx = block.index.reshape(-1)
    ratio = D[idx][:, idx] @ torch.linalg.inv(Q @ torch.diag(d) @ Q.T)
    torch.testing.assert_close(ratio, ratio[0, 0] * torch.eye(idx.numel(), dtype=torch.float64),
                               rtol=0, atol=1e-9)
    other = P.with_eps(1.0)
    assert other.blocks is not P.blocks and other.blocks[0].U_A is block.U_A
    assert abs(float(torch.linalg.slogdet(dense(other, ctx.n)).logabsdet)) < 1e-9


def test_kfac_map_equals_g_kron_a_to_the_minus_half_at_eps_zero():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 3)).double()  # G of layer 0 full rank
    ctx = context(model, correlated_inputs(30, 4, 50), "mse", eps=0.0)
    D = dense(KFAC().bind(ctx), ctx.n)
    blocks, _ = blocks_and_ggn(ctx)
    expected = torch.zeros(ctx.n, ctx.n, dtype=torch.float64)
    for layer, kfac, _ggn in blocks:
        w, V = torch.linalg.eigh(kfac)
        idx = layer.index.reshape(-1)  # W̃[o, i] row-major: weights and bias interleaved
        expected[idx[:, None], idx[None, :]] = V @ torch.diag(w.rsqrt()) @ V.T
    expected = expected / torch.exp(torch.linalg.slogdet(expected).logabsdet / ctx.n)
    torch.testing.assert_close(D, expected, rtol=1e-8, atol=1e-10)


def test_inactive_whole_inputs_keep_the_block_and_single_weights_fall_back_to_the_diagonal():
    model, X = small_mlp()
    X = X.double()
    model = model.double()
    n = sum(p.numel() for p in model.parameters())
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.arange(8) * 5 + 2] = False  # input 2 of the first layer: a product set
    mask[40 + 8 + 1] = False  # one weight of the second layer: not a product set
    ctx = context(model, X, "kl", mask=mask)
    target = curvature_target(ctx)
    layers, rest = kronecker_layers(target)
    assert [layer.name for layer in layers] == ["0"]
    assert tuple(layers[0].index.shape) == (8, 5)  # 4 active inputs + the bias
    assert rest.numel() == 3 * 8 + 3 - 1  # the second layer's active coordinates
    P = KFAC().bind(ctx)
    D = dense(P, ctx.n)
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-12)
    assert abs(float(torch.linalg.slogdet(D).logabsdet)) < 1e-9
    # the fallback is the exact Gauss–Newton diagonal (= the KL Hessian's at the anchor)
    h = DiagHessian().curvature(ctx)
    torch.testing.assert_close(P.diagonal_curvature, h[rest], rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------- sequences, sampling


class TokenModel(nn.Module):
    """Embedding → tanh → Linear over tokens: outputs (N, T, V); accepts attention_mask."""

    def __init__(self, vocab=7, width=4, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(ids)))


def token_data():
    ids = torch.randint(0, 7, (6, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0]] * 3 + [[1, 1, 1]] * 3)
    return ids, mask


def test_kfac_on_tokens_ignores_masked_tokens_and_gives_embeddings_their_diagonal():
    ids, mask = token_data()
    ctx = context(TokenModel(), ids, "kl", attention_mask=mask)
    blocks, rest, h = KFAC().blocks(ctx)
    assert [b.name for b in blocks] == ["head"] and rest.numel() == 7 * 4
    torch.testing.assert_close(h, DiagHessian().curvature(ctx)[rest], rtol=1e-10, atol=1e-15)
    other = ids.clone()
    other[:3, 2] = (other[:3, 2] + 1) % 7  # masked tokens: nothing may change
    blocks2, _, _ = KFAC().blocks(context(TokenModel(), other, "kl", attention_mask=mask))
    torch.testing.assert_close(blocks2[0].eigenvalues, blocks[0].eigenvalues, rtol=1e-12,
                               atol=1e-15)


def test_sampled_factors_are_seeded_and_unbiased():
    ids, mask = token_data()
    ctx = context(TokenModel(), ids, "kl", attention_mask=mask)
    target = curvature_target(ctx)
    layers, _ = kronecker_layers(target)
    (A, G), = kronecker_factors(target, layers)  # 15 outputs per example: exact
    (A1, G1), = kronecker_factors(target, layers, max_exact_outputs=4, samples=3, seed=5)
    (A2, G2), = kronecker_factors(target, layers, max_exact_outputs=4, samples=3, seed=5)
    assert torch.equal(G1, G2) and not torch.allclose(G1, G)
    torch.testing.assert_close(A1, A, rtol=1e-12, atol=0)  # A needs no sampling
    (_, G_many), = kronecker_factors(target, layers, max_exact_outputs=4, samples=4000)
    assert float((G_many - G).norm() / G.norm()) < 0.05


def test_a_factor_wider_than_max_factor_size_is_kept_diagonal():
    ids, mask = token_data()
    ctx = context(TokenModel(), ids, "kl", attention_mask=mask)
    target = curvature_target(ctx)
    layers, _ = kronecker_layers(target)
    (A, G), = kronecker_factors(target, layers)
    (A_d, G_d), = kronecker_factors(target, layers, max_factor_size=4)  # d_g = 5, d_a = 5
    torch.testing.assert_close(G_d, G.diagonal()) and torch.testing.assert_close(A_d, A.diagonal())
    P = KFAC(max_factor_size=4).bind(ctx)
    assert P.blocks[0].U_G is None
    D = dense(P, ctx.n)
    assert abs(float(torch.linalg.slogdet(D).logabsdet)) < 1e-9
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cost", ["kl", "mse"])
def test_kfac_does_not_depend_on_data_batching(cost):
    from volsk._problem import prepare_problem
    from volsk.measures import Gaussian

    model, X = small_mlp(n=36)

    def bound(data_batch_size):
        problem = prepare_problem(
            model, X, cost=cost, output="logits", cutoff=10.0, rtol=1e-3,
            measure=Gaussian(sigma=1.0), preconditioner=KFAC(), eps=1e-3, exponent=0.5,
            device="cpu", batch_size=None, n_directions=4, data_batch_size=data_batch_size)
        return problem.preconditioner

    batched, whole = bound(12), bound(None)
    for a, b in zip(batched.blocks, whole.blocks, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-14)
    # the maps agree to the rounding of eigenvalues near 0 (softmax's null direction), which
    # |λ|^½ magnifies below eps
    torch.testing.assert_close(dense(batched.with_eps(1.0), whole.n),
                               dense(whole.with_eps(1.0), whole.n), rtol=1e-7, atol=1e-10)


def test_gpt_neox_linear_layers_get_kronecker_blocks():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    ctx = context(model, ids, "kl", attention_mask=mask)
    blocks, rest, _ = KFAC(max_exact_outputs=8, samples=4).blocks(ctx)  # sampled: 44 outputs
    names = {b.name.rsplit(".", 1)[-1] for b in blocks}
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= names
    assert names & {"embed_out", "lm_head"}  # the unembedding (its name depends on the version)
    space = ctx.evaluator.space
    rest_names = {name.split("[")[0] for name in space.coordinate_names(rest.numpy())}
    assert any("embed_in" in name for name in rest_names)
    assert all("query_key_value" not in name for name in rest_names)
    before = copy.deepcopy(model.state_dict())
    est = LocalVolumeEstimator(sigma=0.5, n_samples=3, preconditioner=KFAC(samples=4),
                               random_state=0).fit(model, ids, attention_mask=mask)
    assert np.isfinite(est.log_volume_)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ guards


def test_kfac_and_lowrank_leave_the_model_untouched():
    model, X = small_mlp()
    model.train()
    model[0].weight.requires_grad_(True)
    model[2].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    for name in ("kfac", "lowrank"):
        with pytest.warns(UserWarning, match="forward hooks"):
            LocalVolumeEstimator(sigma=1.0, n_samples=4, preconditioner=name,
                                 random_state=0).fit(model, X)
    assert calls == [] and model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model[2].bias.requires_grad and model[0].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kfac_with_a_callable_cost_points_to_hessian():
    def cost(outputs, anchor):
        return ((outputs - anchor) ** 2).mean()

    with pytest.raises(ValueError, match="'hessian'"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner="kfac", cost=cost,
                             random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        LocalVolumeEstimator(sigma=1.0, n_samples=2, preconditioner=KFAC(samples=0),
                             random_state=0).fit(nn.Linear(3, 2), torch.randn(8, 3))


def test_kronecker_map_refuses_blocks_that_do_not_cover_every_coordinate_once():
    from volsk.preconditioners.kfac import KroneckerBlock

    block = KroneckerBlock("x", torch.arange(4).reshape(2, 2), None, None, torch.ones(2, 2))
    with pytest.raises(ValueError, match="exactly once"):
        KroneckerMap([block], torch.tensor([3]), torch.ones(1), 5, eps=0.0, exponent=0.5)
