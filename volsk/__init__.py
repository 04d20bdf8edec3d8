"""volsk: how much of parameter space does a trained PyTorch network own?

Estimate the prior probability (or Lebesgue volume) of the neighbourhood of a trained network's
weights in which it behaves the same; ``-log`` of it is the network's information content.

>>> from volsk import LocalVolumeEstimator
>>> LocalVolumeEstimator(cutoff=1e-2, measure="gaussian").cutoff
0.01
"""

from .estimator import LocalVolumeEstimator
from .scoring import make_volume_scorer
from .sweep import Checkpoint, effective_dimension, sweep

__all__ = [
    "LocalVolumeEstimator",
    "make_volume_scorer",
    "Checkpoint",
    "effective_dimension",
    "sweep",
    "__version__",
]
__version__ = "0.1.0.dev0"
