"""The large-model evaluator: implicit directions, the same estimate as the vmapped evaluator to
rounding, invariance to batching, memory that does not grow with k, the user's model untouched."""

import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from joblib import parallel_config
from test_estimator import assert_same, snapshot

from models import small_mlp
from volsk import LocalVolumeEstimator
from volsk._evaluate_large import LargeModel
from volsk._layout import ActiveLayout
from volsk._sampling import draw_directions, stream_direction
from volsk.measures import Gaussian, Lebesgue, MeasureContext, Uniform
from volsk.preconditioners import DiagonalMap, EigenMap, Identity, PreconditionerContext


def fit(model, X, evaluation, **kw):
    params = {"sigma": 0.5, "n_samples": 12, "random_state": 0} | kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low effective sample size on these tiny fits
        return LocalVolumeEstimator(evaluation=evaluation, **params).fit(model, X)


class TinyLM(torch.nn.Module):
    """Token embedding, a causal running mean, a vocabulary head: outputs (N, T, V)."""

    def __init__(self, vocab=11, width=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(torch.tanh(h.cumsum(1) / steps))


# ----------------------------------------------------------------------- implicit directions


def test_chunked_normals_are_the_numbers_of_one_draw():
    whole = np.random.default_rng([5, 7]).standard_normal(100_003)
    gen, parts = np.random.default_rng([5, 7]), np.empty(100_003)
    for start in range(0, parts.size, 4097):
        gen.standard_normal(out=parts[start : start + 4097])
    np.testing.assert_array_equal(parts, whole)


@pytest.mark.parametrize("case", range(6))
def test_active_layout_walks_the_active_coordinates_in_order(case):
    rng = np.random.default_rng(case)
    n = [7, 40, 2_100_000, 2_100_000, 3_000_000, 1 << 21][case]
    mask = rng.random(n) < 0.7 if n < 100 else np.ones(n, dtype=bool)
    if n >= 100:  # runs of flat coordinates across the blocks the mask is read in
        for start in rng.integers(0, n, 4):
            mask[start : start + int(rng.integers(1, 1_500_000))] = False
        mask[(1 << 20) - 1 : (1 << 20) + 1] = case % 2 == 0
    active = np.flatnonzero(mask)
    for layout in (ActiveLayout(n, np.flatnonzero(~mask)),
                   ActiveLayout.from_mask(torch.from_numpy(mask))):
        assert layout.n_active == active.size
        for size in ([1, 3, 64] if n < 100 else [1 << 16]):
            walked = [np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel.numpy()
                      for _, _, sel in layout.blocks(size)]
            np.testing.assert_array_equal(np.concatenate(walked), active)


def _bound(measure, theta, mask, streamed):
    return measure.bind(MeasureContext(theta, mask, streamed=streamed))


@pytest.mark.parametrize("map_kind", ["identity", "diagonal", "eigen"])
@pytest.mark.parametrize("measure", [Gaussian(sigma=0.7, mean=0.1),
                                     Gaussian(sigma=np.linspace(0.5, 2, 23)),
                                     Uniform(bounds=1.5, mean=-0.2), Lebesgue()])
@pytest.mark.parametrize("block", [1, 4, 64])
def test_streamed_direction_is_the_drawn_direction(map_kind, measure, block):
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(23, generator=gen, dtype=torch.float64)
    mask = torch.ones(23, dtype=torch.bool)
    mask[[0, 5, 6, 7, 22]] = False  # flat coordinates: runs at both ends and inside
    n = int(mask.sum())
    curvature = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    if map_kind == "identity":
        P = Identity().bind(PreconditionerContext(None, None, mask))
    elif map_kind == "diagonal":
        P = DiagonalMap.from_curvature(curvature, 1e-3, 0.5)
    else:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        P = EigenMap(curvature, Q, 1e-3, 0.5)  # no apply_block: a dense row
    dense = _bound(measure, theta, mask, streamed=False)
    streamed = _bound(measure, theta, mask, streamed=True)
    assert streamed.log_normalizer == pytest.approx(dense.log_normalizer, rel=1e-13, abs=1e-12)
    for index in (0, 3, 41):
        U, log_w = draw_directions(n, [index], 9, P)
        u = torch.zeros(23, dtype=torch.float64)
        coef, log_weight = stream_direction(index, 9, u, layout=ActiveLayout.from_mask(mask),
                                            preconditioner=P, measure=streamed, block=block)
        np.testing.assert_allclose(u[mask].numpy(), U[0].numpy(), rtol=1e-13, atol=1e-15)
        assert (u[~mask] == 0).all()
        assert log_weight == pytest.approx(float(log_w[0]), rel=1e-12, abs=1e-12)
        expected = dense.ray_coefficients(U)
        assert coef.keys() == expected.keys()
        for key in coef:
            np.testing.assert_allclose(coef[key], expected[key], rtol=1e-12, atol=1e-14)


def test_streamed_measures_keep_scalar_spreads_as_numbers():
    theta = torch.randn(1000, dtype=torch.float32)
    mask = torch.ones(1000, dtype=torch.bool)
    gauss = _bound(Gaussian(sigma="auto"), theta, mask, streamed=True)
    assert isinstance(gauss.sigma, float) and isinstance(gauss.mean, float)
    assert gauss.sigma == pytest.approx(float(theta.double().pow(2).mean().sqrt()), rel=1e-14)
    box = _bound(Uniform(bounds=0.3), theta, mask, streamed=True)
    assert isinstance(box.half, float) and isinstance(box.mean, float)


# ------------------------------------------------------------------------- mode equivalence


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kw", [
    {},
    {"preconditioner": "diag_hessian", "preconditioner_eps": 1e-3},
    {"preconditioner": "hessian", "preconditioner_eps": 1e-3},
    {"measure": "uniform", "bounds": 3.0},
    {"measure": "lebesgue", "cost": "mse"},
    {"sigma": "init"},
    {"cost": lambda out, anchor: ((out - anchor) ** 2).mean()},  # nested-JVP Taylor guess
])
def test_large_mode_gives_the_vmapped_estimate_to_rounding(dtype, rtol, kw):
    net, X = small_mlp()
    net, X = net.to(dtype), X.to(dtype)
    vmapped, large = fit(net, X, "vmap", **kw), fit(net, X, "large", **kw)
    # the same directions: their importance weights agree to float64 rounding
    np.testing.assert_allclose(large.samples_["log_weight"], vmapped.samples_["log_weight"],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(large.sample_log_volumes_, vmapped.sample_log_volumes_, rtol=rtol)
    # a float32 cost's rounding (the two modes sum in different orders) moves a crossing by
    # up to a few 1e-5 of its radius, e.g. along the float32-mapped "hessian" directions
    np.testing.assert_allclose(large.radii_, vmapped.radii_,
                               rtol=rtol if dtype == torch.float64 else 5 * rtol)
    assert large.log_volume_ == pytest.approx(vmapped.log_volume_, rel=rtol)
    assert large.n_evaluations_ == vmapped.n_evaluations_
    assert large.n_pilot_evaluations_ == vmapped.n_pilot_evaluations_


def test_large_mode_on_a_masked_language_model_matches_vmap_and_finds_unused_rows_flat():
    torch.manual_seed(0)
    lm = TinyLM().double()
    ids = torch.randint(0, 7, (5, 6))  # token ids 7…10 never occur: their rows are flat
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[:2, 4:] = 0
    kw = {"n_samples": 8, "random_state": 0}
    vmapped = LocalVolumeEstimator(evaluation="vmap", **kw).fit(lm, ids, attention_mask=mask)
    large = LocalVolumeEstimator(evaluation="large", **kw).fit(lm, ids, attention_mask=mask)
    assert large.flat_parameters_ == vmapped.flat_parameters_
    assert {name.split("[")[0] for name in large.flat_parameters_} == {"embed.weight"}
    assert len(large.flat_parameters_) == 4 * 6
    np.testing.assert_allclose(large.sample_log_volumes_, vmapped.sample_log_volumes_,
                               rtol=1e-11)


def test_auto_chooses_the_large_mode_for_large_models_or_a_tight_budget(monkeypatch):
    import volsk._evaluate
    import volsk._evaluate_large as large

    net, X = small_mlp()
    assert type(large.make_evaluator(net, X, "cpu")).__name__ == "FunctionalModel"
    with monkeypatch.context() as patch:
        patch.setattr(large, "LARGE_MODEL_PARAMETERS", 10)
        assert isinstance(large.make_evaluator(net, X, "cpu"), LargeModel)
    with monkeypatch.context() as patch:  # two vmapped directions do not fit
        patch.setattr(volsk._evaluate, "memory_budget", lambda device: 1)
        assert isinstance(large.make_evaluator(net, X, "cpu"), LargeModel)
    mixed = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2).double())
    with monkeypatch.context() as patch:
        patch.setattr(large, "LARGE_MODEL_PARAMETERS", 10)
        assert type(large.make_evaluator(mixed, X, "cpu")).__name__ == "FunctionalModel"


