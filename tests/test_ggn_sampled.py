"""The sampled Gauss–Newton diagonal: unbiased, deterministic, bounded in memory, chosen
automatically where the exact one would not fit, and usable by ``fit`` on a language model."""

import subprocess
import sys
import textwrap
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from volsk import LocalVolumeEstimator
from volsk._evaluate import FunctionalModel
from volsk._evaluate_large import LargeModel
from volsk.costs import make_cost
from volsk.preconditioners import KFAC, DiagHessian, PreconditionerContext
from volsk.preconditioners.curvature import ggn
from volsk.preconditioners.curvature.ggn import (
    exact_jacobian_bytes,
    gauss_newton_diagonal,
    ggn_diagonal,
    sampled_ggn_diagonal,
)
from volsk.preconditioners.curvature.target import curvature_target

# ------------------------------------------------------------------------------- models


def mlp_problem(seed=0, n=64):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    return net, torch.randn(n, 6, generator=gen)


def gpt_neox(vocab=97, seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=vocab, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(config).eval()


def tokens(vocab, n=3, length=8):
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, length // 2:] = 0  # right padding
    return ids, mask


def target_of(model, X, cost="kl", mask=None, data_batch_size=None, random_state=0,
              dtype=torch.float64, evaluator=FunctionalModel):
    kwargs = {} if mask is None else {"attention_mask": mask}
    ev = evaluator(model, X, "cpu", forward_kwargs=kwargs, data_batch_size=data_batch_size)
    parts = []
    for batch in ev.batches:
        parts.append(make_cost(cost, ev.anchor_outputs(len(parts)), mask=batch.token_mask()))
    if len(parts) == 1:
        bound = parts[0]
    else:
        from volsk._evaluate import BatchedCost

        sizes = [b.n for b in ev.batches]
        terms = [p.n_terms(b.n) for p, b in zip(parts, ev.batches)]
        bound = BatchedCost(parts, [t / sum(terms) for t in terms], sizes)
    ctx = PreconditionerContext(ev, bound, torch.ones(ev.space.n, dtype=torch.bool),
                                random_state=random_state)
    return ctx, curvature_target(ctx, dtype)


CASES = {
    "mlp-kl": lambda: target_of(*mlp_problem())[1],
    "mlp-mse": lambda: target_of(*mlp_problem(), cost="mse")[1],
    "mlp-kl-batched": lambda: target_of(*mlp_problem(), data_batch_size=24)[1],
    "gpt-neox-kl-masked": lambda: target_of(gpt_neox(), *tokens(97)[:1],
                                            mask=tokens(97)[1])[1],
}

# ----------------------------------------------------------------------- the statistics


def per_sample(target, samples, seed=0):
    """(samples, n_active): each sample's estimate Σ_b g_{b,s}² (the data batches summed)."""
    out = torch.zeros(samples, target.n_active, dtype=torch.float64)
    seen = {}
    squares = ggn._ActiveSquares(target)
    for part, grads in ggn._gradient_samples(target, samples, seed, "test", squares.names):
        s = seen.get(part.batch, 0)
        square = squares.zeros()
        squares.add(square, grads)
        out[s] += squares.result(square)
        seen[part.batch] = s + 1
    return out


def unbiasedness_z(estimates, exact, target):
    """The largest |z| of the per-tensor sums and the mean per-coordinate z².

    Under unbiasedness each sum's z (mean − exact over its standard error) is about N(0, 1),
    and the mean of the coordinates' z² about 1."""
    S = estimates.shape[0]
    offsets = target.evaluator.space.offsets().tolist()
    worst = 0.0
    for a, b in zip(offsets[:-1], offsets[1:]):
        sums = estimates[:, a:b].sum(1)
        se = sums.std() / np.sqrt(S)
        if se > 0:
            worst = max(worst, float(((sums.mean() - exact[a:b].sum()) / se).abs()))
    se = estimates.std(0) / np.sqrt(S)
    keep = se > 0
    mean_z2 = float((((estimates.mean(0) - exact)[keep] / se[keep]) ** 2).mean())
    return worst, mean_z2


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampled_diagonal_converges_to_the_exact_one(case):
    target = CASES[case]()
    exact = ggn_diagonal(target)
    estimates = per_sample(target, 400)
    worst, mean_z2 = unbiasedness_z(estimates, exact, target)
    assert worst < 5.0
    assert 0.6 < mean_z2 < 1.6
    # what sampled_ggn_diagonal returns is these samples' mean
    torch.testing.assert_close(sampled_ggn_diagonal(target, 400, seed=0), estimates.mean(0),
                               rtol=1e-12, atol=0)
    # each sample's relative variance is at most 2 (Rademacher signs), up to sampling noise
    relative = estimates.var(0)[exact > 0] / exact[exact > 0] ** 2
    assert float(relative.mean()) < 2.2


def test_rademacher_cotangents_are_one_stream_in_every_buffer():
    root = torch.rand(3, 5, 7, dtype=torch.float64) + 0.5
    bits = torch.randint(0, 2, (2, 3, 5, 7), generator=torch.Generator().manual_seed(4),
                         dtype=torch.int8)
    for dtype in (torch.float64, torch.float32):
        for signs in (None, torch.empty(root.shape, dtype=torch.int8)):  # the CPU, a device
            generator = torch.Generator().manual_seed(4)
            out = torch.empty(root.shape, dtype=dtype)
            for draw in bits:  # two draws into one buffer: the stream goes on
                got = ggn._rademacher_cotangent(root.to(dtype), generator, signs, out)
                assert got.data_ptr() == out.data_ptr()
                assert torch.equal(got, (root * (1 - 2 * draw.double())).to(dtype))


def _shared_over_examples(root, generator, signs, out):
    """A wrong estimator: one sign per output unit, the same for every example."""
    signs = torch.randint(0, 2, root.shape[1:], generator=generator).to(root) * 2 - 1
    return root * signs


def _one_sign_per_example(root, generator, signs, out):
    """A wrong estimator: one sign per example, shared by its outputs."""
    shape = root.shape[:1] + (1,) * (root.ndim - 1)
    return root * (torch.randint(0, 2, shape, generator=generator).to(root) * 2 - 1)


@pytest.mark.parametrize("wrong", [_shared_over_examples, _one_sign_per_example])
@pytest.mark.parametrize("case", ["mlp-kl", "gpt-neox-kl-masked"])
def test_the_unbiasedness_check_rejects_a_biased_estimator(monkeypatch, case, wrong):
    target = CASES[case]()
    exact = ggn_diagonal(target)
    monkeypatch.setattr(ggn, "_rademacher_cotangent", wrong)
    worst, mean_z2 = unbiasedness_z(per_sample(target, 400), exact, target)
    assert worst > 5.0 or mean_z2 > 1.6


# ---------------------------------------------------------------------- determinism


def test_sampled_diagonal_is_a_function_of_random_state():
    net, X = mlp_problem()
    first = DiagHessian(method="sampled", samples=8).curvature(target_of(net, X)[0])
    again = DiagHessian(method="sampled", samples=8).curvature(target_of(net, X)[0])
    other = DiagHessian(method="sampled", samples=8).curvature(
        target_of(net, X, random_state=1)[0])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # the first 8 of 16 samples are the 8 samples: one stream, drawn in order (in the
    # float32 model's own precision)
    sixteen = per_sample(target_of(net, X, dtype=None)[1], 16)
    torch.testing.assert_close(first, sixteen[:8].mean(0), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the automatic route


def test_auto_is_the_exact_route_bit_for_bit_where_the_jacobian_fits():
    net, X = mlp_problem()
    ctx, target = target_of(net, X)
    auto = DiagHessian().curvature(ctx)
    assert torch.equal(auto, DiagHessian(method="exact").curvature(ctx))
    assert torch.equal(auto, ggn_diagonal(target).cpu())
    ids, mask = tokens(97)
    ctx, target = target_of(gpt_neox(), ids, mask=mask)
    assert exact_jacobian_bytes(target) < 1 << 30
    assert torch.equal(DiagHessian().curvature(ctx), ggn_diagonal(target).cpu())


def test_auto_samples_where_one_example_jacobian_would_not_fit():
    ids, mask = tokens(8192, n=2, length=16)
    ctx, target = target_of(gpt_neox(vocab=8192), ids, mask=mask, dtype=None)
    assert exact_jacobian_bytes(target) > 10 << 30  # tokens × vocabulary × n_active
    auto = DiagHessian(samples=4).curvature(ctx)
    assert torch.equal(auto, DiagHessian(method="sampled", samples=4).curvature(ctx))
    # in the (float32) model's own precision by default; float64 when asked
    assert target.evaluator is ctx.evaluator
    assert torch.equal(auto, gauss_newton_diagonal(target, "sampled", 4).cpu())
    in_float64 = DiagHessian(samples=4, dtype=torch.float64).curvature(ctx)
    _, twin = target_of(gpt_neox(vocab=8192), ids, mask=mask)
    assert torch.equal(in_float64, sampled_ggn_diagonal(twin, 4).cpu())
    # the same signs: the two precisions agree to float32 rounding
    torch.testing.assert_close(auto, in_float64, rtol=1e-3, atol=1e-6 * float(auto.max()))
    assert bool((auto >= 0).all()) and bool(torch.isfinite(auto).all())


def test_float32_logits_over_a_large_vocabulary_keep_the_fisher():
    # a float32 log-softmax over 50 304 classes is a few 1e-6 off normalised from rounding
    # alone; the KL's Hessian at the anchor is still the Fisher, so DiagHessian stays on the
    # sampled route in the model's float32 (it took a float64 copy of the model when not)
    z = torch.randn(2, 64, 50304, generator=torch.Generator().manual_seed(0)) * 3
    rounded = torch.logsumexp(torch.log_softmax(z, -1).double(), -1)
    assert float(rounded.abs().max()) > 1e-6
    assert make_cost("kl", z).hessian_equals_ggn()
    unnormalised = make_cost("kl", z.softmax(-1) * 1.001, output="probabilities")
    assert not unnormalised.hessian_equals_ggn()


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "fast"}, "method must be one of"),
    ({"samples": 0}, "samples must be a positive integer"),
    ({"samples": 2.5}, "samples must be a positive integer"),
    ({"probes": 0}, "probes must be a positive integer or None"),
    ({"max_exact": -1}, "max_exact must be a non-negative integer"),
    ({"method": "exact", "probes": 4}, "cannot be combined with method='exact'"),
    ({"dtype": "float64"}, "dtype must be 'auto', a torch.dtype or None"),
])
def test_diag_hessian_arguments_are_validated(kwargs, match):
    ctx, _ = target_of(*mlp_problem())
    with pytest.raises(ValueError, match=match):
        DiagHessian(**kwargs).curvature(ctx)


