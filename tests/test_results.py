"""volsk.results: the per-direction record type, aggregation and the estimate's diagnostics."""

import math
import pickle
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp

from models import quadratic_problem, small_mlp
from volsk import LocalVolumeEstimator
from volsk.results import (
    SAMPLE_COLUMNS,
    DirectionRecords,
    FlatCoordinates,
    LowEffectiveSampleSizeWarning,
    bootstrap_interval,
    effective_sample_size,
    top_sample_share,
)


def records(k, start=0):
    rng = np.random.default_rng(start)
    return DirectionRecords(
        direction=np.arange(start, start + k), log_volume=rng.normal(size=k),
        radius=rng.random(k), cost_at_radius=rng.random(k), log_weight=rng.normal(size=k),
        log_radial_integral=rng.normal(size=k), evaluations=rng.integers(1, 5, k),
        status=np.zeros(k, dtype=int))


def test_records_concatenate_and_tabulate_with_one_definition_of_the_columns():
    a, b = records(3), records(2, start=3)
    both = DirectionRecords.concatenate([a, b])
    assert len(both) == 5
    frame = both.to_frame()
    assert tuple(frame.columns) == SAMPLE_COLUMNS
    assert frame["direction"].tolist() == [0, 1, 2, 3, 4]
    assert str(frame["status"].dtype) == "category"
    assert len(DirectionRecords.concatenate([])) == 0


@pytest.mark.parametrize("ell", [[0.0] * 4, [0.0, -1.0, -3.0], [5.0, -50.0, -60.0]])
def test_top_sample_share_is_the_largest_weight_over_the_sum(ell):
    w = np.exp(np.asarray(ell) - max(ell))
    assert top_sample_share(ell) == pytest.approx(w.max() / w.sum(), rel=1e-12)


def test_bootstrap_interval_covers_the_mean_of_well_behaved_samples():
    # equal-variance log-normal samples with many comparable weights: the bootstrap is sound
    # there, so its 90 % interval should cover the true log-mean in about 90 % of repeats
    truth = 0.5 * 0.3**2  # log E[exp(N(0, 0.3²))]
    covered = 0
    for seed in range(200):
        ell = np.random.default_rng(seed).normal(0.0, 0.3, size=200)
        low, high = bootstrap_interval(ell, 0.9, n_resamples=400, seed=seed)
        assert low <= logsumexp(ell) - math.log(ell.size) <= high
        covered += low <= truth <= high
    assert 0.8 <= covered / 200 <= 0.97


def test_bootstrap_interval_is_repeatable_for_a_seed_and_checks_confidence():
    ell = np.random.default_rng(0).normal(size=50)
    assert bootstrap_interval(ell, seed=3) == bootstrap_interval(ell, seed=3)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(ell, confidence=1.5)


def test_a_fit_driven_by_one_direction_warns_and_reports_its_diagnostics():
    net, X = small_mlp()
    with pytest.warns(LowEffectiveSampleSizeWarning, match="effective sample size"):
        est = LocalVolumeEstimator(sigma=0.5, n_samples=20, random_state=0).fit(net, X)
    row = est.results_frame().iloc[0]
    assert row["ess"] == est.effective_sample_size_ < 1.5
    assert row["top_sample_share"] == est.top_sample_share_ > 0.5
    assert row["bootstrap_low"] <= row["bootstrap_high"] <= row["max_sample"]
    assert est.effective_sample_size_ == effective_sample_size(est.sample_log_volumes_)


def test_a_fit_with_many_comparable_directions_does_not_warn():
    # an isotropic ball: every direction gives the same estimate (ESS = k)
    model, X = quadratic_problem(np.full(5, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowEffectiveSampleSizeWarning)
        est = LocalVolumeEstimator(0.1, "lebesgue", cost="mse", n_samples=20, rtol=1e-8,
                                   random_state=0).fit(model, X)
    assert est.effective_sample_size_ == pytest.approx(20.0)
    assert est.top_sample_share_ == pytest.approx(1 / 20)


# ------------------------------------------------------------------ flat coordinates as runs


def _names_by_brute_force(names, shapes, indices):
    out = []
    offsets = np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in shapes])])
    for flat in sorted(set(indices)):
        t = int(np.searchsorted(offsets, flat, side="right")) - 1
        local = np.unravel_index(flat - offsets[t], shapes[t])
        out.append(f"{names[t]}[{', '.join(str(int(c)) for c in local)}]")
    return out


def test_flat_coordinates_name_every_coordinate_like_a_list_of_strings():
    rng = np.random.default_rng(0)
    names, shapes = ["embed.weight", "bias", "w"], [(7, 5), (4,), (2, 3, 2)]
    indices = rng.choice(35 + 4 + 12, size=30, replace=False).tolist() + [0, 1, 2, 3]
    flat = FlatCoordinates(names, shapes, indices)
    expected = _names_by_brute_force(names, shapes, indices)
    assert list(flat) == expected and flat == expected and flat == tuple(expected)
    assert len(flat) == len(expected) and flat[:3] == expected[:3] and flat[-1] == expected[-1]
    assert all(name in flat for name in expected)
    assert "bias[9]" not in flat and "nope[0]" not in flat and 3 not in flat
    missing = [n for n in _names_by_brute_force(names, shapes, range(51)) if n not in expected]
    assert not any(name in flat for name in missing)
    assert flat != expected[:-1] and flat != expected[::-1]
    counts = flat.counts()
    assert sum(counts.values()) == len(expected)
    assert counts == {t: sum(n.startswith(t + "[") for n in expected) for t in counts}
    with pytest.raises(IndexError):
        flat[len(expected)]
    again = FlatCoordinates.from_record(flat.to_record())
    assert again == flat and np.array_equal(again.indices(), np.unique(indices))


def test_millions_of_flat_coordinates_cost_a_few_numbers_per_run():
    # a language model's unused embedding rows: 40 000 rows of 256, in 2 runs
    rows = np.r_[np.arange(100, 20_100), np.arange(30_000, 50_000)]
    indices = (rows[:, None] * 256 + np.arange(256)).reshape(-1)
    flat = FlatCoordinates(["embed.weight", "head.weight"], [(50_304, 256), (10, 256)], indices)
    assert len(flat) == indices.size == 10_240_000
    assert flat.starts.size == 2 and len(pickle.dumps(flat)) < 2_000
    assert flat[0] == "embed.weight[100, 0]" and flat[-1] == "embed.weight[49999, 255]"
    assert "embed.weight[20100, 0]" not in flat and "embed.weight[30000, 7]" in flat
    with pytest.raises(ValueError, match="flat indices must lie"):
        FlatCoordinates(["w"], [(2,)], [2])
    with pytest.raises(ValueError, match="not a FlatCoordinates record"):
        FlatCoordinates.from_record({"names": ["w"], "shapes": [[2]], "starts": [0]})
