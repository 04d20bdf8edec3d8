"""volsk.sweeps: many models × many settings → one tidy table, the same under every backend."""

import json

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid

import volsk
from volsk import LocalVolumeEstimator
from volsk.sweeps import Checkpoint, effective_dimension, sweep

N_PARAMETERS = 4 * 8 + 8 + 8 * 3 + 3


def make_net(seed=0):
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


def nudged(net, scale, seed=1):
    """A copy of net moved a little: a 'later checkpoint' of the same run."""
    other = make_net()
    other.load_state_dict(net.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def problem():
    a = make_net(0)
    models = {"a": a, "b": nudged(a, 0.05)}
    X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    base = LocalVolumeEstimator(sigma=1.0, n_samples=8)
    grid = {"cutoff": [1e-3, 1e-2], "preconditioner": [None, np.linspace(0.5, 2.0, N_PARAMETERS)]}
    return models, X, base, grid


@pytest.fixture(scope="module")
def reference(problem):
    models, X, base, grid = problem
    return sweep(models, X, grid, estimator=base, n_jobs=1, return_samples=True)


def assert_same_table(left, right):
    pd.testing.assert_frame_equal(left.drop(columns="seconds"), right.drop(columns="seconds"),
                                  check_exact=True)


# ------------------------------------------------------------------------------- the table


def test_table_has_one_row_per_model_and_combination(reference, problem):
    frame, samples = reference
    assert list(frame.columns) == [
        "model", "cutoff", "preconditioner", "seed", "log_volume", "log10_volume", "bits",
        "lower_bound", "ess", "n_parameters", "n_evaluations", "seconds",
    ]
    assert frame["model"].tolist() == ["a"] * 4 + ["b"] * 4
    assert frame["cutoff"].tolist() == [1e-3, 1e-3, 1e-2, 1e-2] * 2
    assert frame["preconditioner"].tolist() == ["naive", "ndarray(67,)"] * 4
    assert (frame["n_parameters"] == N_PARAMETERS).all()
    assert (frame["lower_bound"] < frame["log_volume"]).all()
    assert np.allclose(frame["bits"], -frame["log_volume"] / np.log(2))
    assert (frame["seconds"] > 0).all()
    assert len(samples) == 8 * 8
    assert samples.groupby(["model", "cutoff", "preconditioner"]).size().eq(8).all()
    assert samples["direction"].tolist()[:8] == list(range(8))


def test_row_equals_a_standalone_fit_with_the_same_random_state(reference, problem):
    models, X, base, _grid = problem
    frame, samples = reference
    est = clone(base).set_params(cutoff=1e-2, random_state=0).fit(models["b"], X)
    row = frame[(frame.model == "b") & (frame.cutoff == 1e-2)
                & (frame.preconditioner == "naive")].iloc[0]
    assert row["log_volume"] == est.log_volume_
    assert row["n_evaluations"] == est.n_evaluations_
    mine = samples[(samples.model == "b") & (samples.cutoff == 1e-2)
                   & (samples.preconditioner == "naive")]
    np.testing.assert_array_equal(mine["log_volume"], est.sample_log_volumes_)


def test_paired_rows_share_one_seed_and_unpaired_rows_get_their_own(problem):
    models, X, base, grid = problem
    paired = sweep(models, X, {"cutoff": [1e-2]}, estimator=base, random_state=7)
    assert paired["seed"].tolist() == [7, 7]
    unpaired = sweep(models, X, grid, estimator=base, random_state=7, paired=False)
    assert unpaired["seed"].nunique() == len(unpaired)
    again = sweep(models, X, grid, estimator=base, random_state=7, paired=False)
    assert_same_table(unpaired, again)
    # adding a model at the end keeps the existing rows' seeds (cache hits stay hits)
    more = sweep({**models, "c": make_net(3)}, X, grid, estimator=base, random_state=7,
                 paired=False)
    assert more["seed"].tolist()[:8] == unpaired["seed"].tolist()


def test_paired_differences_between_close_checkpoints_have_lower_spread(problem):
    models, X, base, _grid = problem
    base = clone(base).set_params(n_samples=32)
    spread = {}
    for paired in (True, False):
        _frame, samples = sweep(models, X, estimator=base, paired=paired, random_state=3,
                                return_samples=True)
        per_direction = samples.pivot(index="direction", columns="model", values="log_volume")
        spread[paired] = float((per_direction["a"] - per_direction["b"]).std())
    assert spread[True] < 0.5 * spread[False]
    # and the aggregate differences, over repeated random states
    differences = {True: [], False: []}
    for paired in (True, False):
        for random_state in range(16):
            frame = sweep(models, X, estimator=base, paired=paired, random_state=random_state)
            differences[paired].append(frame["log_volume"].iloc[0] - frame["log_volume"].iloc[1])
    assert np.std(differences[True]) < 0.5 * np.std(differences[False])


def test_random_state_none_draws_the_base_seed_from_numpys_global_state(problem):
    models, X, base, _grid = problem
    np.random.seed(5)  # noqa: NPY002 - the global state is what None means, as in scikit-learn
    paired = sweep(models, X, estimator=base, random_state=None)
    expected = np.random.RandomState(5).randint(np.iinfo(np.int32).max)
    assert paired["seed"].tolist() == [expected, expected]
    np.random.seed(5)  # noqa: NPY002
    unpaired = sweep(models, X, estimator=base, random_state=None, paired=False)
    seeded = sweep(models, X, estimator=base, random_state=np.random.RandomState(5),
                   paired=False)
    assert unpaired["seed"].tolist() == seeded["seed"].tolist()
    assert unpaired["seed"].nunique() == 2


def test_random_state_in_the_grid_sets_the_seeds(problem):
    models, X, base, _grid = problem
    frame = sweep(models, X, {"random_state": [4, 5]}, estimator=base)
    assert frame["seed"].tolist() == [4, 5, 4, 5]
    assert frame["random_state"].tolist() == [4, 5, 4, 5]


def test_list_of_grids_and_objects_are_labelled(problem):
    models, X, base, _grid = problem
    h1, h2 = np.ones(N_PARAMETERS), np.linspace(1, 2, N_PARAMETERS)
    grid = [{"cutoff": [1e-2]}, {"preconditioner": [h1, h2], "n_samples": [4]}]
    frame = sweep({"a": models["a"]}, X, grid, estimator=base)
    assert frame.columns[1:4].tolist() == ["cutoff", "preconditioner", "n_samples"]
    assert frame["preconditioner"].iloc[1:].tolist() == ["ndarray(67,) [0]", "ndarray(67,) [1]"]
    assert frame["cutoff"].isna().tolist() == [False, True, True]


# ---------------------------------------------------------------------------------- sources


def test_factories_and_checkpoints_give_the_same_rows_as_modules(reference, problem, tmp_path):
    models, X, base, grid = problem
    frame, _ = reference
    torch.save(models["a"].state_dict(), tmp_path / "a.pt")
    torch.save({"model": models["b"].state_dict(), "step": 2}, tmp_path / "b.pt")
    sources = {
        "a": Checkpoint(tmp_path / "a.pt", make_net),
        "b": lambda: nudged(make_net(0), 0.05),
    }
    assert_same_table(frame, sweep(sources, X, grid, estimator=base))
    keyed = sweep({"b": volsk.Checkpoint(tmp_path / "b.pt", make_net, key="model")}, X, grid,
                  estimator=base)
    assert_same_table(frame.iloc[4:].reset_index(drop=True), keyed)


def test_checkpoint_with_optimizer_state_reaches_fit(tmp_path):
    net = make_net(0)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = Checkpoint(tmp_path / "c.pt", make_net, key="model",
                      optimizer=lambda m: torch.optim.Adam(m.parameters()))
    loaded = ckpt.load()
    assert set(loaded) == {"model", "optimizer"}
    state = loaded["optimizer"].state_dict()["state"]
    assert torch.equal(state[0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])


def test_bad_arguments_are_named(tmp_path):
    X = torch.randn(8, 4)
    with pytest.raises(TypeError, match="mapping"):
        sweep([make_net()], X)
    with pytest.raises(ValueError, match="empty"):
        sweep({}, X)
    with pytest.raises(TypeError, match="Checkpoint"):
        sweep({"a": "model.pt"}, X)
    with pytest.raises(ValueError, match="cutof"):
        sweep({"a": make_net()}, X, {"cutof": [1e-2]})
    with pytest.raises(ValueError, match="cutoff"):
        sweep({"a": make_net()}, X, {"cutoff": [-1.0]})
    torch.save(make_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="factory"):
        Checkpoint(tmp_path / "sd.pt").load()


# ------------------------------------------------------------------------------------ cache


def test_cache_recomputes_only_missing_rows_after_an_interruption(problem, tmp_path):
    _models, X, base, _grid = problem
    calls = []

    def factory(name, fail_on=None):
        def build():
            calls.append(name)
            if len(calls) == fail_on:
                raise KeyboardInterrupt  # the user pressed Ctrl-C during the third fit
            return make_net(0) if name == "a" else make_net(1)
        return build

    grid = {"cutoff": [1e-3, 1e-2]}
    with pytest.raises(KeyboardInterrupt):
        sweep({"a": factory("a", fail_on=3), "b": factory("b", fail_on=3)}, X, grid,
              estimator=base, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2
    calls.clear()
    frame = sweep({"a": factory("a"), "b": factory("b")}, X, grid, estimator=base,
                  cache_dir=tmp_path)
    assert calls == ["b", "b"]  # the two rows of "a" came from the cache
    calls.clear()
    again, samples = sweep({"a": factory("a"), "b": factory("b")}, X, grid, estimator=base,
                           cache_dir=tmp_path, return_samples=True)
    assert calls == []
    pd.testing.assert_frame_equal(frame, again, check_exact=True)  # seconds too: cached
    fresh, fresh_samples = sweep({"a": factory("a"), "b": factory("b")}, X, grid,
                                 estimator=base, return_samples=True)
    assert_same_table(fresh, again)
    pd.testing.assert_frame_equal(fresh_samples, samples, check_exact=True)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {"model", "params", "result", "samples"} <= set(record)


def test_cache_misses_when_parameters_data_or_weights_change(problem, tmp_path):
    _models, X, base, _grid = problem
    net = make_net(0)
    sweep({"a": net}, X, estimator=base, cache_dir=tmp_path)
    sweep({"a": net}, X, estimator=clone(base).set_params(cutoff=2e-2), cache_dir=tmp_path)
    sweep({"a": net}, X + 1, estimator=base, cache_dir=tmp_path)
    sweep({"a": nudged(net, 0.1)}, X, estimator=base, cache_dir=tmp_path)
    sweep({"a": net}, X, estimator=base, random_state=1, cache_dir=tmp_path)
    sweep({"a": net}, X, estimator=clone(base).set_params(verbose=0, n_jobs=2),
          cache_dir=tmp_path)  # n_jobs and verbose do not change results: a hit
    assert len(list(tmp_path.glob("*.json"))) == 5


def _cached_files(cache_dir, models, X, base, grid):
    """The cache file of every row of ``sweep(models, X, grid)``, in table order."""
    from volsk.sweeps.cache import cache_key, data_fingerprint

    data = data_fingerprint(X, None)
    rows = [clone(base).set_params(random_state=0, **params)
            for params in ParameterGrid(grid)]
    return [cache_dir / f"{cache_key(name, source, est, data)}.json"
            for name, source in models.items() for est in rows]


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete a key", "short column",
                                    "other format", "not a record"])
