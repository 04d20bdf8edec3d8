"""volsk.sweeps.fit_sharded: one estimate in shards on workers, the same numbers as one process."""

import json
import os
import pickle
import random

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from models import rotated_quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk.preconditioners import BoundaryFitted
from volsk.sweeps import Checkpoint, fit_sharded, sweep
from volsk.sweeps import cluster as cluster_module
from volsk.sweeps import shards as shards_module
from volsk.sweeps import sources as sources_module

FITTED = ["log_volume_", "log10_volume_", "bits_", "n_parameters_", "n_evaluations_",
          "n_pilot_evaluations_", "effective_sample_size_", "flat_parameters_", "seed_",
          "preconditioner_eps_", "preconditioner_exponent_"]


def assert_same_fit(one, other):
    """Every fitted attribute of ``other`` equals ``one``'s, bit for bit."""
    for name in FITTED:
        assert getattr(one, name) == getattr(other, name), name
    np.testing.assert_array_equal(one.sample_log_volumes_, other.sample_log_volumes_)
    np.testing.assert_array_equal(one.radii_, other.radii_)
    pd.testing.assert_frame_equal(one.samples_, other.samples_, check_exact=True)
    for table in ("eps_pilot_", "boundary_pilot_"):
        if getattr(one, table) is None:
            assert getattr(other, table) is None, table
        else:
            pd.testing.assert_frame_equal(getattr(one, table), getattr(other, table),
                                          check_exact=True)


def net_factory():
    """The model every Checkpoint here is loaded into (importable by worker processes)."""
    return small_mlp()[0]


def fresh(est, **params):
    return clone(est).set_params(**params)


SETTINGS = {
    "naive": dict(sigma=0.5),
    "auto eps": dict(sigma=0.5, preconditioner="diag_hessian", preconditioner_eps="auto"),
}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    net, X = small_mlp()
    path = tmp_path_factory.mktemp("checkpoints") / "net.pt"
    torch.save(net.state_dict(), path)
    return net, X, Checkpoint(path, net_factory)


@pytest.fixture(scope="module")
def reference(problem):
    """One process's fits, k = 24 and k = 40, for each setting."""
    net, X, _ckpt = problem
    out = {}
    for name, params in SETTINGS.items():
        est = LocalVolumeEstimator(n_samples=24, random_state=3, **params)
        out[name] = {k: fresh(est, n_samples=k).fit(net, X) for k in (24, 40)}
    return out


# --------------------------------------------------------------------- the same numbers


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("shard_size", [1, 5, 64])
def test_sharded_fit_equals_one_process_fit_bit_for_bit(problem, reference, setting,
                                                        shard_size):
    net, X, ckpt = problem
    one = reference[setting][24]
    for source in (net, ckpt):
        sharded = fit_sharded(fresh(one), source, X, shard_size=shard_size)
        assert_same_fit(one, sharded)


def test_merge_does_not_depend_on_the_order_shards_finish(problem, reference, monkeypatch):
    net, X, _ckpt = problem
    one = reference["auto eps"][24]
    many = cluster_module._Joblib.many

    def shuffled(self, fn, argument_lists):
        results = list(many(self, fn, argument_lists))
        random.Random(len(results)).shuffle(results)
        assert [r[0].first for r in results] != sorted(r[0].first for r in results)
        yield from results

    monkeypatch.setattr(cluster_module._Joblib, "many", shuffled)
    assert_same_fit(one, fit_sharded(fresh(one), net, X, shard_size=3))
    with joblib.parallel_config(backend="threading", n_jobs=2):
        assert_same_fit(one, fit_sharded(fresh(one), net, X, shard_size=4))


def test_partial_extends_like_partial_fit(problem, reference):
    net, X, ckpt = problem
    long = reference["auto eps"][40]
    est = fit_sharded(fresh(long, n_samples=24), ckpt, X, shard_size=10)
    assert fit_sharded(est, ckpt, X, n_samples=16, partial=True, shard_size=10) is est
    assert_same_fit(long, est)
    # a local fit extended on workers, and a sharded fit extended locally
    local = fresh(long, n_samples=24).fit(net, X)
    assert_same_fit(long, fit_sharded(local, net, X, n_samples=16, partial=True))
    sharded = fit_sharded(fresh(long, n_samples=24), net, X, shard_size=8)
    assert_same_fit(long, sharded.partial_fit(net, X, n_samples=16))
    # partial on an unfitted estimator is a fit
    assert_same_fit(reference["auto eps"][24],
                    fit_sharded(fresh(long, n_samples=24), net, X, partial=True))


