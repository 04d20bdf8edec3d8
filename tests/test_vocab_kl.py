"""The vocabulary-safe KL: one cached anchor array, chunked evaluation, and the cache options
(``KL(anchor_dtype=...)``, ``KL(top_k=...)``) — against the unchunked formula it replaced."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jvp, vmap

import volsk.costs as costs
from volsk import LocalVolumeEstimator
from volsk.costs import KL, make_cost, to_log_probs


class ReferenceKL:
    """The bound KL as it was before chunking: vocabulary-sized copies of p₀, w·p₀, z₀ (and
    their transposes) kept for every evaluation. The reference for bit-identity and the
    memory tests' counter-example."""

    def __init__(self, anchor, output, mask):
        self.anchor, self.output, self.mask = anchor, output, mask
        self.log_p0 = to_log_probs(costs._upcast(anchor), output).detach()
        self.p0 = self.log_p0.exp()
        if output == "logits":
            self.z0 = costs._upcast(anchor).detach()
            self.lse0 = torch.logsumexp(self.z0, -1)
            w = torch.ones_like(self.lse0) if mask is None else mask.to(self.lse0.dtype)
            self.w = w / w.sum()
            self.w_p0 = self.w.unsqueeze(-1) * self.p0
            if self.z0.ndim == 2:
                self.z0_t, self.w_p0_t = self.z0.t().contiguous(), self.w_p0.t().contiguous()

    def __call__(self, outputs):
        if self.output == "logits":
            z = costs._upcast(outputs)
            shift = (self.w * (torch.logsumexp(z, -1) - self.lse0)).sum()
            return shift - (self.w_p0 * (z - self.z0)).sum()
        log_p = to_log_probs(costs._upcast(outputs), self.output)
        terms = torch.where(self.p0 > 0, self.p0 * (self.log_p0 - log_p), torch.zeros_like(log_p))
        return costs._masked_mean(terms.sum(-1), self.mask)

    def features_first(self, outputs_t):
        z = costs._upcast(outputs_t)
        shift = ((torch.logsumexp(z, 1) - self.lse0) * self.w).sum(1)
        return shift - ((z - self.z0_t) * self.w_p0_t).sum((1, 2))

    def taylor_reduce(self):
        mask = self.mask
        if self.output == "logits":
            p0 = torch.softmax(self.anchor.detach(), -1)

            def reduce_logits(t):
                mean = (p0 * t).sum(-1, keepdim=True)
                return costs._masked_mean((p0 * (t - mean) ** 2).sum(-1), mask)

            return reduce_logits
        p0 = to_log_probs(self.anchor, self.output).detach().exp()

        def reduce(t):
            terms = torch.where(p0 > 0, p0 * t * t, torch.zeros_like(t))
            return costs._masked_mean(terms.sum(-1), mask)

        return reduce

    def ggn_root(self, anchor, weight):
        log_p = to_log_probs(anchor, self.output).to(torch.float64)
        return (costs._position_weights(weight, log_p, self.mask)[..., None] * log_p.exp()).sqrt()

    def logit_diagonal(self, logits, weight):
        q = torch.softmax(logits, dim=-1)
        return costs._position_weights(weight, q, self.mask)[..., None] * (q - q * q)


