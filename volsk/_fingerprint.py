"""Content fingerprints (SHA-256) of tensors, data and parameters: one policy for every check.

Used wherever volsk must know that two things are the same question: ``partial_fit`` (same
anchor, same data, same parameters), the sweep and shard caches (a record answers the row it is
read for). Tensors are hashed by dtype, shape and raw bytes (so bfloat16, which NumPy lacks,
hashes too); mappings by sorted key; callables by their pickled code.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["fingerprint", "AsFloat64"]

FEED_BLOCK = 1 << 16  # elements widened to float64 at a time


class AsFloat64:
    """A tensor hashed as its float64 values, a block at a time: the digest of
    ``t.to(torch.float64)`` without that copy (a large model's θ is kept in its own dtype).

    Examples
    --------
    >>> import torch
    >>> from volsk._fingerprint import AsFloat64, fingerprint
    >>> t = torch.linspace(0, 1, 7, dtype=torch.float32)
    >>> fingerprint(AsFloat64(t)) == fingerprint(t.double())
    True
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _feed(h, value):
    if isinstance(value, AsFloat64):
        flat = value.tensor.detach().reshape(-1)
        h.update(f"tensor:{torch.float64}:{tuple(value.tensor.shape)}:".encode())
        for start in range(0, flat.numel(), FEED_BLOCK):
            block = flat[start : start + FEED_BLOCK].to(torch.float64).cpu().contiguous()
            h.update(block.numpy())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            h.update(f"objects:{value.shape}:".encode())
            for v in value.reshape(-1):
                _feed(h, v)
        else:
            a = np.ascontiguousarray(value)
            h.update(f"array:{a.dtype.str}:{a.shape}:".encode())
            h.update(a.tobytes())
    elif isinstance(value, Mapping):
        h.update(f"map:{len(value)}:".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}:{len(value)}:".encode())
        for v in value:
            _feed(h, v)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, torch.nn.Module):
        h.update(f"module:{type(value).__qualname__}:".encode())
        _feed(h, dict(value.state_dict()))
    else:
        try:
            raw = pickle.dumps(value, protocol=4)
        except Exception:  # noqa: BLE001 - plain pickle refuses lambdas and local functions
            try:  # only for such objects; a dependency of joblib >= 1.5, vendored before
                import cloudpickle
            except ImportError:  # pragma: no cover
                from joblib.externals import cloudpickle

            raw = cloudpickle.dumps(value, protocol=4)
        h.update(f"pickle:{type(value).__qualname__}:".encode())
        h.update(raw)


def fingerprint(*values) -> str:
    """The SHA-256 hex digest of ``values`` (tensors, arrays, mappings, sequences, objects).

    Examples
    --------
    >>> import torch
    >>> from volsk._fingerprint import fingerprint
    >>> fingerprint(torch.zeros(2)) == fingerprint(torch.zeros(2))
    True
    >>> fingerprint(torch.zeros(2)) == fingerprint(torch.zeros(2, dtype=torch.float64))
    False
    """
    h = hashlib.sha256()
    for v in values:
        _feed(h, v)
    return h.hexdigest()
