"""Aggregation of per-direction log estimates, confidence bounds, units and tables."""

from __future__ import annotations

import math

import numpy as np

from ._math import logsumexp_mean

__all__ = [
    "aggregate_log_volume",
    "summarise_samples",
    "effective_sample_size",
    "log_lower_bound",
    "to_log10",
    "to_bits",
]

LN2 = math.log(2.0)
LN10 = math.log(10.0)


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
    1 − δ, µ ≥ δ·µ̂ (DESIGN §1).

    Examples
    --------
    >>> from volsk.results import log_lower_bound
    >>> round(log_lower_bound(0.0, 0.95), 4)
    -2.9957
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(log_volume + math.log1p(-confidence))


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
