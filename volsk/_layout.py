"""Where the active coordinates sit in the flat parameter vector, walked block by block.

Directions move in the active coordinates only (flat ones integrated out are left out), and a
large model's direction is generated a block of active coordinates at a time. An
:class:`ActiveLayout` maps a block of active positions [start, stop) to the full coordinates it
occupies: a slice when the block lies in one run of consecutive active coordinates (always,
when nothing is flat), else an index tensor built for that block only. Its memory is two
integers per run of active coordinates, never one per coordinate.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ActiveLayout", "BLOCK"]

BLOCK = 1 << 16  # coordinates per block: a float64 block (512 KiB) stays in a core's cache


class ActiveLayout:
    """The active coordinates of an n-vector, as runs of consecutive full coordinates.

    Parameters
    ----------
    n : int
        Length of the full vector.
    flat : array-like of int
        Indices of the coordinates that are not active.

    Examples
    --------
    >>> from volsk._layout import ActiveLayout
    >>> layout = ActiveLayout(6, [1, 2])
    >>> layout.n_active
    4
    >>> [(start, stop, sel) for start, stop, sel in layout.blocks(2)]
    [(0, 2, tensor([0, 3])), (2, 4, slice(4, 6, None))]
    """

    def __init__(self, n: int, flat=()):
        mask = np.ones(int(n), dtype=bool)
        flat = np.asarray(flat, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise ValueError(f"flat indices must lie in [0, {n}), got {flat.min()}…{flat.max()}")
        mask[flat] = False
        edges = np.diff(mask.astype(np.int8), prepend=0, append=0)
        self._from_runs(mask.size, np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> ActiveLayout:
        """The layout of a boolean (n,) mask of active coordinates, read a block at a time."""
        mask = torch.as_tensor(mask).reshape(-1)
        starts, stops, before = [], [], False
        for first in range(0, mask.numel(), 16 * BLOCK):
            block = mask[first : first + 16 * BLOCK].cpu()
            if bool(block.all()) and before or not bool(block.any()) and not before:
                continue  # no step inside this block nor at its start
            steps = torch.diff(block.to(torch.int8),
                               prepend=torch.tensor([int(before)], dtype=torch.int8))
            starts.append(torch.nonzero(steps == 1).flatten() + first)
            stops.append(torch.nonzero(steps == -1).flatten() + first)
            before = bool(block[-1])
        if before:
            stops.append(torch.tensor([mask.numel()]))
        layout = cls.__new__(cls)
        layout._from_runs(mask.numel(), torch.cat(starts or [torch.zeros(0, dtype=torch.long)]),
                          torch.cat(stops or [torch.zeros(0, dtype=torch.long)]))
        return layout

    def _from_runs(self, n, run_start, run_stop):
        """From the full coordinates where each run of active coordinates starts and stops."""
        run_start, run_stop = np.asarray(run_start), np.asarray(run_stop)
        lengths = run_stop - run_start
        self.n = int(n)
        self.n_active = int(lengths.sum())
        # run j starts at active position starts[j]; its full coordinates are shifted by
        # shifts[j] (the number of flat coordinates before it)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._starts = starts if starts.size else np.zeros(1, np.int64)
        self._shifts = (run_start - starts) if starts.size else np.zeros(1, np.int64)

    @property
    def all_active(self) -> bool:
        return self.n_active == self.n

    def select(self, start: int, stop: int, device="cpu"):
        """The full coordinates of active positions [start, stop): a slice or an index tensor."""
        j = int(np.searchsorted(self._starts, start, side="right") - 1)
        j_stop = int(np.searchsorted(self._starts, stop - 1, side="right") - 1)
        if j == j_stop:
            shift = int(self._shifts[j])
            return slice(start + shift, stop + shift)
        bounds = np.clip(self._starts[j : j_stop + 1], start, stop)
        lengths = np.diff(np.concatenate([bounds, [stop]]))
        index = np.arange(start, stop) + np.repeat(self._shifts[j : j_stop + 1], lengths)
        return torch.from_numpy(index).to(device)

    def blocks(self, size: int = BLOCK, device="cpu"):
        """``(start, stop, sel)`` for consecutive blocks of ``size`` active positions."""
        for start in range(0, self.n_active, size):
            stop = min(start + size, self.n_active)
            yield start, stop, self.select(start, stop, device)