def test_score_on_new_data_in_the_large_mode():
    net, X = small_mlp()
    net, X = net.double(), X.double()
    est = fit(net, X, "large", n_samples=6)
    assert est.score(X) == pytest.approx(est.log_volume_, rel=1e-12)
    assert est.score(X[:20]) == pytest.approx(fit(net, X[:20], "vmap", n_samples=6).log_volume_,
                                              rel=1e-11)


def test_partial_fit_may_change_the_evaluation_mode():
    net, X = small_mlp()
    net, X = net.double(), X.double()
    whole = fit(net, X, "vmap", n_samples=8)
    est = fit(net, X, "vmap", n_samples=4)
    est.set_params(evaluation="large").partial_fit(net, X, n_samples=4)
    np.testing.assert_allclose(est.sample_log_volumes_, whole.sample_log_volumes_, rtol=1e-11)


# ---------------------------------------------------------------------------- invariances


def test_large_mode_does_not_depend_on_batch_size_or_workers():
    net, X = small_mlp()
    ref = fit(net, X, "large", batch_size=1)
    for other in (fit(net, X, "large", batch_size=5),
                  fit(net, X, "large", n_jobs=2)):
        np.testing.assert_array_equal(other.sample_log_volumes_, ref.sample_log_volumes_)
    with parallel_config(backend="threading"):  # the threads share one evaluator's buffers
        threaded = fit(net, X, "large", n_jobs=3)
    np.testing.assert_array_equal(threaded.sample_log_volumes_, ref.sample_log_volumes_)