def test_sampled_diagonal_rejects_bad_samples():
    _, target = target_of(*mlp_problem())
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        sampled_ggn_diagonal(target, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        gauss_newton_diagonal(target, "fast")


def test_method_applies_to_the_hessian_vector_product_route():
    # cross_entropy: the Hessian is not the Gauss–Newton matrix; "sampled" is Hutchinson's
    net, X = mlp_problem()
    y = torch.arange(X.shape[0]) % 5
    ev = FunctionalModel(net, X, "cpu")
    ctx = PreconditionerContext(ev, make_cost("cross_entropy", ev.anchor_outputs(), y=y),
                                torch.ones(ev.space.n, dtype=torch.bool))
    exact = DiagHessian(method="exact", max_exact=1).curvature(ctx)
    torch.testing.assert_close(exact, DiagHessian().curvature(ctx), rtol=1e-12, atol=0)
    sampled = DiagHessian(method="sampled", samples=3).curvature(ctx)
    assert torch.equal(sampled, DiagHessian(probes=3).curvature(ctx))
    assert not torch.equal(sampled, exact)


def test_kfac_diagonal_part_uses_the_sampled_diagonal_beyond_max_exact_outputs():
    ids, mask = tokens(97)
    ctx, target = target_of(gpt_neox(), ids, mask=mask)
    blocks, rest, h = KFAC(max_exact_outputs=8, probes=400).blocks(ctx)
    exact = ggn_diagonal(target)[rest]
    # the embeddings and layer norms, within 5 standard errors of the whole part's sum
    # (each sample's relative variance is at most 2)
    assert abs(float(h.sum() - exact.sum())) < 5 * np.sqrt(2 / 400) * float(exact.sum())
    assert torch.equal(h, sampled_ggn_diagonal(
        type(target)(target.evaluator, target.parts, target.cols[rest], 0), 400, seed=0).cpu())


# --------------------------------------------------------------- memory and end to end

CHILD = textwrap.dedent("""
    import resource, warnings
    import torch
    torch.set_num_threads(1)
    import transformers
    from volsk._evaluate import FunctionalModel
    from volsk.costs import make_cost
    from volsk.preconditioners import PreconditionerContext
    from volsk.preconditioners.curvature.ggn import exact_jacobian_bytes, gauss_newton_diagonal
    from volsk.preconditioners.curvature.target import curvature_target
    warnings.simplefilter("ignore")
    config = transformers.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=8192, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    ev = FunctionalModel(model, ids, "cpu")
    ctx = PreconditionerContext(ev, make_cost("kl", ev.anchor_outputs()),
                                torch.ones(ev.space.n, dtype=torch.bool))
    target = curvature_target(ctx)
    target.evaluator.anchor_outputs(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = gauss_newton_diagonal(target, samples=8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024, exact_jacobian_bytes(target), ev.space.n,
          ev.anchor_outputs(0).numel())
""")


@pytest.mark.skipif(sys.platform == "win32", reason="resource.getrusage is Unix-only")
def test_sampled_route_memory_is_a_few_output_buffers_not_the_jacobian():
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=600, check=True)
    extra, jacobian, n, outputs = map(int, done.stdout.split())
    assert jacobian > 10 << 30  # what the exact route would need for one example
    assert extra < 1 << 30
    # the float64 twin's gradients and a few float64 output-sized buffers, with headroom
    assert extra < 64 * (8 * n + 8 * outputs)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated by the operators run under this mode (forward,
    backward and in-place fills alike) that are still alive: ``now`` and ``peak``.

    A storage is counted from the operator that first returns it until it is freed (a finalizer
    on the storage); storages that existed before (met first as an operator's input) count 0.
    """

    def __init__(self):
        super().__init__()
        self.sizes = {}  # storage address → bytes counted
        self.now = self.peak = 0

    def _see(self, tensor, new):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.sizes or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes() if new else 0
        self.now += self.sizes[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._see(t, new=False)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, new=True)
        return out


def _peak_bytes(target, samples):
    with LiveBytes() as live:
        sampled_ggn_diagonal(target, samples, seed=0)
    return live.peak


def _lm_target(evaluator):
    # a float32 model on two data batches, its embedding only partly active (a fit leaves out
    # a language model's unused embedding rows)
    ids, mask = tokens(8192, n=2, length=16)
    _, target = target_of(gpt_neox(vocab=8192), ids, mask=mask, dtype=None,
                          data_batch_size=1, evaluator=evaluator)
    assert target.evaluator.space.names[0].endswith("embed_in.weight")  # the first 8192 × 32
    active = torch.ones(target.evaluator.space.n, dtype=torch.bool)
    used = torch.zeros(8192, dtype=torch.bool)
    used[ids.unique()] = True
    active[:8192 * 32] = used.repeat_interleave(32)
    return type(target)(target.evaluator, target.parts, torch.nonzero(active).flatten(), 0)


@pytest.mark.parametrize("evaluator", [FunctionalModel, LargeModel])
def test_sampled_route_allocations_do_not_grow_with_samples(evaluator):
    pytest.importorskip("transformers")
    target = _lm_target(evaluator)
    n, n_active = target.evaluator.space.n, target.n_active
    outputs = target.evaluator.anchor_outputs(0).numel()  # per data batch
    few, many = _peak_bytes(target, 2), _peak_bytes(target, 16)
    # each sample reuses the buffers of the one before: the same allocations, the same peak
    assert many == few
    # the float64 sum; θ in the model's dtype (a copy only where θ is kept in float64); one
    # backward pass's gradients and a chunk of their float64 squares; four float32
    # output-sized buffers (the factor's root, the cotangent, the log-probabilities the graph
    # keeps, their gradient); the activations of a 16-token batch here are well under 1 MiB
    model_bytes = 4 * n
    copies = 2 if evaluator is FunctionalModel else 1
    bound = (8 * n_active + copies * model_bytes + 8 * ggn._SQUARE_CHUNK + 4 * 4 * outputs
             + (1 << 20))
    assert 8 * n_active <= many <= bound


def test_the_allocation_check_sees_what_grows_with_samples(monkeypatch):
    pytest.importorskip("transformers")
    target = _lm_target(LargeModel)
    outputs = target.evaluator.anchor_outputs(0).numel()
    kept = []
    draw = ggn._rademacher_cotangent

    def leaky(root, generator, signs, out):
        kept.append(draw(root, generator, signs, out).clone())
        return kept[-1]

    monkeypatch.setattr(ggn, "_rademacher_cotangent", leaky)
    few = _peak_bytes(target, 2)
    kept.clear()
    many = _peak_bytes(target, 16)
    assert many - few >= 2 * 14 * 4 * outputs  # 14 more cotangents kept on each of 2 batches


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("evaluation", ["auto", "large"])
def test_fit_with_diag_hessian_on_a_large_vocabulary_language_model(evaluation):
    model = gpt_neox(vocab=8192)
    ids, mask = tokens(8192, n=2, length=16)
    before = _snapshot(model)
    est = LocalVolumeEstimator(1e-2, sigma=0.05, n_samples=2, preconditioner="diag_hessian",
                               preconditioner_eps=1e-3, evaluation=evaluation, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low effective sample size with two directions
        est.fit(model, ids, attention_mask=mask)
    assert np.isfinite(est.log_volume_)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
