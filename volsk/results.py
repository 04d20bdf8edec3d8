"""Per-direction records, their aggregation, confidence bounds, units and tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ._coordinates import FlatCoordinates
from ._math import logsumexp_mean
from ._radius import STATUS
from ._seeding import BOOTSTRAP_STREAM, stream_seed

__all__ = [
    "DirectionRecords",
    "FlatCoordinates",
    "SAMPLE_COLUMNS",
    "STATUS",
    "samples_frame",
    "check_confidence",
    "LowEffectiveSampleSizeWarning",
    "aggregate_log_volume",
    "top_sample_share",
    "bootstrap_interval",
    "summarise_samples",
    "effective_sample_size",
    "log_lower_bound",
    "to_log10",
    "to_bits",
]

LN2 = math.log(2.0)
LN10 = math.log(10.0)


@dataclass
class DirectionRecords:
    """What one fit keeps of each direction: scalars only, one array of length k per field.

    The one definition of the samples table's columns (``LocalVolumeEstimator.samples_``, the
    sweep's samples table, cached shards).

    Attributes
    ----------
    direction : ndarray of int64
        The global direction index i (its seed is (``seed_``, i)).
    log_volume : ndarray of float64
        The direction's log estimate ℓ_i = log|S^{n−1}| + log I(u_i) + log w_i.
    radius : ndarray of float64
        R(u_i), the first radius where the cost reaches the cutoff (inf: never).
    cost_at_radius : ndarray of float64
    log_weight : ndarray of float64
        The importance log-weight −n·log|P g_i|.
    log_radial_integral : ndarray of float64
        log I(u_i), the measure's integral along the ray up to the radius.
    evaluations : ndarray of int64
        Cost evaluations the radius search spent.
    status : ndarray of int64
        Code of ``STATUS`` (the radius search's outcome: crossed, unbounded, jump, max_iter).
    """

    direction: np.ndarray
    log_volume: np.ndarray
    radius: np.ndarray
    cost_at_radius: np.ndarray
    log_weight: np.ndarray
    log_radial_integral: np.ndarray
    evaluations: np.ndarray
    status: np.ndarray

    def __post_init__(self):
        for f in fields(self):
            kind = np.int64 if f.name in _INTEGER_COLUMNS else np.float64
            setattr(self, f.name, np.asarray(getattr(self, f.name), dtype=kind).reshape(-1))

    def __len__(self) -> int:
        return int(self.direction.size)

    @classmethod
    def empty(cls) -> DirectionRecords:
        return cls(*[np.zeros(0) for _ in SAMPLE_COLUMNS])

    @classmethod
    def concatenate(cls, parts) -> DirectionRecords:
        """The records of ``parts`` one after another."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(*[np.concatenate([getattr(p, c) for p in parts]) for c in SAMPLE_COLUMNS])

    def to_frame(self):
        """The samples table: one row per direction, ``status`` as a categorical."""
        return samples_frame({c: getattr(self, c) for c in SAMPLE_COLUMNS})


#: Columns of the samples table, in order.
SAMPLE_COLUMNS = tuple(f.name for f in fields(DirectionRecords))
_INTEGER_COLUMNS = ("direction", "evaluations", "status")


def samples_frame(columns: dict):
    """A samples DataFrame from per-column values; ``status`` as codes or as labels."""
    import pandas as pd  # import time: pandas is needed only once results are tabulated

    data = {}
    for c in SAMPLE_COLUMNS:
        values = np.asarray(columns[c])
        if c == "status":
            labels = [STATUS[int(v)] for v in values] if values.dtype.kind in "iu" else values
            data[c] = pd.Categorical(list(labels), categories=list(STATUS.values()))
        else:
            data[c] = values.astype(np.int64 if c in _INTEGER_COLUMNS else np.float64)
    return pd.DataFrame(data)


def check_confidence(confidence) -> float:
    """``confidence`` as a float in (0, 1), or a ValueError naming it."""
    try:
        value = float(confidence)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return value


def aggregate_log_volume(sample_log_volumes) -> float:
    """log µ̂ = logsumexp(ℓ) − log k: the log of the unbiased importance-sampling mean.

    Examples
    --------
    >>> from volsk.results import aggregate_log_volume
    >>> round(aggregate_log_volume([0.0, 0.0]), 12)
    0.0
    """
    return float(logsumexp_mean(np.asarray(sample_log_volumes, dtype=np.float64)))


def summarise_samples(sample_log_volumes, evaluations) -> dict:
    """Aggregate, best and median sample, ESS and evaluations per direction of one run.

    Examples
    --------
    >>> from volsk.results import summarise_samples
    >>> row = summarise_samples([0.0, 0.0], [3, 5])
    >>> row["ess"], row["evaluations_per_direction"]
    (2.0, 4.0)
    """
    ell = np.asarray(sample_log_volumes, dtype=np.float64)
    return {
        "log_volume": aggregate_log_volume(ell),
        "max_sample": float(np.max(ell)),
        "median_sample": float(np.median(ell)),
        "ess": effective_sample_size(ell),
        "evaluations_per_direction": float(np.mean(evaluations)),
    }


class LowEffectiveSampleSizeWarning(UserWarning):
    """One direction carries (nearly) the whole estimate (effective sample size ≈ 1).

    The estimate is then the best direction's, divided by k: unbiased, but with a heavy right
    tail, so a typical estimate lies below the truth — read it as a lower bound, and compare
    settings by it (a larger one is, with high probability, more accurate). More directions
    or a better preconditioner raise it.
    """


def top_sample_share(sample_log_volumes) -> float:
    """The fraction of the aggregate µ̂ that comes from the single largest sample.

    1 when one direction dominates (ESS ≈ 1), 1/k when all contribute equally.

    Examples
    --------
    >>> from volsk.results import top_sample_share
    >>> top_sample_share([0.0, 0.0, 0.0, 0.0])
    0.25
    >>> round(top_sample_share([0.0, -50.0]), 6)
    1.0
    """
    ell = np.asarray(sample_log_volumes, dtype=np.float64)
    if ell.size == 0 or not np.isfinite(ell).any():
        return float("nan")
    if np.isposinf(ell).any():
        return 1.0 / float(np.isposinf(ell).sum())
    return float(np.exp(ell.max() - logsumexp_mean(ell) - math.log(ell.size)))


def bootstrap_interval(sample_log_volumes, confidence=0.9, n_resamples=1000, seed=0):
    """Percentile bootstrap interval of the aggregate log µ̂ (directions resampled).

    It describes how much the aggregate moves with the directions drawn. With an effective
    sample size near 1 it is too narrow (the largest sample decides every resample that
    contains it, and the directions that would beat it were never drawn): then only the
    Markov lower bound (:func:`log_lower_bound`) is a guarantee.

    Parameters
    ----------
    sample_log_volumes : array-like of shape (k,)
    confidence : float in (0, 1), default=0.9
    n_resamples : int, default=1000
    seed : int, default=0
        The fit's base seed: resampling uses its own stream of it.

    Returns
    -------
    (float, float)
        The lower and upper percentile of the resampled aggregates.

    Examples
    --------
    >>> from volsk.results import bootstrap_interval
    >>> low, high = bootstrap_interval([0.0, -1.0, -2.0, -3.0], seed=0)
    >>> bool(-3.0 <= low <= high <= 0.0)
    True
    """
    level = check_confidence(confidence)
    ell = np.asarray(sample_log_volumes, dtype=np.float64)
    if ell.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(stream_seed(seed, BOOTSTRAP_STREAM))
    index = rng.integers(0, ell.size, size=(int(n_resamples), ell.size))
    resampled = ell[index]  # (n_resamples, k)
    top = resampled.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.where(np.isfinite(top), top, 0.0)
        aggregates = (finite[:, 0] + np.log(np.exp(resampled - finite).mean(axis=1)))
    aggregates = np.where(np.isposinf(top[:, 0]), np.inf, aggregates)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(aggregates, [tail, 1.0 - tail])
    return float(low), float(high)


def effective_sample_size(sample_log_volumes) -> float:
    """Kish's effective sample size (Σw)²/Σw² of the importance weights w = exp(ℓ).

    1 when one direction dominates the estimate, k when all contribute equally.

    Examples
    --------
    >>> from volsk.results import effective_sample_size
    >>> effective_sample_size([0.0, 0.0, 0.0, 0.0])
    4.0
    >>> round(effective_sample_size([0.0, -50.0]), 6)
    1.0
    """
    ell = np.asarray(sample_log_volumes, dtype=np.float64)
    finite = ell[np.isfinite(ell)]
    if np.isposinf(ell).any():
        return float(np.isposinf(ell).sum())
    if finite.size == 0:
        return 0.0
    w = np.exp(finite - finite.max())
    return float(w.sum() ** 2 / np.square(w).sum())


def log_lower_bound(log_volume: float, confidence: float = 0.95) -> float:
    """A lower confidence bound on log µ: log µ̂ + log(1 − confidence).

    µ̂ ≥ 0 is unbiased, so Markov's inequality gives P(µ̂ ≥ µ/δ) ≤ δ; with probability at least
    1 − δ, µ ≥ δ·µ̂.

    Examples
    --------
    >>> from volsk.results import log_lower_bound
    >>> round(log_lower_bound(0.0, 0.95), 4)
    -2.9957
    """
    return float(log_volume + math.log1p(-check_confidence(confidence)))


def to_log10(log_value: float) -> float:
    """Natural log → log10.

    Examples
    --------
    >>> import math
    >>> from volsk.results import to_log10
    >>> round(to_log10(math.log(1000.0)), 12)
    3.0
    """
    return float(log_value / LN10)


def to_bits(log_probability: float) -> float:
    """−log2 of a probability given as a natural log: the description length in bits.

    Examples
    --------
    >>> import math
    >>> from volsk.results import to_bits
    >>> to_bits(math.log(0.25))
    2.0
    """
    return float(-log_probability / LN2)
