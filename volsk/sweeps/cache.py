"""Result caches of sweeps and sharded fits: content keys, and JSON records checked on read.

A record is one JSON file holding the answer to one question (a sweep row, a shard of
directions, a sharded fit's pilot). It carries the key of the question it answers: the
SHA-256 fingerprint (:func:`volsk._fingerprint.fingerprint`) of everything its numbers depend
on. Reading checks the record against the key it is read for and against its own layout, so a
file that is truncated, garbled, incomplete, or copied over another question's file is a miss
(the caller recomputes it and says why under ``verbose``), never a wrong answer and never a
crash. Writes are atomic (a temporary file renamed over the target), so an interrupted write
leaves no half record.
"""

from __future__ import annotations

import json
import os
import sys
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import volsk._pipeline as pipeline

from .._fingerprint import fingerprint
from .._version import __version__
from ..preconditioners.boundary import ROUND_COLUMNS
from ..preconditioners.selection import PILOT_COLUMNS
from ..results import SAMPLE_COLUMNS, STATUS, DirectionRecords, FlatCoordinates
from .shards import Pilot, Shard
from .sources import Checkpoint

__all__ = []

#: Version of the record layout and of the keys; records of another format are misses.
CACHE_FORMAT = 4
#: Parameters that cannot change an estimate's numbers: left out of every key.
NOT_IN_KEY = ("n_jobs", "verbose", "n_threads")


class DamagedRecord(ValueError):
    """A cache file that cannot be used as the answer it is read for (the message says why)."""


def data_fingerprint(X, y, *extra) -> str:
    """The fingerprint of the data every row (or shard) shares, computed once per call."""
    return fingerprint("data", X, y, *extra)


def source_fingerprint(source):
    """What identifies a model source without loading it, or None (a factory: unknown)."""
    if isinstance(source, Checkpoint):
        return ("checkpoint", source.fingerprint(), source.key, source.optimizer_key)
    if isinstance(source, torch.nn.Module):
        return ("module", source)  # its class and state dict
    if hasattr(source, "module_") or hasattr(source, "steps"):
        return ("estimator", source)  # a skorch net or Pipeline: pickled as it is
    return None


def estimator_params(estimator, leave_out=()):
    """The estimator's parameters that a result depends on (everything but ``NOT_IN_KEY``).

    ``generator`` enters resolved, and only when it is "device": a "host" fit's key is the
    one it had before the parameter existed (its numbers are the same).
    """
    params = {k: v for k, v in estimator.get_params(deep=False).items()
              if k not in NOT_IN_KEY and k not in leave_out}
    if "generator" in params and hasattr(estimator, "_generator"):
        del params["generator"]
        if estimator._generator() != "host":
            params["generator"] = estimator._generator()
    return params


def cache_key(name, source, estimator, data) -> str:
    """The key (and file name, without suffix) of the sweep row fitting ``estimator`` to
    ``source`` on ``data``."""

    return fingerprint(
        {
            "format": CACHE_FORMAT,
            "volsk": __version__,
            "estimator": type(estimator).__qualname__,
            "model": name,
            "source": source_fingerprint(source),
            "params": estimator_params(estimator),
            "data": data,
        }
    )


# ---------------------------------------------------------------------------- reading, writing


def read_record(path, key):
    """The record at ``path`` if it is whole JSON of this format answering ``key``.

    Returns ``(record, reason)``: ``(None, None)`` when there is no file, ``(None, reason)``
    when the file cannot be used (unreadable, not JSON, another format, another key).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        return None, f"is not readable JSON ({type(exc).__name__})"
    if not isinstance(record, dict):
        return None, "does not hold a record"
    if record.get("format") != CACHE_FORMAT:
        return None, f"has format {record.get('format')!r}, not {CACHE_FORMAT}"
    if record.get("key") != key:
        return None, "answers another question (its key differs: a file copied or renamed?)"
    return record, None


def write_record(path, record):
    """Write ``record`` as JSON to ``path``; atomic, so an interrupted write leaves no half row."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


