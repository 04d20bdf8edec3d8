"""Bridges to scikit-learn and skorch: a scorer for model selection, a callback for training.

- :func:`make_volume_scorer` (also ``volsk.make_volume_scorer``) and :class:`VolumeScorer`: a
  fitted network's log-volume as a scikit-learn scorer (``cross_validate``, ``GridSearchCV``);
- :class:`LocalVolume` and :func:`dataset_inputs` (users import them from ``volsk.skorch``):
  the log-volume recorded in ``net.history`` while a skorch net trains.
"""

from .scoring import VolumeScorer, make_volume_scorer
from .skorch import LocalVolume, dataset_inputs

__all__ = ["LocalVolume", "make_volume_scorer", "VolumeScorer", "dataset_inputs"]
