"""Named sets of flat parameter coordinates, held as runs: ``flat_parameters_``'s type.

A language model's unused embedding rows are millions of coordinates; naming each as a string
would take gigabytes. :class:`FlatCoordinates` keeps them as runs of consecutive flat indices
(a few numbers per run) and names a coordinate only when it is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["FlatCoordinates"]


def _as_runs(indices) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique flat indices as runs [starts[j], stops[j])."""
    flat = np.asarray(indices, dtype=np.int64).reshape(-1)
    if flat.size > 1 and not (flat[1:] > flat[:-1]).all():
        flat = np.sort(flat)  # (np.unique is an order of magnitude slower on millions)
        flat = flat[np.concatenate([[True], flat[1:] != flat[:-1]])]
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    starts = flat[np.concatenate([[0], breaks])]
    stops = flat[np.concatenate([breaks - 1, [flat.size - 1]])] + 1
    return starts.astype(np.int64), stops.astype(np.int64)


class FlatCoordinates(Sequence):
    """The names of some flat parameter coordinates, such as ``"0.weight[3, 7]"``, stored as runs.

    A read-only sequence of str (``len``, indexing, slicing, iteration, ``in``) that compares
    equal to a list or tuple of the same names; the names are formed only when read, so
    millions of coordinates cost a few numbers per run of consecutive ones.

    Parameters
    ----------
    names : sequence of str
        The parameter tensors' names, in the order their coordinates are flattened.
    shapes : sequence of tuple of int
        Their shapes.
    indices : array-like of int
        Flat indices (into all trainable coordinates, tensor after tensor, each in C order).

    Examples
    --------
    >>> from volsk.results import FlatCoordinates
    >>> flat = FlatCoordinates(["w", "b"], [(2, 3), (2,)], [1, 2, 6])
    >>> list(flat), len(flat), flat[-1]
    (['w[0, 1]', 'w[0, 2]', 'b[0]'], 3, 'b[0]')
    >>> flat == ["w[0, 1]", "w[0, 2]", "b[0]"], flat.counts()
    (True, {'w': 2, 'b': 1})
    """

    def __init__(self, names, shapes, indices=()):
        self.names = tuple(str(n) for n in names)
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        if len(self.names) != len(self.shapes):
            raise ValueError(f"got {len(self.names)} names but {len(self.shapes)} shapes")
        self._offsets = np.concatenate(
            [[0], np.cumsum([int(np.prod(s, dtype=np.int64)) for s in self.shapes])]
        ).astype(np.int64)
        self.starts, self.stops = _as_runs(indices)
        if self.starts.size and (self.starts[0] < 0 or self.stops[-1] > self._offsets[-1]):
            raise ValueError(f"flat indices must lie in [0, {int(self._offsets[-1])})")
        self._ends = np.cumsum(self.stops - self.starts)  # position after each run

    @classmethod
    def from_runs(cls, names, shapes, starts, stops) -> FlatCoordinates:
        """From runs [starts[j], stops[j]) of consecutive flat indices (sorted, disjoint)."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        stops = np.asarray(stops, dtype=np.int64).reshape(-1)
        if starts.shape != stops.shape or (stops <= starts).any() or (
                starts[1:] < stops[:-1]).any():
            raise ValueError("runs must be sorted, disjoint and non-empty: starts < stops")
        out = cls(names, shapes)
        if starts.size and (starts[0] < 0 or stops[-1] > out._offsets[-1]):
            raise ValueError(f"flat indices must lie in [0, {int(out._offsets[-1])})")
        out.starts, out.stops = starts, stops
        out._ends = np.cumsum(stops - starts)
        return out

    # -------------------------------------------------------------------------- the sequence

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends.size else 0

    def _flat_index(self, position: int) -> int:
        run = int(np.searchsorted(self._ends, position, side="right"))
        before = int(self._ends[run - 1]) if run else 0
        return int(self.starts[run]) + position - before

    def _name(self, flat: int) -> str:
        t = int(np.searchsorted(self._offsets, flat, side="right")) - 1
        shape = self.shapes[t]
        local = np.unravel_index(flat - int(self._offsets[t]), shape) if shape else ()
        return f"{self.names[t]}[{', '.join(str(int(c)) for c in local)}]"

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        position = int(item)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} flat coordinates")
        return self._name(self._flat_index(position))

    def __iter__(self):
        for start, stop in zip(self.starts.tolist(), self.stops.tolist()):
            for flat in range(start, stop):
                yield self._name(flat)

    def __contains__(self, name) -> bool:
        if not isinstance(name, str) or not name.endswith("]") or "[" not in name:
            return False
        tensor, _, inside = name[:-1].rpartition("[")
        if tensor not in self.names:
            return False
        t = self.names.index(tensor)
        try:
            local = tuple(int(c) for c in inside.split(",")) if inside.strip() else ()
            offset = int(np.ravel_multi_index(local, self.shapes[t])) if local else 0
        except ValueError:
            return False
        flat = int(self._offsets[t]) + offset
        run = int(np.searchsorted(self.starts, flat, side="right")) - 1
        return run >= 0 and flat < int(self.stops[run])

    def __eq__(self, other):
        if isinstance(other, FlatCoordinates):
            return (self.names == other.names and self.shapes == other.shapes
                    and np.array_equal(self.starts, other.starts)
                    and np.array_equal(self.stops, other.stops))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking sequences are unhashable, like list

    def __repr__(self):
        counts = self.counts()
        parts = ", ".join(f"{k}: {v:,}" for k, v in list(counts.items())[:4])
        more = "" if len(counts) <= 4 else f", … {len(counts) - 4} more tensors"
        return f"FlatCoordinates({len(self):,} coordinates{' — ' if parts else ''}{parts}{more})"

    # ----------------------------------------------------------------------------- extras

    def indices(self) -> np.ndarray:
        """The flat indices as one int64 array (8 bytes per coordinate)."""
        if not self.starts.size:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, b) for a, b in zip(self.starts, self.stops)])

    def counts(self) -> dict:
        """``{parameter name: number of its flat coordinates}``, tensors with any, in order."""
        out = {}
        for t, name in enumerate(self.names):
            lo, hi = self._offsets[t], self._offsets[t + 1]
            n = int(np.clip(np.minimum(self.stops, hi) - np.maximum(self.starts, lo), 0,
                            None).sum())
            if n:
                out[name] = n
        return out

    def to_record(self) -> dict:
        """A JSON-ready dict (lists of str and int) that :meth:`from_record` reads back."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "starts": self.starts.tolist(), "stops": self.stops.tolist()}

    @classmethod
    def from_record(cls, record) -> FlatCoordinates:
        """The inverse of :meth:`to_record`; ValueError for anything else."""
        try:
            names, shapes = record["names"], record["shapes"]
            starts, stops = record["starts"], record["stops"]
            ok = (isinstance(names, list) and all(isinstance(n, str) for n in names)
                  and isinstance(shapes, list)
                  and all(isinstance(s, list) and all(isinstance(d, int) for d in s)
                          for s in shapes)
                  and isinstance(starts, list) and isinstance(stops, list)
                  and all(isinstance(v, int) for v in starts + stops))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise ValueError("not a FlatCoordinates record")
        return cls.from_runs(names, shapes, starts, stops)
