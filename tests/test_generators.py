"""Direction generators: "host" (NumPy's PCG64, today's numbers) and "device" (torch's generator
on the fit's device, re-seeded per fixed chunk): their definitions, their invariances, ground
truth with the "device" normals, and the statistics of those normals across chunk boundaries."""

import json
import math

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.base import clone

from models import log_ellipsoid_volume, quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk._layout import ActiveLayout
from volsk._sampling import (
    DEVICE_CHUNK,
    NormalStream,
    draw_directions,
    resolve_generator,
    stream_direction,
)
from volsk._seeding import DEVICE_STREAM, device_chunk_seeds
from volsk.measures import Gaussian, MeasureContext
from volsk.preconditioners import BoundaryFitted, DiagonalMap, Identity, PreconditionerContext
from volsk.sweeps import fit_sharded, sweep
from volsk.sweeps.cache import estimator_params

pytestmark = pytest.mark.filterwarnings("ignore::volsk.results.LowEffectiveSampleSizeWarning")


def device_normals(seed, index, n, device="cpu"):
    """Direction ``index``'s normals under "device", re-derived from the documented definition."""
    n_chunks = -(-n // DEVICE_CHUNK)
    words = np.random.SeedSequence([seed, index, DEVICE_STREAM]).generate_state(n_chunks,
                                                                               np.uint64)
    g = torch.Generator(device=device)
    chunks = []
    for word in words:
        g.manual_seed(int(word))
        chunks.append(torch.randn(DEVICE_CHUNK, generator=g, dtype=torch.float64,
                                  device=device))
    return torch.cat(chunks)[:n]


def identity(n):
    return Identity().bind(PreconditionerContext(None, None, torch.ones(n, dtype=torch.bool)))


def assert_same_samples(one, other):
    pd.testing.assert_frame_equal(one.samples_, other.samples_, check_exact=True)
    assert one.log_volume_ == other.log_volume_


# ---------------------------------------------------------------------------- definitions


def test_host_is_the_default_on_the_cpu_and_draws_todays_pcg64_directions():
    n, seed, cutoff = 6, 4, 0.02
    lam = np.linspace(1.0, 4.0, n)
    model, X = quadratic_problem(lam)
    est = LocalVolumeEstimator(cutoff, "lebesgue", cost="mse", n_samples=5, rtol=1e-8,
                               random_state=seed).fit(model, X)
    assert est.generator == "auto" and est.generator_ == "host"
    # direction i is g/|g| with g = default_rng([seed, i]).standard_normal(n): its radius on
    # the ellipsoid Σ λ δ² = ε is sqrt(ε / Σ λ u²)
    for i, radius in enumerate(est.radii_):
        g = np.random.default_rng([seed, i]).standard_normal(n)
        u = g / np.linalg.norm(g)
        assert radius == pytest.approx(math.sqrt(cutoff / np.sum(lam * u**2)), rel=1e-7)
        normals = NormalStream(seed, i, n, "host").next(n)
        np.testing.assert_array_equal(normals.numpy(), g)
    host = clone(est).set_params(generator="host").fit(model, X)
    assert host.generator_ == "host"
    assert_same_samples(est, host)
    U, _ = draw_directions(n, [0, 3], seed, identity(n))  # the default: "host"
    g = np.random.default_rng([seed, 3]).standard_normal(n)
    np.testing.assert_allclose(U[1].numpy(), g / np.linalg.norm(g), rtol=1e-15, atol=0)


@pytest.mark.parametrize("n", [5, DEVICE_CHUNK, 2 * DEVICE_CHUNK + 123])
def test_device_normals_are_seeded_chunks_of_torch_randn(n):
    normals = NormalStream(7, 11, n, "device").next(n, "cpu")
    assert torch.equal(normals, device_normals(7, 11, n))
    U, log_w = draw_directions(n, [11, 12], 7, identity(n), generator="device")
    assert U.dtype == torch.float64 and log_w.tolist() == [0.0, 0.0]
    torch.testing.assert_close(torch.linalg.vector_norm(U, dim=1),
                               torch.ones(2, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(U[0], normals / torch.linalg.vector_norm(normals), rtol=1e-14,
                               atol=0)
    # not the host generator's numbers
    assert not torch.equal(normals, NormalStream(7, 11, n, "host").next(n))


def test_chunk_seeds_do_not_depend_on_how_many_are_asked_for():
    many = device_chunk_seeds(3, 9, 1000)
    for count in (1, 2, 17, 999):
        np.testing.assert_array_equal(device_chunk_seeds(3, 9, count), many[:count])
    assert many.dtype == np.uint64 and np.unique(many).size == many.size
    # a direction of n normals: its first chunks are those of a shorter one
    n = 3 * DEVICE_CHUNK
    assert torch.equal(NormalStream(3, 9, n, "device").next(DEVICE_CHUNK + 5),
                       NormalStream(3, 9, DEVICE_CHUNK + 5, "device").next(DEVICE_CHUNK + 5))


@pytest.mark.parametrize("generator", ["host", "device"])
def test_normals_do_not_depend_on_how_many_are_read_at_a_time(generator):
    n = DEVICE_CHUNK + 777
    whole = NormalStream(3, 2, n, generator).next(n).clone()
    for sizes in ([1, 6, 32761, 9, n - 32777], [32769, n - 32769], [7, 7, 7, n - 21]):
        stream = NormalStream(3, 2, n, generator)
        parts = torch.cat([stream.next(m).clone() for m in sizes])  # host: a reused buffer
        assert torch.equal(parts, whole)
    with pytest.raises(ValueError, match="after"):
        stream.next(1)  # past the direction's end
    out = torch.empty(n, dtype=torch.float64)
    assert torch.equal(NormalStream(3, 2, n, generator).next(n, out=out), whole)


@pytest.mark.parametrize("generator", ["host", "device"])
@pytest.mark.parametrize("map_kind", ["identity", "diagonal"])
def test_streamed_direction_is_the_drawn_direction_whatever_the_block(generator, map_kind):
    n = DEVICE_CHUNK + 1001
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool)
    if map_kind == "identity":
        P = identity(n)
    else:
        P = DiagonalMap.from_curvature(torch.rand(n, generator=gen, dtype=torch.float64) + 0.1,
                                       1e-3, 0.5)
    measure = Gaussian(sigma=0.7).bind(MeasureContext(theta, mask, streamed=True))
    U, log_w = draw_directions(n, [5], 8, P, generator=generator)
    previous = None
    for block in (1 << 16, 4099, 32767, 32769):
        u = torch.zeros(n, dtype=torch.float64)
        coef, log_weight = stream_direction(5, 8, u, layout=ActiveLayout(n), preconditioner=P,
                                            measure=measure, block=block, generator=generator)
        # float64 sums over other partitions: equal to rounding
        np.testing.assert_allclose(u.numpy(), U[0].numpy(), rtol=1e-13, atol=1e-16)
        assert log_weight == pytest.approx(float(log_w[0]), rel=1e-12, abs=1e-12)
        if previous is not None:
            for key in coef:
                np.testing.assert_allclose(coef[key], previous[key], rtol=1e-12)
        previous = coef
    again = torch.zeros(n, dtype=torch.float64)
    stream_direction(5, 8, again, layout=ActiveLayout(n), preconditioner=P, measure=measure,
                     block=32769, generator=generator)
    assert torch.equal(again, u)  # one block size: bit for bit


def test_a_bad_generator_is_refused_by_name():
    net, X = small_mlp()
    for bad in ("gpu", "cuda", None, 1):
        with pytest.raises(ValueError, match="generator"):
            LocalVolumeEstimator(sigma=0.5, n_samples=2, generator=bad).fit(net, X)
    with pytest.raises(ValueError, match="generator must be one of"):
        resolve_generator("philox", "cpu")
    with pytest.raises(ValueError, match="generator"):
        NormalStream(0, 0, 3, "auto")  # resolve first
    assert resolve_generator("auto", "cpu") == "host"
    assert resolve_generator("auto", torch.device("cuda", 0)) == "device"
    assert resolve_generator("host", "cuda") == "host"


# ------------------------------------------------------------------ "device" fits: invariances


DEVICE_FIT = dict(sigma=0.5, n_samples=12, random_state=3, generator="device")


@pytest.fixture(scope="module")
def device_fit():
    net, X = small_mlp()
    return net, X, LocalVolumeEstimator(**DEVICE_FIT).fit(net, X)


def test_device_fit_records_its_generator_and_draws_other_directions(device_fit):
    net, X, est = device_fit
    assert est.generator_ == "device"
    host = LocalVolumeEstimator(**{**DEVICE_FIT, "generator": "host"}).fit(net, X)
    assert not np.array_equal(host.radii_, est.radii_)


@pytest.mark.parametrize("evaluation", ["vmap", "large"])
def test_device_fit_does_not_depend_on_batch_size(device_fit, evaluation):
    net, X, _ = device_fit
    one = LocalVolumeEstimator(**DEVICE_FIT, evaluation=evaluation, batch_size=1).fit(net, X)
    seven = LocalVolumeEstimator(**DEVICE_FIT, evaluation=evaluation, batch_size=7).fit(net, X)
    assert_same_samples(one, seven)


def test_device_fit_does_not_depend_on_process_workers(device_fit):
    net, X, est = device_fit
    with joblib.parallel_config(backend="loky"):
        two = LocalVolumeEstimator(**DEVICE_FIT, n_jobs=2).fit(net, X)
    assert_same_samples(est, two)


def test_device_fit_extends_by_partial_fit_sample_for_sample(device_fit):
    net, X, est = device_fit
    half = LocalVolumeEstimator(**{**DEVICE_FIT, "n_samples": 6}).fit(net, X)
    half.partial_fit(net, X, n_samples=6)
    assert_same_samples(est, half)
    # another generator is another question
    with pytest.raises(ValueError, match="generator"):
        half.set_params(generator="host").partial_fit(net, X, n_samples=2)


def test_device_fit_sharded_equals_one_process(device_fit):
    net, X, est = device_fit
    sharded = fit_sharded(LocalVolumeEstimator(**DEVICE_FIT), net, X, shard_size=5)
    assert sharded.generator_ == "device"
    assert_same_samples(est, sharded)


def test_large_mode_gives_the_vmapped_device_estimate_to_rounding():
    # float64 model of more than one chunk: the modes reduce the same normals over other
    # partitions (whole rows vs blocks)
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(40, 900), torch.nn.Tanh(),
                              torch.nn.Linear(900, 3)).double()
    X = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    n = sum(p.numel() for p in net.parameters())
    assert n > DEVICE_CHUNK
    params = dict(sigma=0.3, n_samples=6, random_state=1, generator="device",
                  preconditioner="diag_hessian", preconditioner_eps=1e-3)
    vmapped = LocalVolumeEstimator(evaluation="vmap", **params).fit(net, X)
    large = LocalVolumeEstimator(evaluation="large", **params).fit(net, X)
    np.testing.assert_allclose(large.samples_["log_weight"], vmapped.samples_["log_weight"],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(large.radii_, vmapped.radii_, rtol=1e-6)
    assert large.log_volume_ == pytest.approx(vmapped.log_volume_, rel=1e-6)


def test_boundary_fit_redraws_the_device_directions_of_its_pilots():
    # exact after the fit only when the fit measured the pilots' own directions
    from test_boundary import grouped_ellipsoid

    model, X, lam = grouped_ellipsoid([10, 20, 30], [1.0, 30.0, 1000.0])
    cutoff = 0.02
    est = LocalVolumeEstimator(cutoff, "lebesgue", BoundaryFitted(base="naive", groups="tensor"),
                               20, cost="mse", rtol=1e-6, random_state=0,
                               generator="device").fit(model, X)
    assert abs(est.log_volume_ - log_ellipsoid_volume(lam, cutoff)) < 1e-3
    assert np.ptp(est.sample_log_volumes_) < 1e-3


# -------------------------------------------------------------------------- sharding and keys


def test_cache_keys_name_the_generator_only_when_it_is_device():
    host = LocalVolumeEstimator(sigma=0.5)
    params = estimator_params(host)
    assert "generator" not in params  # a "host" fit's key is what it was before the option
    assert estimator_params(clone(host).set_params(generator="host")) == params
    device = estimator_params(clone(host).set_params(generator="device"))
    assert device == {**params, "generator": "device"}


def test_sweep_rows_draw_with_the_generator_they_name(device_fit):
    net, X, est = device_fit
    base = LocalVolumeEstimator(**{**DEVICE_FIT, "generator": "auto"})
    frame = sweep({"net": net}, X, {"generator": ["auto", "device"]}, estimator=base,
                  random_state=3)
    host = LocalVolumeEstimator(**{**DEVICE_FIT, "generator": "host"}).fit(net, X)
    assert frame["log_volume"].tolist() == [host.log_volume_, est.log_volume_]


def test_device_shards_on_another_kind_of_device_are_refused(tmp_path):
    net, X = small_mlp()
    est = LocalVolumeEstimator(**{**DEVICE_FIT, "n_samples": 8})
    one = fit_sharded(clone(est), net, X, shard_size=4, cache_dir=tmp_path)
    pilot_path, = [p for p in tmp_path.glob("*.json") if p.stem.count("-") == 0]
    record = json.loads(pilot_path.read_text())
    record["device"] = "cuda"  # as if the pilot had run on a GPU
    pilot_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match='generator="device".*cpu.*cuda'):
        fit_sharded(clone(est), net, X, shard_size=4, cache_dir=tmp_path)  # shards cached
    for path in tmp_path.glob("*-*-*.json"):
        path.unlink()
    with pytest.raises(ValueError, match='generator="device".*cpu.*cuda'):
        fit_sharded(clone(est), net, X, shard_size=4, cache_dir=tmp_path)  # run by a worker
    # "host" directions are the same everywhere: such shards are a warning at most
    assert one.generator_ == "device"


# ----------------------------------------------------------------------- statistical truth


def test_device_gaussian_ball_matches_noncentral_chi2():
    n, cutoff, k = 10, 2.0, 1000
    sigma, anchor = 0.5, np.full(n, 0.3)
    model, X = quadratic_problem(np.full(n, 1.0 / sigma**2), anchor=anchor)
    est = LocalVolumeEstimator(cutoff, "gaussian", cost="mse", sigma=sigma, n_samples=k,
                               rtol=1e-6, random_state=0, generator="device").fit(model, X)
    truth = stats.ncx2.logcdf(cutoff, df=n, nc=float(np.sum((anchor / sigma) ** 2)))
    w = np.exp(est.sample_log_volumes_ - est.sample_log_volumes_.max())
    se = float(np.std(w, ddof=1) / np.mean(w) / math.sqrt(k))
    assert se < 0.05, "the check would be too loose to fail"
    assert abs(est.log_volume_ - truth) < 4 * se + 1e-4


def test_device_normals_are_independent_standard_normals_across_chunks():
    n = 4 * DEVICE_CHUNK
    x = NormalStream(0, 0, n, "device").next(n).numpy()
    # moments of 131 072 draws, each within ~5 standard errors
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-4
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 5 / math.sqrt(n)  # lag 1, boundaries too
    chunks = x.reshape(4, DEVICE_CHUNK)
    for a in range(4):  # chunk against chunk, position by position: distinct seeds
        for b in range(a + 1, 4):
            assert abs(np.corrcoef(chunks[a], chunks[b])[0, 1]) < 5 / math.sqrt(DEVICE_CHUNK)
    # across directions: the last normal of chunk 0 and the first of chunk 1, over many draws
    m = 300
    pairs = np.array([NormalStream(1, i, DEVICE_CHUNK + 1, "device").next(
        DEVICE_CHUNK + 1).numpy()[-2:] for i in range(m)])
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 4 / math.sqrt(m)
    assert abs(pairs.mean()) < 4 / math.sqrt(2 * m)
    assert abs(pairs.var() - 1) < 4 * math.sqrt(2 / (2 * m))
    first = np.array([NormalStream(1, i, 1, "device").next(1).item() for i in range(m)])
    assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < 4 / math.sqrt(m)  # across i


# ----------------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_generator_on_the_gpu_is_the_definition_and_batch_invariant():
    n = DEVICE_CHUNK + 99
    normals = NormalStream(2, 5, n, "device").next(n, "cuda")
    assert normals.device.type == "cuda"
    assert torch.equal(normals, device_normals(2, 5, n, device="cuda"))
    net, X = small_mlp()
    base = dict(sigma=0.5, n_samples=10, random_state=3, device="cuda")
    auto = LocalVolumeEstimator(**base, batch_size=1).fit(net, X)
    assert auto.generator_ == "device"
    assert_same_samples(auto, LocalVolumeEstimator(**base, batch_size=7).fit(net, X))
    large = LocalVolumeEstimator(**base, evaluation="large").fit(net, X)
    np.testing.assert_allclose(large.samples_["log_weight"], auto.samples_["log_weight"],
                               rtol=1e-12, atol=1e-12)
    host = LocalVolumeEstimator(**base, generator="host").fit(net, X)
    cpu_host = LocalVolumeEstimator(**{**base, "device": "cpu"}).fit(net, X)
    np.testing.assert_allclose(host.samples_["log_weight"], cpu_host.samples_["log_weight"],
                               rtol=1e-12, atol=1e-12)  # "host": the same directions