def test_large_mode_data_batches_give_the_full_batch_samples():
    torch.manual_seed(0)
    lm = TinyLM().double()
    ids = torch.randint(0, 11, (9, 6))
    mask = torch.ones(9, 6, dtype=torch.long)
    mask[:4, 3:] = 0
    kw = {"sigma": 0.5, "n_samples": 8, "random_state": 0, "rtol": 1e-6, "evaluation": "large"}
    full = LocalVolumeEstimator(**kw).fit(lm, ids, attention_mask=mask)
    batched = LocalVolumeEstimator(data_batch_size=4, **kw).fit(lm, ids, attention_mask=mask)
    np.testing.assert_allclose(batched.sample_log_volumes_, full.sample_log_volumes_,
                               rtol=0, atol=1e-6)


def test_large_mode_splits_x_by_the_bytes_of_its_outputs(monkeypatch):
    """Without a data_batch_size, X is split so one batch's outputs fit BATCH_OUTPUT_BYTES;
    the estimate is the one-batch estimate to rounding."""
    import volsk._evaluate_large as large

    torch.manual_seed(0)
    lm = TinyLM().double()
    ids = torch.randint(0, 11, (9, 6))
    mask = torch.ones(9, 6, dtype=torch.long)
    mask[:4, 3:] = 0
    per_example = 6 * 11 * 8  # tokens × vocabulary × float64
    assert len(LargeModel(lm, ids, "cpu").batches) == 1  # the default budget holds all of X
    kw = {"sigma": 0.5, "n_samples": 8, "random_state": 0, "rtol": 1e-6, "evaluation": "large"}
    whole = LocalVolumeEstimator(**kw).fit(lm, ids, attention_mask=mask)
    monkeypatch.setattr(large, "BATCH_OUTPUT_BYTES", 2 * per_example + 7)
    ev = LargeModel(lm, ids, "cpu", forward_kwargs={"attention_mask": mask})
    assert [b.n for b in ev.batches] == [2, 2, 2, 2, 1]
    assert torch.equal(ev.batches[1].kwargs["attention_mask"], mask[2:4])
    split = LocalVolumeEstimator(**kw).fit(lm, ids, attention_mask=mask)
    np.testing.assert_allclose(split.sample_log_volumes_, whole.sample_log_volumes_,
                               rtol=0, atol=1e-6)
    assert split.flat_parameters_ == whole.flat_parameters_
    monkeypatch.setattr(large, "BATCH_OUTPUT_BYTES", 1)  # one example per batch at least
    assert len(LargeModel(lm, ids, "cpu").batches) == 9
    # a given data_batch_size is kept as it is
    assert len(LargeModel(lm, ids, "cpu", data_batch_size=4).batches) == 3


