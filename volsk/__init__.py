"""volsk: how much of parameter space does a trained PyTorch network own?

Estimate the prior probability (or Lebesgue volume) of the neighbourhood of a trained network's
weights in which it behaves the same; ``-log`` of it is the network's information content.

>>> from volsk import LocalVolumeEstimator
>>> LocalVolumeEstimator(cutoff=1e-2, measure="gaussian").cutoff
0.01
"""

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "LocalVolumeEstimator",
    "make_volume_scorer",
    "Checkpoint",
    "effective_dimension",
    "sweep",
    "__version__",
]
from ._version import __version__  # noqa: E402

# import time: the public names are imported when first used (PEP 562), so that
# ``import volsk`` and ``volsk --help`` do not load torch, scikit-learn, pandas and skorch
_WHERE = {
    "LocalVolumeEstimator": ".estimator",
    "make_volume_scorer": ".integrations",
    "Checkpoint": ".sweeps",
    "effective_dimension": ".sweeps",
    "sweep": ".sweeps",
}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'volsk' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .estimator import LocalVolumeEstimator
    from .integrations import make_volume_scorer
    from .sweeps import Checkpoint, effective_dimension, sweep