def test_partial_refuses_another_question(problem, reference):
    net, X, _ckpt = problem
    est = fit_sharded(fresh(reference["naive"][24]), net, X, shard_size=8)
    before = est.sample_log_volumes_.copy()
    with pytest.raises(ValueError, match="X or y"):
        fit_sharded(est, net, X + 1, n_samples=8, partial=True)
    est.set_params(cutoff=2e-2)
    with pytest.raises(ValueError, match="cutoff"):
        fit_sharded(est, net, X, n_samples=8, partial=True)
    np.testing.assert_array_equal(est.sample_log_volumes_, before)  # unchanged


def test_bad_arguments_are_named(problem):
    net, X, _ckpt = problem
    est = LocalVolumeEstimator(sigma=0.5, n_samples=4)
    with pytest.raises(TypeError, match="LocalVolumeEstimator"):
        fit_sharded(object(), net, X)
    with pytest.raises(TypeError, match="Checkpoint"):
        fit_sharded(est, "model.pt", X)
    with pytest.raises(ValueError, match="shard_size"):
        fit_sharded(est, net, X, shard_size=0)
    with pytest.raises(ValueError, match="n_samples"):
        fit_sharded(est, net, X, n_samples=0)
    with pytest.raises(TypeError, match="client"):
        fit_sharded(est, net, X, client="tcp://scheduler:8786")
    with pytest.raises(ValueError, match="cutoff"):
        fit_sharded(LocalVolumeEstimator(cutoff=-1.0), net, X)


# ------------------------------------------------------- maps chosen by pilots: exponent, boundary


# these small problems rest on a few directions (ESS ≈ 1); the warning is tested elsewhere
CHOSEN_MAPS_WARN = pytest.mark.filterwarnings(
    "ignore::volsk.results.LowEffectiveSampleSizeWarning")


def axis_ellipsoid():
    """mse = Σ λ_i δ_i², λ over six decades: with the diagonal λ² only exponent 0.25 is exact."""
    lam = np.logspace(0, 6, 16)
    model, X = rotated_quadratic_problem(np.diag(lam))
    return model, X, lam


@pytest.fixture(scope="module")
def chosen_maps():
    """Settings whose pilots choose a map other than the parameters' default, and their fits
    in one process: an exponent of 0.25 (not the default 0.5), a boundary correction fitted
    in a later round (not its base)."""
    model, X, lam = axis_ellipsoid()
    exponent = LocalVolumeEstimator(0.01, "lebesgue", preconditioner=lam**2, cost="mse",
                                    preconditioner_eps="auto", preconditioner_exponent="auto",
                                    n_samples=12, random_state=0)
    at_eps = clone(exponent).set_params(preconditioner_eps=0.0)  # exponents compared at 0
    net, X_net = small_mlp()
    boundary = LocalVolumeEstimator(
        sigma=0.5, n_samples=12, random_state=0, preconditioner_eps=1e-3,
        preconditioner=BoundaryFitted(base="diag_hessian", rounds=2, pilot_directions=16))
    both = clone(exponent).set_params(preconditioner=BoundaryFitted(
        base=lam**2, groups="column", rounds=2, pilot_directions=16))  # one group a weight
    out = {}
    for name, est, source, data in (("exponent", exponent, model, X),
                                    ("exponent at eps", at_eps, model, X),
                                    ("boundary", boundary, net, X_net),
                                    ("boundary, auto eps and exponent", both, model, X)):
        out[name] = (est, source, data, clone(est).fit(source, data))
    return out


@CHOSEN_MAPS_WARN
def test_the_chosen_maps_are_not_the_defaults(chosen_maps):
    """What makes the tests below telling: a shard that bound the parameters' map (exponent
    0.5, the boundary fit's base) would give other directions than the fit."""
    for name in ("exponent", "exponent at eps", "boundary, auto eps and exponent"):
        assert chosen_maps[name][3].preconditioner_exponent_ == 0.25
    for name in ("boundary", "boundary, auto eps and exponent"):
        table = chosen_maps[name][3].boundary_pilot_
        assert table["selected"].tolist() == [False, False, True]


@CHOSEN_MAPS_WARN
@pytest.mark.parametrize("name", ["exponent", "exponent at eps", "boundary",
                                  "boundary, auto eps and exponent"])
