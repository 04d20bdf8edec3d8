"""Where skorch users import volsk's callback: ``from volsk.skorch import LocalVolume``.

Re-exports :class:`LocalVolume` (the log-volume recorded in ``net.history`` every few epochs)
and :func:`dataset_inputs` from :mod:`volsk.integrations`, where they are defined.

Examples
--------
>>> from volsk.skorch import LocalVolume
>>> LocalVolume(every=5).every
5
"""

from .integrations.skorch import LocalVolume, dataset_inputs

__all__ = ["LocalVolume", "dataset_inputs"]
