"""Estimates beyond one fit in one process: sweeps over models × settings, sharded fits.

- :func:`sweep` (also ``volsk.sweep``): one row per (model, parameter combination), fitted
  through ``joblib.Parallel`` under whatever backend the caller configured, optionally cached;
- :class:`Checkpoint` (also ``volsk.Checkpoint``): a model file or ``save_pretrained``
  directory loaded only in the worker that uses it, once per worker;
- :func:`fit_sharded`: one estimate, its directions split into shards run on a dask cluster
  or under any joblib backend, resumable, the same numbers as one process;
- :func:`effective_dimension` and :func:`label_columns`: reading the tables.
"""

from .analysis import effective_dimension, label_columns
from .cluster import fit_sharded
from .run import RESULT_COLUMNS, sweep
from .sources import Checkpoint

__all__ = ["sweep", "Checkpoint", "fit_sharded", "effective_dimension", "label_columns",
           "RESULT_COLUMNS"]