@pytest.mark.parametrize("kept", [True, False])
def test_sharded_fit_binds_the_map_the_pilot_chose(chosen_maps, name, kept, monkeypatch):
    """fit_sharded with preconditioner_exponent="auto" or a BoundaryFitted preconditioner is
    the fit, bit for bit: the pilot chooses once and every shard binds its choice."""
    est, source, data, one = chosen_maps[name]
    if not kept:  # every shard prepares its own problem and binds the pilot's choice to it
        monkeypatch.setattr(shards_module, "_keep", lambda *args: None)
        fits = pipeline_calls(monkeypatch)
    sharded = fit_sharded(clone(est), source, data, shard_size=5)
    assert_same_fit(one, sharded)
    if not kept:  # the pilots ran once, in the pilot task; the shards' problem was prepared
        assert fits == {"choose_map": 1, "bind_map": 1}  # and bound once, for all three


def pipeline_calls(monkeypatch):
    """Count the calls of the map's stages (choose: the pilots; bind: a shard's binding)."""
    pipeline = shards_module.pipeline
    calls = {"choose_map": 0, "bind_map": 0}

    def counted(stage, fn):
        def call(*args, **kwargs):
            calls[stage] += 1
            return fn(*args, **kwargs)

        return call

    for stage in calls:
        monkeypatch.setattr(pipeline, stage, counted(stage, getattr(pipeline, stage)))
    return calls


@CHOSEN_MAPS_WARN
def test_chosen_maps_are_cached_and_extended_like_partial_fit(chosen_maps, tmp_path, capsys):
    for name in ("exponent", "boundary, auto eps and exponent"):
        est, source, data, one = chosen_maps[name]
        cache = tmp_path / name.replace(" ", "_").replace(",", "")
        assert_same_fit(one, fit_sharded(clone(est), source, data, shard_size=5,
                                         cache_dir=cache))
        pilot = (set(cache.glob("*.json")) - set(shard_files(cache))).pop()
        record = json.loads(pilot.read_text())
        assert record["bind_exponent"] == one.preconditioner_exponent_
        assert (record["boundary"] is None) == (name == "exponent")
        for entry, damaged in (("bind_exponent", "0.25"), ("boundary", ["x"])):
            pilot.write_text(json.dumps({**record, entry: damaged}))
            capsys.readouterr()
            assert_same_fit(one, fit_sharded(clone(est), source, data, shard_size=5,
                                             cache_dir=cache, verbose=1))
            assert f"no valid {entry!r} entry; recomputing" in capsys.readouterr().err
        # the choice read back from the cache binds the new shards (fresh problems)
        longer = clone(est).set_params(n_samples=20).fit(source, data)
        assert_same_fit(longer, fit_sharded(clone(est).set_params(n_samples=20), source, data,
                                            shard_size=5, cache_dir=cache))
        extended = fit_sharded(clone(est), source, data, shard_size=5)
        assert_same_fit(longer, fit_sharded(extended, source, data, n_samples=8, partial=True,
                                            shard_size=5))
        assert_same_fit(longer, clone(est).fit(source, data).partial_fit(source, data,
                                                                         n_samples=8))


# --------------------------------------------------------------------------- model sources


LOADS = []


def counting_factory():
    """A checkpoint's factory that counts the models it builds (in this process)."""
    LOADS.append(1)
    return net_factory()


def test_a_checkpoint_is_loaded_once_per_worker_for_all_its_tasks(problem, reference):
    _net, X, ckpt = problem
    counted = Checkpoint(ckpt.path, counting_factory)
    one = reference["naive"][24]
    LOADS.clear()
    assert_same_fit(one, fit_sharded(fresh(one), counted, X, shard_size=4))  # 6 shards + pilot
    assert len(LOADS) == 1
    sweep({"a": counted}, X, {"cutoff": [1e-3, 1e-2, 2e-2]}, estimator=fresh(one))
    assert len(LOADS) == 2  # three rows, one load
    assert sources_module._loaded == {} and shards_module._problems == {}  # nothing kept


def test_whole_module_file_and_pretrained_directory_load_where_they_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    from volsk.experiments.language import make_tiny_gpt_neox

    lm = make_tiny_gpt_neox(hidden_size=16, num_layers=1, num_heads=2, max_positions=8,
                            vocab_size=16).eval()
    lm.save_pretrained(tmp_path / "step_100")
    tokens = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    est = LocalVolumeEstimator(sigma=0.05, n_samples=6, random_state=0)
    one = clone(est).fit(lm, tokens)
    pretrained = Checkpoint(tmp_path / "step_100", transformers.GPTNeoXForCausalLM)
    assert_same_fit(one, fit_sharded(clone(est), pretrained, tokens, shard_size=4))
    frame = sweep({"lm": pretrained}, tokens, estimator=est)
    assert frame["log_volume"].item() == one.log_volume_
    with pytest.raises(ValueError, match="model class"):
        Checkpoint(tmp_path / "step_100", lambda: lm).load()

    net, X = small_mlp()
    torch.save(net, tmp_path / "whole.pt")
    mlp = LocalVolumeEstimator(sigma=0.5, n_samples=6, random_state=0)
    assert_same_fit(clone(mlp).fit(net, X),
                    fit_sharded(clone(mlp), Checkpoint(tmp_path / "whole.pt",
                                                       weights_only=False), X, shard_size=4))