def sequences(n=3, t=5, v=7, dtype=torch.float64, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    anchor = (scale * torch.randn(n, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    moved = (anchor.double() + 0.3 * torch.randn(n, t, v, generator=gen,
                                                 dtype=torch.float64)).to(dtype)
    mask = (torch.rand(n, t, generator=gen) < 0.7).long()
    mask[0, 0] = 1
    return anchor, moved, mask


def as_output(logits, output):
    if output == "probabilities":
        return torch.softmax(logits, -1)
    if output == "log_probabilities":
        return torch.log_softmax(logits, -1)
    return logits


def force_chunk_rows(monkeypatch, rows, v):
    """Chunks of ``rows`` rows over a last axis of ``v`` classes."""
    monkeypatch.setattr(costs, "_KL_CHUNK_BYTES", 8 * v * rows)


# ------------------------------------------------------------------- the default: unchanged


CASES = [
    ("logits", torch.float32, True), ("logits", torch.float64, False),
    ("logits", torch.bfloat16, True), ("probabilities", torch.float32, True),
    ("log_probabilities", torch.float64, True), ("logits", torch.float32, None),
]


@pytest.mark.parametrize("output, dtype, masked", CASES)
def test_default_kl_is_bit_identical_to_the_unchunked_formula(output, dtype, masked):
    anchor, moved, mask = sequences(dtype=dtype)
    if masked is None:  # (N, V) outputs: one distribution per example
        anchor, moved, mask = anchor[:, 0], moved[:, 0], None
    elif not masked:
        mask = None
    anchor, moved = as_output(anchor, output), as_output(moved, output)
    new, old = make_cost("kl", anchor, output=output, mask=mask), ReferenceKL(anchor, output,
                                                                              mask)
    assert torch.equal(new(moved), old(moved))
    assert float(new(anchor)) == float(old(anchor))
    batch = torch.stack([anchor, moved, 2 * moved - anchor])  # vmapped over directions
    assert torch.equal(vmap(new)(batch), vmap(old)(batch))
    if hasattr(old, "z0_t"):
        outputs_t = batch.transpose(1, 2).contiguous()
        assert torch.equal(new.features_first(outputs_t), old.features_first(outputs_t))
    tangent = (moved.double() - anchor.double()).to(moved.dtype)
    tangent = to_log_probs(moved, output) if output != "logits" else tangent
    assert torch.equal(new.taylor()[1](tangent), old.taylor_reduce()(tangent))
    assert torch.equal(new.ggn_factor(anchor, 0.5)[1], old.ggn_root(anchor, 0.5))
    if output == "logits":
        got = new.output_hessian_diagonal(moved, 0.5, logits=True, folded=False)
        assert torch.equal(got, old.logit_diagonal(moved, 0.5))


def test_binary_outputs_are_unchanged():
    gen = torch.Generator().manual_seed(3)
    anchor = torch.randn(6, 1, generator=gen)
    moved = anchor + 0.4 * torch.randn(6, 1, generator=gen)
    for output, a, m in [("binary_logits", anchor, moved),
                         ("binary_probabilities", torch.sigmoid(anchor), torch.sigmoid(moved))]:
        new, old = make_cost("kl", a, output=output), ReferenceKL(a, output, None)
        assert torch.equal(new(m), old(m))
        assert torch.equal(new.taylor()[1](to_log_probs(m, output)),
                           old.taylor_reduce()(to_log_probs(m, output)))


# ------------------------------------------------------------------------------ chunking


@pytest.mark.parametrize("output", ["logits", "probabilities", "log_probabilities"])
@pytest.mark.parametrize("rows", [1, 4, 6])
def test_chunked_kl_equals_unchunked(monkeypatch, output, rows):
    anchor, moved, mask = (as_output(t, output) if t.is_floating_point() else t
                           for t in sequences(n=4, t=6, v=9, scale=2.0))
    whole = make_cost("kl", anchor, output=output, mask=mask)
    force_chunk_rows(monkeypatch, rows, 9)
    chunked = make_cost("kl", anchor, output=output, mask=mask)
    assert not chunked._single
    assert float(chunked(moved)) == pytest.approx(float(whole(moved)), rel=1e-12)
    assert abs(float(chunked(anchor))) < 1e-15
    batch = torch.stack([moved, anchor + 0.5 * (moved - anchor)])
    np.testing.assert_allclose(vmap(chunked)(batch), vmap(whole)(batch), rtol=1e-12)
    # the Taylor curvature is a mean of per-token values: chunking leaves it bit for bit
    tangent = moved - anchor if output == "logits" else to_log_probs(moved, output)
    assert torch.equal(chunked.taylor()[1](tangent), whole.taylor()[1](tangent))
    assert chunked.hessian_equals_ggn() == whole.hessian_equals_ggn()


def test_chunked_kl_has_the_same_derivatives_along_a_ray(monkeypatch):
    anchor, moved, mask = sequences(n=2, t=5, v=8)
    u = moved - anchor

    def second_derivative(cost):
        def slope(r):
            return jvp(lambda s: cost(anchor + s * u), (r,), (torch.ones(()),))[1]

        return jvp(slope, (torch.zeros((), dtype=torch.float64),), (torch.ones((),
                                                                     dtype=torch.float64),))[1]

    whole = make_cost("kl", anchor, mask=mask)
    force_chunk_rows(monkeypatch, 3, 8)
    chunked = make_cost("kl", anchor, mask=mask)
    curvature = chunked.taylor()[1](u)  # p₀'s variance of the logit tangent
    assert float(second_derivative(chunked)) == pytest.approx(float(second_derivative(whole)),
                                                              rel=1e-10)
    assert float(second_derivative(chunked)) == pytest.approx(float(curvature), rel=1e-10)


def test_float32_chunks_agree_to_float32_rounding(monkeypatch):
    anchor, moved, mask = sequences(n=8, t=16, v=500, dtype=torch.float32, scale=3.0)
    exact = float(make_cost("kl", anchor.double(), mask=mask)(moved.double()))
    force_chunk_rows(monkeypatch, 7, 500)
    chunked = float(make_cost("kl", anchor, mask=mask)(moved))
    assert chunked == pytest.approx(exact, rel=1e-4)


# ---------------------------------------------------------------------------- the options


def test_top_k_is_at_most_the_exact_kl_grows_with_k_and_is_exact_at_k_equal_v(monkeypatch):
    anchor, moved, mask = sequences(n=3, t=4, v=12, scale=2.0)
    exact = float(make_cost("kl", anchor, mask=mask)(moved))
    values = [float(KL(top_k=k).bind(anchor, mask=mask)(moved)) for k in range(1, 13)]
    assert all(v <= exact * (1 + 1e-12) for v in values)  # data-processing inequality
    assert all(a <= b * (1 + 1e-12) for a, b in zip(values, values[1:]))  # nested partitions
    assert values[0] > 0
    assert values[-1] == pytest.approx(exact, rel=1e-12)
    assert float(KL(top_k=50).bind(anchor, mask=mask)(moved)) == pytest.approx(exact, rel=1e-12)
    force_chunk_rows(monkeypatch, 5, 12)
    chunked = KL(top_k=4).bind(anchor, mask=mask)
    assert float(chunked(moved)) == pytest.approx(values[3], rel=1e-12)
    assert abs(float(chunked(anchor))) < 1e-15


@pytest.mark.parametrize("output", ["logits", "probabilities"])
def test_top_k_curvature_and_gauss_newton_factor_are_the_coarse_kl_s(output):
    anchor, moved, mask = sequences(n=2, t=3, v=10)
    anchor, moved = as_output(anchor, output), as_output(moved, output)
    cost = KL(top_k=3).bind(anchor, output=output, mask=mask)
    u = moved - anchor
    transform, reduce = cost.taylor()
    _, t = jvp(lambda s: transform(anchor + s * u), (torch.zeros((), dtype=torch.float64),),
               (torch.ones((), dtype=torch.float64),))

    def value(r):
        return cost(anchor + r * u)

    hessian = torch.func.hessian(value)(torch.zeros((), dtype=torch.float64))
    assert float(reduce(t)) == pytest.approx(float(hessian), rel=1e-8)
    transform, root = cost.ggn_factor(anchor, 1.0)
    assert float(((root * t) ** 2).sum()) == pytest.approx(float(hessian), rel=1e-8)
    assert cost.hessian_equals_ggn()


def test_top_k_logit_hessian_diagonal_matches_autograd():
    anchor, moved, mask = sequences(n=2, t=3, v=8)
    cost = KL(top_k=3).bind(anchor, mask=mask)
    got = cost.output_hessian_diagonal(moved, 0.7, logits=True, folded=False)
    H = torch.func.hessian(lambda z: 0.7 * cost(z))(moved).reshape(moved.numel(), -1)
    np.testing.assert_allclose(got.reshape(-1), H.diagonal(), atol=1e-12)


def test_bfloat16_anchor_cache_is_within_the_rounding_it_states(monkeypatch):
    """The KL from the rounded anchor distribution: near 0 at the anchor (half the variance
    of the rounding errors, ≲ 2^-17 per nat² of log-probability spread) and within 1 % of
    the exact KL once that is 100× larger."""
    anchor, moved, mask = sequences(n=4, t=32, v=4096, dtype=torch.float32, scale=3.0)
    rounded = KL(anchor_dtype=torch.bfloat16).bind(anchor, mask=mask)
    assert rounded._cache.dtype == torch.bfloat16 and rounded.anchor is rounded._cache
    log_p = torch.log_softmax(anchor.double(), -1)
    spread = float((log_p.exp() * (log_p - (log_p.exp() * log_p).sum(-1, keepdim=True)) ** 2)
                   .sum(-1).max())  # the largest varentropy of a token
    at_anchor = float(rounded(anchor))
    assert 0 <= at_anchor <= spread * 2.0**-17
    exact = make_cost("kl", anchor.double(), mask=mask)
    for scale in (0.2, 0.5, 1.0):
        point = anchor + scale * (moved - anchor)
        kl = float(exact(point.double()))
        assert kl > 100 * at_anchor
        assert float(rounded(point)) == pytest.approx(kl, rel=1e-2)
    assert not rounded.hessian_equals_ggn()
    force_chunk_rows(monkeypatch, 9, 4096)
    chunked = KL(anchor_dtype="bfloat16").bind(anchor, mask=mask)
    assert torch.equal(chunked._cache, rounded._cache)
    assert float(chunked(moved)) == pytest.approx(float(rounded(moved)), rel=1e-4)


def test_a_cache_in_the_anchor_s_own_dtype_is_the_default():
    anchor, moved, mask = sequences(dtype=torch.float32)
    same = KL(anchor_dtype=torch.float32).bind(anchor, mask=mask)
    assert torch.equal(same(moved), make_cost("kl", anchor, mask=mask)(moved))


@pytest.mark.parametrize("kwargs, match", [
    ({"anchor_dtype": torch.int32}, "anchor_dtype must be None .* floating torch dtype"),
    ({"anchor_dtype": "bfloat"}, "anchor_dtype must be"),
    ({"anchor_dtype": 16}, "anchor_dtype must be"),
    ({"top_k": 0}, "top_k must be None .* positive int"),
    ({"top_k": 2.5}, "top_k must be"),
    ({"top_k": True}, "top_k must be"),
])
def test_bad_options_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KL(**kwargs)


def test_options_on_a_binary_classifier_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="two classes.*use KL()"):
        KL(top_k=1).bind(torch.zeros(4, 1), output="binary_logits")


def test_repr_shows_only_the_options_given():
    assert repr(KL()) == "KL()"
    assert repr(KL(anchor_dtype="bfloat16", top_k=5)) == \
        "KL(anchor_dtype=torch.bfloat16, top_k=5)"


# ---------------------------------------------------------------------------------- memory


def retained_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj.__dict__`` and from the
    closures of what its ``taylor()`` returns."""
    found = list(vars(obj).values())
    for fn in obj.taylor() or ():
        found += [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())]
    storages = {}
    for value in found:
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def test_the_bound_kl_keeps_one_anchor_array_and_per_token_vectors():
    n, t, v = 4, 16, 4096  # 64 tokens
    anchor = torch.randn(n, t, v)
    mask = torch.ones(n, t)
    tokens, anchor_bytes = n * t, anchor.numel() * 4
    per_token = 64 * tokens  # a few vectors of one float per token, and the mask

    class Old(ReferenceKL):
        def taylor(self):
            return (lambda out: out), self.taylor_reduce()

    assert retained_bytes(Old(anchor, "logits", mask)) > 3 * anchor_bytes
    assert retained_bytes(make_cost("kl", anchor, mask=mask)) <= anchor_bytes + per_token
    rounded = KL(anchor_dtype=torch.bfloat16).bind(anchor, mask=mask)
    assert retained_bytes(rounded) <= anchor_bytes // 2 + per_token
    k = 32
    coarse = KL(top_k=k).bind(anchor, mask=mask)
    assert retained_bytes(coarse) <= tokens * (k + 1) * 4 + tokens * k * 4 + per_token


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    import volsk.costs as costs
    from test_vocab_kl import ReferenceKL

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    tokens, vocab = 512, 50304
    gen = torch.Generator().manual_seed(0)
    anchor = torch.empty(tokens, vocab).normal_(generator=gen)   # in place: no temporaries
    outputs = torch.empty(tokens, vocab).normal_(generator=gen).mul_(0.01).add_(anchor)
    cost = (ReferenceKL(anchor, "logits", None) if sys.argv[1] == "old"
            else costs.make_cost("kl", anchor))
    def high_water_mark():  # VmHWM: the peak RSS since the last reset
        with open("/proc/self/status") as fh:
            line = next(line for line in fh if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    before = rss()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak to the current RSS: earlier peaks (imports) do not count
    with torch.no_grad():
        value = float(cost(outputs))
    peak = high_water_mark()
    print(json.dumps({"extra": peak - before, "value": value,
                      "chunk": costs._KL_CHUNK_BYTES // 2, "anchor": anchor.numel() * 4}))
""")


def peak_of_one_evaluation(which):
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, which,
                           str(__import__("pathlib").Path(__file__).parent)],
                          capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": ":".join(sys.path),
                               # glibc: every block ≥ 64 KiB its own mapping, unmapped when
                               # freed, so that RSS follows the live tensors
                               "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_one_evaluation_allocates_a_few_chunks_not_the_vocabulary():
    """512 tokens × 50 304 classes (98 MiB of float32 logits): one evaluation's peak RSS
    above what the process held before stays within four float32 chunks (three are live at
    once); the unchunked formula needs more than the anchor outputs again."""
    new = peak_of_one_evaluation("new")
    assert new["extra"] <= 4 * new["chunk"] < 0.7 * new["anchor"]
    old = peak_of_one_evaluation("old")
    assert old["extra"] > new["anchor"]
    assert new["value"] == pytest.approx(old["value"], rel=1e-4)


