"""Helpers the sphinx-gallery configuration names by import path (config values must pickle)."""

from pathlib import Path

# The gallery reads top to bottom: first estimate, the method's figures, then the workflows.
ORDER = [
    "quickstart.py",
    "preconditioners_compared.py",
    "cutoff_sweep.py",
    "checkpoints_sweep.py",
    "poisoned_vs_clean.py",
    "skorch_callback.py",
    "grid_search.py",
    "language_model.py",
    "language_checkpoints.py",
    "dask_sweep.py",
]


class ExampleOrder:
    """Sort key: the examples in ``ORDER``, then any others by file name."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = Path(filename).name
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)

    def __repr__(self):
        return "ExampleOrder"


def one_torch_thread(gallery_conf, fname, when=None):
    """Run every example on one torch thread (small ops on a shared CPU are fastest so)."""
    import torch

    torch.set_num_threads(1)