def test_damaged_cache_files_are_recomputed_and_named_under_verbose(problem, tmp_path, damage,
                                                                  capsys):
    models, X, base, _grid = problem
    grid = {"cutoff": [1e-3, 1e-2]}
    fresh = sweep(models, X, grid, estimator=base, cache_dir=tmp_path)
    files = _cached_files(tmp_path, models, X, base, grid)
    assert all(f.exists() for f in files)
    victim = files[1]
    text = victim.read_text()
    record = json.loads(text)
    if damage == "truncate":  # a copy interrupted half way
        victim.write_text(text[: len(text) // 2])
    elif damage == "garble":
        victim.write_bytes(b"\x00\xff" + text.encode()[2:])
    elif damage == "delete a key":  # valid JSON, incomplete (today's code: a bare KeyError)
        del record["result"]["log_volume"]
        victim.write_text(json.dumps(record))
    elif damage == "short column":
        record["samples"]["radius"] = record["samples"]["radius"][:-1]
        victim.write_text(json.dumps(record))
    elif damage == "other format":
        record["format"] = 2
        victim.write_text(json.dumps(record))
    else:
        victim.write_text(json.dumps([1, 2, 3]))
    capsys.readouterr()
    again = sweep(models, X, grid, estimator=base, cache_dir=tmp_path, verbose=1)
    err = capsys.readouterr().err
    assert str(victim) in err and "recomputing" in err
    assert err.count("recomputing") == 1  # only the damaged file
    assert_same_table(fresh, again)
    assert again["seconds"].iloc[0] == fresh["seconds"].iloc[0]  # the intact rows: cached
    rewritten = json.loads(victim.read_text())  # rewritten whole
    assert rewritten["key"] == victim.stem
    assert rewritten["samples"] == json.loads(text)["samples"]


def test_cache_never_uses_a_record_copied_over_another_rows_file(problem, tmp_path, capsys):
    models, X, base, _grid = problem
    grid = {"cutoff": [1e-3, 1e-2]}
    fresh, fresh_samples = sweep(models, X, grid, estimator=base, cache_dir=tmp_path,
                                 return_samples=True)
    files = _cached_files(tmp_path, models, X, base, grid)
    first, last = files[0].read_bytes(), files[-1].read_bytes()
    files[0].write_bytes(last)  # swap two rows' files: both are valid, complete records
    files[-1].write_bytes(first)
    capsys.readouterr()
    again, samples = sweep(models, X, grid, estimator=base, cache_dir=tmp_path, verbose=1,
                           return_samples=True)
    err = capsys.readouterr().err
    assert str(files[0]) in err and str(files[-1]) in err and "another question" in err
    assert_same_table(fresh, again)
    pd.testing.assert_frame_equal(fresh_samples, samples, check_exact=True)
    assert files[0].read_bytes() != last  # each file now holds its own row again
    assert json.loads(files[0].read_text())["key"] == files[0].stem


# --------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_joblib_backend_gives_the_same_table(reference, problem, backend):
    models, X, base, grid = problem
    with joblib.parallel_config(backend=backend):
        frame, samples = sweep(models, X, grid, estimator=base, n_jobs=2, return_samples=True)
    assert_same_table(reference[0], frame)
    pd.testing.assert_frame_equal(reference[1], samples, check_exact=True)


def test_dask_local_cluster_gives_the_same_table(reference, problem):
    distributed = pytest.importorskip("distributed")
    models, X, base, grid = problem
    sources = {"a": models["a"], "b": lambda: nudged(make_net(0), 0.05)}
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                 dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        with joblib.parallel_config(backend="dask"):
            frame, samples = sweep(sources, X, grid, estimator=base, return_samples=True)
    assert_same_table(reference[0], frame)
    pd.testing.assert_frame_equal(reference[1], samples, check_exact=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_modules_travel_to_workers_as_cpu_copies():
    import pickle

    from volsk.sweeps.sources import _CPUModule

    net = make_net(0).cuda()
    shipped = pickle.loads(pickle.dumps(_CPUModule(net)))
    assert all(p.device.type == "cpu" for p in shipped.parameters())
    assert all(p.device.type == "cuda" for p in net.parameters())
    for mine, theirs in zip(net.parameters(), shipped.parameters(), strict=True):
        assert torch.equal(mine.cpu(), theirs)


# --------------------------------------------------------------------------------- analysis


def test_effective_dimension_is_twice_the_slope_per_model():
    eps = np.array([1e-3, 1e-2, 1e-1])
    frame = pd.DataFrame({
        "model": ["a"] * 3 + ["b"] * 3,
        "cutoff": np.tile(eps, 2),
        "log_volume": np.concatenate([-9 + 2.0 * np.log(eps), -20 + 5.0 * np.log(eps)]),
    })
    dims = effective_dimension(frame)
    assert dims.index.name == "model"
    np.testing.assert_allclose(dims.to_numpy(), [4.0, 10.0])
    assert effective_dimension(frame[frame.model == "a"]) == pytest.approx(4.0)


def test_effective_dimension_of_a_small_network_is_at_most_its_parameter_count(problem):
    models, X, base, _grid = problem
    frame = sweep({"a": models["a"]}, X, {"cutoff": [1e-4, 1e-3]},
                  estimator=clone(base).set_params(n_samples=16))
    d = effective_dimension(frame)
    assert 0 < d <= N_PARAMETERS * 1.05


def test_progress_bar_over_rows(problem, capsys):
    models, X, base, _grid = problem
    sweep(models, X, estimator=base, verbose=1)
    assert "2/2" in capsys.readouterr().err