# ------------------------------------------------------------------- through the estimator


class TinyLM(nn.Module):
    """Token ids (N, T) → logits (N, T, V): an embedding, a tanh layer, an unembedding."""

    def __init__(self, vocab=40, width=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.hidden = nn.Embedding(vocab, width), nn.Linear(width, width)
        self.unembed = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.unembed(torch.tanh(self.hidden(self.embed(ids))))


@pytest.mark.parametrize("evaluation", ["vmap", "large"])
def test_top_k_radii_are_at_least_the_exact_radii(evaluation):
    model = TinyLM()
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1))

    def fit(cost):
        return LocalVolumeEstimator(cutoff=1e-2, n_samples=6, cost=cost, random_state=0,
                                    evaluation=evaluation, rtol=1e-4).fit(model, ids)

    exact, coarse = fit("kl"), fit(KL(top_k=3))
    assert np.all(coarse.radii_ >= exact.radii_ * (1 - 1e-3))
    assert coarse.log_volume_ > exact.log_volume_
    assert np.all(fit(KL(top_k=40)).radii_ == pytest.approx(exact.radii_, rel=1e-3))
    # the rounded anchor distribution moves each radius by well under 0.1 %
    rounded = fit(KL(anchor_dtype=torch.bfloat16))
    assert np.abs(np.log(rounded.radii_ / exact.radii_)).max() < 1e-3