def say(verbose, message):
    """Print ``message`` to stderr when ``verbose`` (cache misses of damaged files)."""
    if verbose:
        print(f"volsk: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- checking parts


def field(record, name, kind):
    """``record[name]`` if it is a ``kind``, else :class:`DamagedRecord` naming the field."""
    if not isinstance(record, dict) or name not in record:
        raise DamagedRecord(f"has no {name!r} entry")
    value = record[name]
    if kind is Real:  # JSON numbers, Infinity and NaN; not bools
        ok = isinstance(value, Real) and not isinstance(value, bool)
    elif kind is Integral:
        ok = isinstance(value, Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise DamagedRecord(f"has a {type(value).__name__} as {name!r}")
    return value


def check_result(result, columns):
    """A sweep row's results: every column a number (``seed`` and counts integers)."""
    for column in columns:
        kind = Integral if column in ("seed", "n_parameters", "n_evaluations") else Real
        field(result, column, kind)
    return result


def records_from_columns(samples, first, stop) -> DirectionRecords:
    """The per-direction records ``first … stop − 1`` stored as columns of plain lists.

    Raises :class:`DamagedRecord` unless every column of ``SAMPLE_COLUMNS`` is there with
    ``stop − first`` numbers, the directions are exactly ``first … stop − 1`` and every
    status is a known code.
    """
    if not isinstance(samples, dict):
        raise DamagedRecord("has no per-direction columns")
    size = stop - first
    for column in SAMPLE_COLUMNS:
        values = samples.get(column)
        if not isinstance(values, list):
            raise DamagedRecord(f"has no per-direction column {column!r}")
        if len(values) != size:
            raise DamagedRecord(f"has {len(values)} values of {column!r}, not {size}")
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise DamagedRecord(f"has a value of {column!r} that is not a number")
    records = DirectionRecords(**{c: samples[c] for c in SAMPLE_COLUMNS})
    if not np.array_equal(records.direction, np.arange(first, stop)):
        raise DamagedRecord(f"holds other directions than {first}…{stop - 1}")
    if not set(records.status.tolist()) <= set(STATUS):
        raise DamagedRecord("has an unknown status code")
    integers = [samples[c] for c in ("direction", "evaluations", "status")]
    if not all(float(v).is_integer() for values in integers for v in values):
        raise DamagedRecord("has a fractional direction, status or count")
    return records


def columns_of(records: DirectionRecords) -> dict:
    """Records as JSON-ready columns of plain lists (floats round-trip exactly)."""
    return {c: getattr(records, c).tolist() for c in SAMPLE_COLUMNS}


# --------------------------------------------------------- a sharded fit's pilot and shards


def _columns(table):
    return None if table is None else {c: table[c].tolist() for c in table.columns}


def _table(record, name, columns):
    """The table ``record[name]`` (columns of equal-length lists, or None) as a DataFrame."""
    table = record.get(name, "missing")
    if table is None:
        return None
    if not (isinstance(table, dict) and set(table) == set(columns)
            and len({len(v) if isinstance(v, list) else -1 for v in table.values()}) == 1
            and all(isinstance(v, list) for v in table.values())):
        raise DamagedRecord(f"has no valid {name!r} entry")
    # built as the pilot builds it (an empty table: no pilot ran)
    empty = not any(table.values())
    return pd.DataFrame(columns=list(columns)) if empty else pd.DataFrame(
        table, columns=list(columns))


def _number_or_none(record, name):
    value = record.get(name, "missing")
    if not (value is None or isinstance(value, int | float)) or isinstance(value, bool):
        raise DamagedRecord(f"has no valid {name!r} entry")
    return value


def _pilot_record(pilot, key):
    choice = pilot.choice
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "eps": choice.eps,
        "bind_eps": choice.bind_eps,
        "eps_table": _columns(choice.eps_table),
        "exponent": choice.exponent,
        "bind_exponent": choice.bind_exponent,
        "boundary": None if choice.boundary is None else choice.boundary.tolist(),
        "boundary_table": _columns(choice.boundary_table),
        "boundary_evaluations": choice.boundary_evaluations,
        "start": [pilot.start.radius, pilot.start.slope, pilot.start.bend,
                  pilot.start.evaluations],
        "summary": [pilot.summary.n_parameters, pilot.summary.flat.to_record(),
                    pilot.summary.is_probability],
        "data_fingerprint": pilot.data_fingerprint,
        "content": pilot.content,
        "n_threads": pilot.n_threads,
        "device": pilot.device,
    }


def _pilot_from_record(record):
    """The :class:`Pilot` a record holds, or :class:`DamagedRecord`."""
    boundary = record.get("boundary", "missing")
    if boundary is not None:
        if not (isinstance(boundary, list) and boundary and all(
                isinstance(v, float) for v in boundary)):
            raise DamagedRecord("has no valid 'boundary' entry")
        boundary = np.array(boundary, dtype=np.float64)  # floats round-trip JSON exactly
    choice = pipeline.MapChoice(
        eps=_number_or_none(record, "eps"),
        exponent=_number_or_none(record, "exponent"),
        bind_eps=float(field(record, "bind_eps", float)),
        bind_exponent=_number_or_none(record, "bind_exponent"),
        eps_table=_table(record, "eps_table", PILOT_COLUMNS),
        boundary=boundary,
        boundary_table=_table(record, "boundary_table", ROUND_COLUMNS),
        boundary_evaluations=field(record, "boundary_evaluations", Integral),
    )
    start = field(record, "start", list)
    summary = field(record, "summary", list)
    try:
        radius, slope, bend, evaluations = start
        n_parameters, flat, is_probability = summary
        ok = (radius is None or isinstance(radius, float)) and isinstance(slope, float) \
            and isinstance(bend, float) and isinstance(evaluations, int) \
            and isinstance(n_parameters, int) and isinstance(is_probability, bool)
        flat = FlatCoordinates.from_record(flat)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DamagedRecord("has no valid 'start' or 'summary' entry")
    n_threads = record.get("n_threads", "missing")
    if not (n_threads is None or isinstance(n_threads, int)):
        raise DamagedRecord("has no valid 'n_threads' entry")
    return Pilot(
        choice=choice,
        start=pipeline.SearchStart(radius, slope, bend, evaluations),
        summary=pipeline.ProblemSummary(n_parameters, flat, is_probability),
        data_fingerprint=field(record, "data_fingerprint", str),
        content=field(record, "content", str),
        n_threads=n_threads,
        device=field(record, "device", str),
    )


def _shard_record(shard, key):
    return {"format": CACHE_FORMAT, "key": key, "first": shard.first, "stop": shard.stop,
            "device": shard.device, "seconds": shard.seconds,
            "samples": columns_of(shard.records)}


def _shard_from_record(record, first, stop):
    if field(record, "first", Integral) != first or field(record, "stop", Integral) != stop:
        raise DamagedRecord(f"holds another range than its name, {first}…{stop - 1}")
    records = records_from_columns(field(record, "samples", dict), first, stop)
    return Shard(first, stop, records, field(record, "device", str),
                  float(field(record, "seconds", float)))


class ShardStore:
    """The pilot and shard records of one sharded fit under ``cache_dir`` (or nowhere)."""

    def __init__(self, cache_dir, verbose):
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.verbose = verbose
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _read(self, path, key, parse):
        record, reason = read_record(path, key)
        if record is not None:
            try:
                return parse(record)
            except DamagedRecord as exc:
                reason = str(exc)
        if reason is not None:
            say(self.verbose, f"cache file {path} {reason}; recomputing it")
        return None

    def pilot(self, key):
        if self.dir is None or key is None:
            return None
        return self._read(self.dir / f"{key}.json", key, _pilot_from_record)

    def save_pilot(self, key, pilot):
        if self.dir is not None and key is not None:
            write_record(self.dir / f"{key}.json", _pilot_record(pilot, key))

    def shards(self, key, first, stop):
        """Cached shards within ``first … stop − 1``: {start: [shard, ...]}; damaged files
        are said and removed (their directions are computed again)."""
        found = {}
        if self.dir is None:
            return found
        for path in sorted(self.dir.glob(f"{key}-*-*.json")):
            try:
                a, b = (int(part) for part in path.stem[len(key) + 1:].split("-"))
            except ValueError:
                continue
            if not first <= a < b <= stop:
                continue
            shard = self._read(path, key, lambda r, a=a, b=b: _shard_from_record(r, a, b))
            if shard is None:
                path.unlink(missing_ok=True)
            else:
                found.setdefault(a, []).append(shard)
        return found

    def save_shard(self, key, shard):
        if self.dir is not None:
            path = self.dir / f"{key}-{shard.first:09d}-{shard.stop:09d}.json"
            write_record(path, _shard_record(shard, key))
