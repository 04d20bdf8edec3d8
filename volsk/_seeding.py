"""Every seed stream volsk draws from, and the one meaning of ``random_state=None``.

A fit has one base seed (``seed_``). Everything random in it is a pure function of that seed
and a stream name, so results do not depend on batching, workers or the order of work:

- direction i: a PCG64 generator seeded by ``SeedSequence([seed, i])`` (the "host"
  generator); with the "device" generator, chunk c of its normals is torch's generator on
  the fit's device seeded by word c of ``SeedSequence([seed, i, DEVICE_STREAM])``
  (:func:`device_chunk_seeds`, used by ``volsk._sampling.NormalStream``);
- the search pilot, the eps pilot and each round of the boundary fit: their own seed,
  ``SeedSequence([seed, STREAM])``, so that no direction of the estimate is also a pilot
  direction; the bootstrap of the aggregate too;
- the init prior's re-initialisations: ``SeedSequence([seed, owner + 1, draw])``;
- flat-coordinate probes and Hutchinson probes: fixed generators (they decide nothing random
  about the estimate).

``random_state=None`` follows scikit-learn: the base seed is drawn from NumPy's global
``RandomState`` (so ``np.random.seed`` makes such fits repeatable); an int is used as it is; a
``RandomState`` instance is drawn from.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.utils import check_random_state

__all__ = [
    "SEARCH_PILOT_STREAM",
    "BOOTSTRAP_STREAM",
    "EPS_PILOT_STREAM",
    "BOUNDARY_PILOT_STREAM",
    "DEVICE_STREAM",
    "base_seed",
    "stream_seed",
    "direction_generator",
    "device_chunk_seeds",
    "child_seed",
    "row_seeds",
]

SEARCH_PILOT_STREAM = 0x726164697573  # "radius"
EPS_PILOT_STREAM = 0x70696C6F74  # "pilot"
BOOTSTRAP_STREAM = 0x626F6F74  # "boot": resampling the per-direction estimates
BOUNDARY_PILOT_STREAM = 0x626F756E64  # "bound": the boundary fit's pilots, child r per round
DEVICE_STREAM = 0x646576696365  # "device": the chunk seeds of the "device" direction generator


def base_seed(random_state) -> int:
    """The base seed of a fit: an int as it is, else a draw from ``check_random_state``.

    Examples
    --------
    >>> from volsk._seeding import base_seed
    >>> base_seed(7)
    7
    """
    if isinstance(random_state, Integral) and not isinstance(random_state, bool):
        seed = int(random_state)
        if seed < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}")
        return seed
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def stream_seed(seed: int, stream: int) -> int:
    """The base seed of a named stream derived from ``seed`` (independent of direction seeds).

    Examples
    --------
    >>> from volsk._seeding import SEARCH_PILOT_STREAM, stream_seed
    >>> stream_seed(0, SEARCH_PILOT_STREAM) == stream_seed(0, SEARCH_PILOT_STREAM)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def child_seed(*key: int) -> int:
    """A seed from an arbitrary tuple of non-negative ints (``SeedSequence(key)``)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def direction_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of direction ``index``: PCG64 seeded by ``SeedSequence([seed, index])``."""
    return np.random.default_rng([int(seed), int(index)])


def device_chunk_seeds(seed: int, index: int, n_chunks: int) -> np.ndarray:
    """The 64-bit seeds of the ``n_chunks`` chunks of direction ``index``'s normals under the
    "device" generator: the first words of ``SeedSequence([seed, index, DEVICE_STREAM])``.

    SeedSequence hashes its words out one after another, so the first words do not depend on
    how many are asked for: chunk c's seed is the same whatever the direction's length.

    Examples
    --------
    >>> from volsk._seeding import device_chunk_seeds
    >>> s = device_chunk_seeds(0, 3, 4)
    >>> s.dtype, s.shape, bool((s[:2] == device_chunk_seeds(0, 3, 2)).all())
    (dtype('uint64'), (4,), True)
    """
    sequence = np.random.SeedSequence([int(seed), int(index), DEVICE_STREAM])
    return sequence.generate_state(int(n_chunks), np.uint64)


def row_seeds(random_state, paired: bool, n_models: int, n_params: int) -> np.ndarray:
    """Base seed of every (model, parameter combination) of a sweep: an (n_models, n_params)
    object array of ints.

    The entropy is ``base_seed(random_state)``. Paired: one seed for all rows (common random
    numbers; an int random_state is used as it is, so a row equals
    ``LocalVolumeEstimator(random_state=random_state, **params).fit``). Unpaired: row (i, j)
    gets the child of ``SeedSequence(entropy)`` with spawn key (i, j), so adding models or grid
    values at the end keeps the existing rows' seeds.

    Examples
    --------
    >>> from volsk._seeding import row_seeds
    >>> row_seeds(7, True, 2, 1).tolist()
    [[7], [7]]
    >>> unpaired = row_seeds(7, False, 2, 2)
    >>> len(set(unpaired.ravel())), unpaired[0, 0] == row_seeds(7, False, 3, 2)[0, 0]
    (4, True)
    """
    entropy = base_seed(random_state)
    if paired:
        return np.full((n_models, n_params), entropy, dtype=object)
    seeds = np.empty((n_models, n_params), dtype=object)
    for i, model_seq in enumerate(np.random.SeedSequence(entropy).spawn(n_models)):
        for j, row_seq in enumerate(model_seq.spawn(n_params)):
            seeds[i, j] = int(row_seq.generate_state(1)[0])
    return seeds