# ----------------------------------------------------------------------------- the cache


class Interrupt:
    """Wraps a pipeline stage: counts calls, raises KeyboardInterrupt on the call ``at``."""

    def __init__(self, stage, at=None):
        self.stage, self.at, self.calls = stage, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.stage(*args, **kwargs)


def test_rerun_after_an_interruption_computes_only_the_missing_shards(problem, reference,
                                                                     tmp_path, monkeypatch):
    _net, X, ckpt = problem
    one = reference["naive"][24]  # no eps pilot: estimate_directions runs only for shards
    pipeline = shards_module.pipeline
    shards = Interrupt(pipeline.estimate_directions, at=3)
    monkeypatch.setattr(pipeline, "estimate_directions", shards)
    with pytest.raises(KeyboardInterrupt):  # preempted during the third of five shards
        fit_sharded(fresh(one), ckpt, X, shard_size=5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3  # the pilot and two shards
    shards = Interrupt(pipeline.estimate_directions.stage)
    pilots = Interrupt(pipeline.calibrate_search)
    monkeypatch.setattr(pipeline, "estimate_directions", shards)
    monkeypatch.setattr(pipeline, "calibrate_search", pilots)
    assert_same_fit(one, fit_sharded(fresh(one), ckpt, X, shard_size=5, cache_dir=tmp_path))
    assert (shards.calls, pilots.calls) == (3, 0)  # the missing shards; the pilot was stored
    assert_same_fit(one, fit_sharded(fresh(one), ckpt, X, shard_size=5, cache_dir=tmp_path))
    assert (shards.calls, pilots.calls) == (3, 0)  # all cached: no worker needed at all
    # more directions later reuse the shards stored; a larger shard size too
    longer = fit_sharded(fresh(one, n_samples=40), ckpt, X, shard_size=16, cache_dir=tmp_path)
    assert_same_fit(reference["naive"][40], longer)
    assert shards.calls == 3 + 2  # 24…31 and 32…39


def shard_files(cache_dir):
    return sorted(p for p in cache_dir.glob("*-*-*.json"))


def test_damaged_or_swapped_shard_files_are_recomputed_never_used(problem, reference, tmp_path,
                                                                  capsys):
    _net, X, ckpt = problem
    one = reference["auto eps"][24]  # the pilot's record holds the eps pilot's table
    fit_sharded(fresh(one), ckpt, X, shard_size=8, cache_dir=tmp_path)
    files = shard_files(tmp_path)
    assert len(files) == 3
    (pilot,) = set(tmp_path.glob("*.json")) - set(files)
    first, second = files[0].read_bytes(), files[1].read_bytes()
    files[0].write_bytes(second)  # two shards' files swapped: valid JSON, wrong directions
    files[1].write_bytes(first)
    text = files[2].read_text()
    files[2].write_text(text[: len(text) // 3])  # truncated
    record = json.loads(pilot.read_text())
    del record["start"]  # valid JSON, incomplete
    pilot.write_text(json.dumps(record))
    capsys.readouterr()
    again = fit_sharded(fresh(one), ckpt, X, shard_size=8, cache_dir=tmp_path, verbose=1)
    err = capsys.readouterr().err
    assert_same_fit(one, again)
    for path in (*files, pilot):
        assert str(path) in err
    assert err.count("recomputing") == 4
    assert shard_files(tmp_path) == files  # rewritten whole
    capsys.readouterr()
    assert_same_fit(one, fit_sharded(fresh(one), ckpt, X, shard_size=8, cache_dir=tmp_path,
                                     verbose=1))
    assert "recomputing" not in capsys.readouterr().err
    # a module source is known by its weights: other weights miss
    other = small_mlp(seed=1)[0]
    assert fit_sharded(fresh(one), other, X, shard_size=8, cache_dir=tmp_path).log_volume_ != (
        one.log_volume_)


def test_shards_from_different_kinds_of_device_are_said(problem, reference, tmp_path):
    _net, X, ckpt = problem
    one = reference["naive"][24]
    fit_sharded(fresh(one), ckpt, X, shard_size=8, cache_dir=tmp_path)
    path = shard_files(tmp_path)[1]
    record = json.loads(path.read_text())
    record["device"] = "cuda"  # as if a GPU worker had run this shard
    path.write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match="cpu and cuda"):
        fit_sharded(fresh(one), ckpt, X, shard_size=8, cache_dir=tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_auto_runs_the_shards_on_the_workers_gpu(problem, tmp_path):
    net, X, ckpt = problem
    est = LocalVolumeEstimator(sigma=0.5, n_samples=12, random_state=3)  # device="auto"
    one = clone(est).fit(net, X)
    assert_same_fit(one, fit_sharded(clone(est), ckpt, X, shard_size=5, cache_dir=tmp_path))
    assert {json.loads(p.read_text())["device"] for p in shard_files(tmp_path)} == {"cuda"}


# --------------------------------------------------------------------- real clusters


def kill_once_factory(marker_dir):
    """A factory whose second call, in any process, kills that process (a worker lost)."""

    def build():
        for i in range(100):  # claim the next call number atomically
            try:
                os.close(os.open(os.path.join(marker_dir, f"load-{i}"),
                                 os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                continue
        if i == 1:
            os._exit(1)
        return net_factory()

    return build


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                 dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(2, timeout=120)
        yield client


def test_dask_cluster_gives_the_one_process_estimate(problem, reference, dask_client):
    net, X, ckpt = problem
    one = reference["auto eps"][24]
    for source in (ckpt, net):
        assert_same_fit(one, fit_sharded(fresh(one), source, X, client=dask_client,
                                         shard_size=4))
    with joblib.parallel_config(backend="dask"):
        assert_same_fit(one, fit_sharded(fresh(one), ckpt, X, shard_size=6))
    # what a task carries: the checkpoint's path and factory, X as a key, never the weights
    engine = cluster_module._Dask(dask_client)
    big = torch.randn(20_000, 5)
    placed = engine.place(ckpt, big, None, None)
    assert len(pickle.dumps(placed[1])) < 1000 < big.numel()


@CHOSEN_MAPS_WARN
def test_dask_cluster_binds_the_maps_pilots_chose(chosen_maps, dask_client):
    for name in ("exponent", "boundary, auto eps and exponent"):
        est, source, data, one = chosen_maps[name]
        assert_same_fit(one, fit_sharded(clone(est), source, data, client=dask_client,
                                         shard_size=3))


def test_dask_reruns_the_shard_of_a_killed_worker_with_the_same_result(problem, reference,
                                                                      dask_client, tmp_path):
    _net, X, ckpt = problem
    one = reference["naive"][24]
    source = Checkpoint(ckpt.path, kill_once_factory(str(tmp_path)))
    sharded = fit_sharded(fresh(one), source, X, client=dask_client, shard_size=2)
    assert (tmp_path / "load-1").exists()  # a worker died loading the model for a shard
    assert_same_fit(one, sharded)


def test_ray_local_cluster_through_joblib_gives_the_one_process_estimate(problem, reference,
                                                                         tmp_path):
    ray = pytest.importorskip("ray")
    from ray.util.joblib import register_ray

    net, X, _ckpt = problem
    one = reference["naive"][24]
    torch.save(net, tmp_path / "whole.pt")  # Ray's workers import volsk and torch only
    ckpt = Checkpoint(tmp_path / "whole.pt", weights_only=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        register_ray()
        with joblib.parallel_config(backend="ray", n_jobs=2):
            assert_same_fit(one, fit_sharded(fresh(one), ckpt, X, shard_size=8))
            # Ray's joblib backend cannot stream results: sweeps run it in rounds
            frame = sweep({"a": ckpt, "b": ckpt}, X, estimator=fresh(one), random_state=3)
    finally:
        ray.shutdown()
    assert frame["log_volume"].tolist() == [one.log_volume_] * 2


def with_saved_optimizer(path):
    """A model source whose optimizer state is a file on disk (importable by workers)."""
    return {"model": net_factory(), "optimizer": str(path)}


def test_an_optimizer_state_file_travels_to_the_shards(problem, tmp_path):
    import copy
    import functools

    _net, X, _ckpt = problem
    trained = copy.deepcopy(net_factory())  # the state belongs to the source's parameters
    opt = torch.optim.Adam(trained.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        trained(X).pow(2).mean().backward()
        opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    est = LocalVolumeEstimator(n_samples=12, sigma=0.5, preconditioner="adam", random_state=3)
    one = fresh(est).fit(net_factory(), X, optimizer=str(path))
    sharded = fit_sharded(fresh(est), functools.partial(with_saved_optimizer, path), X,
                          shard_size=5)
    assert_same_fit(one, sharded)