def test_flat_coordinates_found_a_chunk_at_a_time_are_the_same(monkeypatch):
    import volsk._problem as problem

    torch.manual_seed(0)
    lm = TinyLM(vocab=40).double()
    ids = torch.randint(0, 25, (5, 6))  # rows of tokens that never occur are flat
    kw = {"n_samples": 2, "random_state": 0, "evaluation": "large"}
    whole = LocalVolumeEstimator(**kw).fit(lm, ids)
    monkeypatch.setattr(problem, "FLAT_CHUNK", 7)  # chunks cut runs and tensors anywhere
    chunked = LocalVolumeEstimator(**kw).fit(lm, ids)
    assert chunked.flat_parameters_ == whole.flat_parameters_
    assert len(whole.flat_parameters_) == (40 - len(torch.unique(ids))) * 6
    np.testing.assert_array_equal(chunked.sample_log_volumes_, whole.sample_log_volumes_)
    rng = np.random.default_rng(0)
    for n in (1, 6, 7, 8, 30):
        for _ in range(50):
            flat = rng.random(n) < rng.random()
            starts, stops = problem.mask_runs(torch.from_numpy(flat))
            back = np.zeros(n, dtype=bool)
            for a, b in zip(starts, stops):
                back[a:b] = True
            np.testing.assert_array_equal(back, flat)
            assert (starts < stops).all() and (stops[:-1] < starts[1:]).all()
            zeros = problem._zero_columns(torch.from_numpy((~flat).astype(np.uint8)))
            np.testing.assert_array_equal(zeros.numpy(), np.flatnonzero(flat))


def test_large_mode_frees_a_large_perturbed_copy_while_jvps_run(monkeypatch):
    import volsk._evaluate_large as large

    net, X = small_mlp()
    kw = {"n_samples": 6, "random_state": 0, "rtol": 1e-6}
    kept = fit(net, X, "large", **kw)
    ev = LargeModel(net, X, "cpu")
    ev.costs(lambda out: out.sum(), ev.theta[None] + 0)  # no buffer yet: a row is passed
    ev.ray_costs(lambda out: out.sum(), torch.ones(1, ev.space.n))([0], [0.1])
    assert ev._perturbed is not None
    ev.ray_curvature(lambda out: out, lambda t: (t * t).sum(), torch.ones(1, ev.space.n))
    assert ev._perturbed is not None  # small: kept (freeing it would fragment the heap)
    monkeypatch.setattr(large, "RELEASE_BYTES", 0)
    ev.ray_curvature(lambda out: out, lambda t: (t * t).sum(), torch.ones(1, ev.space.n))
    assert ev._perturbed is None
    assert ev.ray_costs(lambda out: out.sum(), torch.ones(1, ev.space.n))([0], [0.1]).shape == (1,)
    freed = fit(net, X, "large", **kw)
    np.testing.assert_array_equal(freed.sample_log_volumes_, kept.sample_log_volumes_)
    assert freed.n_evaluations_ == kept.n_evaluations_


def test_trim_hands_back_free_heap_pages_where_glibc_is_there():
    from volsk._memory import _TRIM, trim

    if _TRIM is None:
        pytest.skip("malloc_trim is glibc's")

    def resident():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [bytearray(64 << 10) for _ in range(2048)]  # 128 MiB of heap blocks
    pin = bytearray(64 << 10)  # above them: the heap's top cannot simply shrink
    del blocks
    before = resident()
    assert trim()
    assert before - resident() > 64 << 20
    del pin


def test_large_evaluator_pickles_theta_once_and_keeps_parameters_as_its_views():
    net = torch.nn.Sequential(*[torch.nn.Linear(40, 40) for _ in range(6)])
    ev = LargeModel(net, torch.randn(3, 40), "cpu")
    raw = pickle.dumps(ev)
    assert len(raw) < 2 * ev.theta.numel() * 4  # one θ, not one per parameter view
    back = pickle.loads(raw)
    torch.testing.assert_close(back.theta, ev.theta, rtol=0, atol=0)
    assert back.module[3].bias.data_ptr() == back.theta[3 * 1640 + 1600 :].data_ptr()
    assert back.costs(lambda out: out.sum(), back.theta[None]).item() == pytest.approx(
        ev.costs(lambda out: out.sum(), ev.theta[None]).item())
    assert not back.fixed


def test_large_mode_leaves_the_user_model_untouched():
    net, X = small_mlp()
    net.train()
    before = snapshot(net)
    fit(net, X, "large", preconditioner="diag_hessian", preconditioner_eps=1e-3)
    assert_same(before, snapshot(net))


def test_large_mode_refuses_parameters_of_several_dtypes():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match="one floating dtype"):
        LargeModel(net, torch.randn(5, 3), "cpu")


def test_large_mode_in_half_precision_stays_close_to_float32():
    net, X = small_mlp()
    half = net.to(torch.bfloat16)
    single = small_mlp()[0]
    single.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # same weights
    a = fit(single, X, "large", rtol=1e-4)
    b = fit(half, X.to(torch.bfloat16), "large", rtol=1e-4)
    vm = fit(half, X.to(torch.bfloat16), "vmap", rtol=1e-4)
    np.testing.assert_allclose(b.samples_["log_weight"], a.samples_["log_weight"], atol=1e-12)
    assert abs(b.log_volume_ - vm.log_volume_) < 1e-3 * abs(vm.log_volume_)
    assert abs(b.log_volume_ - a.log_volume_) < 0.05 * abs(a.log_volume_)


# --------------------------------------------------------------------------------- memory


def test_large_mode_draws_no_direction_matrix():
    """numpy's allocations (tracemalloc sees them) stay at one block, whatever k is."""
    net = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.Tanh(),
                              torch.nn.Linear(1024, 1024), torch.nn.Tanh(),
                              torch.nn.Linear(1024, 4))
    X = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    n = sum(p.numel() for p in net.parameters())
    fit(net, X, "large", n_samples=1, rtol=1e-2, sigma=0.05)  # lazy imports happen here
    peaks = []
    for k in (2, 10):
        tracemalloc.start()
        fit(net, X, "large", n_samples=k, rtol=1e-2, sigma=0.05)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert max(peaks) < n  # one float64 row would be 8 n bytes
    assert peaks[1] < peaks[0] + n // 8


CHILD = textwrap.dedent("""
    import resource, sys, warnings
    import torch
    torch.set_num_threads(1)
    from volsk import LocalVolumeEstimator
    warnings.simplefilter("ignore")
    # a first fit imports what fits import lazily (pandas, scipy.special…): not the fit's memory
    LocalVolumeEstimator(sigma=1.0, n_samples=1, evaluation=sys.argv[2]).fit(
        torch.nn.Linear(2, 2), torch.ones(3, 2))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.Tanh(),
                              torch.nn.Linear(2048, 2048), torch.nn.Tanh(),
                              torch.nn.Linear(2048, 8))
    X = torch.randn(32, 64)
    with torch.no_grad():
        net(X)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    LocalVolumeEstimator(sigma=0.05, n_samples=int(sys.argv[1]), rtol=1e-2,
                         evaluation=sys.argv[2], random_state=0).fit(net, X)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024, sum(p.numel() * 4 for p in net.parameters()))
""")


def _extra_peak(k, evaluation):
    done = subprocess.run([sys.executable, "-c", CHILD, str(k), evaluation],
                          capture_output=True, text=True, timeout=600, check=True)
    extra, model_bytes = map(int, done.stdout.split())
    return extra, model_bytes


@pytest.mark.skipif(sys.platform == "win32", reason="resource.getrusage is Unix-only")
def test_large_mode_peak_memory_is_a_few_model_copies_whatever_k():
    few, model_bytes = _extra_peak(2, "large")
    many, _ = _extra_peak(24, "large")
    assert many < few + model_bytes / 2  # no growth with k
    # θ (the private copy), one perturbed copy, one direction, the mask; the flat probe's
    # gradients (a float64 θ alone would be 2 model copies, the vmapped mode takes ~40)
    assert many < 6 * model_bytes


# ---------------------------------------------------------------------- the GPU benchmark


def test_gpu_benchmark_script_runs_tiny_on_the_cpu(tmp_path):
    pytest.importorskip("transformers")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "lm_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "lm_gpu.md").read_text()
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (
        ["bfloat16"], ["float32"])]
    assert [row[0] for row in rows] == ["bfloat16", "float32"]
    for row in rows:
        s_per_direction, evaluations = float(row[3]), float(row[4])
        assert s_per_direction > 0 and 1 <= evaluations <= 20
        assert np.isfinite(float(row[-1]))  # the log-volume
