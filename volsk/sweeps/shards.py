"""What a sharded fit's workers run: the pilot task and the shard tasks, on a problem each
worker prepares once.

A task receives the model source, X, and the small :class:`Question` every task of one fit
shares. The problem (volsk's private copy of the model, its outputs on X, the bound measure
and preconditioner) is prepared in the worker and kept there (:data:`PREPARED_PROBLEMS`), so a
worker prepares it once for all the shards it runs. The first task, :func:`pilot_task`, also
runs the pilots that fix the map of the estimate (the eps and exponent pilot of "auto", the
rounds of a boundary-fitted preconditioner) and the search pilot; their outcome
(:class:`Pilot`: the map's choice, not the map) travels with every :func:`shard_task`, which
binds its own problem to the same map and returns the records of its contiguous range of
directions (:class:`Shard`). Warnings raised in a worker process are sent back with the
result, to be raised again in the caller.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import volsk._pipeline as pipeline

from .._fingerprint import fingerprint
from .._threads import fit_threads, resolve_n_threads, trainable_parameters
from ..estimator import LocalVolumeEstimator
from ..preconditioners import EPS_GRID
from ..preconditioners.curvature.optimizer_state import load_optimizer_state
from ..results import DirectionRecords
from .sources import load_model

__all__ = []

#: Prepared problems a worker process keeps for its next shards (one: it holds a model copy).
PREPARED_PROBLEMS = 1


@dataclass(frozen=True)
class Question:
    """What every task of one sharded fit shares; small, it travels with each task."""

    estimator: LocalVolumeEstimator  # unfitted: its parameters (extending: "auto" exponent
    # replaced by the fit's choice, as partial_fit binds it)
    seed: int
    key: str  # the worker's problem cache key
    n_directions: int  # what one process's fit prepares its problem for (batch-size choice)
    parent_pid: int
    generator: str = "host"  # the direction generator, resolved once for the whole run


@dataclass(frozen=True)
class Pilot:
    """The first task's outcome: the pilots' results and what the estimator needs to finish."""

    choice: pipeline.MapChoice  # eps, exponent and boundary fit: what every shard binds
    start: pipeline.SearchStart
    summary: pipeline.ProblemSummary
    data_fingerprint: str  # the estimator's fingerprint of (anchor, data, labels)
    content: str  # ... and of the optimizer state: what the shards' cache key rests on
    n_threads: int | None  # torch threads for the shards (the estimator's n_threads resolved)
    device: str


@dataclass(frozen=True)
class Shard:
    first: int
    stop: int
    records: DirectionRecords
    device: str
    seconds: float


# ------------------------------------------------------------------------ in the worker

_problems: OrderedDict = OrderedDict()  # (question key, binding) -> _Prepared, in this process
_problems_lock = threading.Lock()


@dataclass(frozen=True)
class _Prepared:
    problem: object  # volsk._problem.Problem
    n_threads: int | None  # the estimator's n_threads resolved for this model
    optimizer: str | None  # fingerprint of the optimizer state the problem was bound with


def _binding(eps, choice):
    """What a kept problem is bound with: ``eps`` alone (the pilot's start: the parameters'
    exponent, no boundary fit applied), or a pilot's :class:`~volsk._pipeline.MapChoice`."""
    if choice is None:
        return (float(eps),)
    boundary = None if choice.boundary is None else choice.boundary.tobytes()
    return (choice.bind_eps, choice.bind_exponent, boundary)


def _prepared(source, X, y, attention_mask, question, eps, choice=None) -> _Prepared:
    """The question's problem bound with ``eps`` (``choice``: bound to the map a pilot
    chose): prepared once per process, then kept."""
    eps = float(eps) if choice is None else choice.bind_eps
    key = (question.key, _binding(eps, choice))
    with _problems_lock:  # one preparation at a time: threads of one worker share it
        if key in _problems:
            _problems.move_to_end(key)
            return _problems[key]
        while len(_problems) >= PREPARED_PROBLEMS:  # free the old copy before making a new one
            _problems.popitem(last=False)
        model, kwargs = load_model(source)
        if attention_mask is None:
            attention_mask = kwargs.get("attention_mask")
        optimizer = kwargs.get("optimizer")
        est = question.estimator
        n_threads = resolve_n_threads(est.n_threads, trainable_parameters(model))
        exponent = None if choice is None else choice.bind_exponent
        with fit_threads(n_threads):
            problem = pipeline.prepare(model, X, y,
                                       est._settings(exponent, generator=question.generator),
                                       eps=eps,
                                       n_directions=question.n_directions, seed=question.seed,
                                       optimizer=optimizer, attention_mask=attention_mask)
            if choice is not None:  # the pilot's boundary fit applied, not fitted again
                problem = pipeline.bind_map(problem, choice)
        state = None if optimizer is None else fingerprint(_optimizer_state(optimizer))
        _problems[key] = _Prepared(problem, n_threads, state)
        return _problems[key]


def _optimizer_state(optimizer):
    """What an optimizer argument holds: a live optimizer's, a dict's or a file's state_dict."""
    if isinstance(optimizer, str | os.PathLike):
        return load_optimizer_state(optimizer)
    return optimizer if isinstance(optimizer, dict) else optimizer.state_dict()


def _keep(question, choice, prepared):
    with _problems_lock:
        _problems[(question.key, _binding(None, choice))] = prepared
        while len(_problems) > PREPARED_PROBLEMS:
            _problems.popitem(last=False)


def clear_prepared():
    """Forget the problems this process keeps prepared (the caller's, at the end of a run)."""
    with _problems_lock:
        _problems.clear()


class _Caught:
    """Warnings raised in a worker process, sent back to be raised again in the caller."""

    def __init__(self, question):
        self.foreign = os.getpid() != question.parent_pid
        self.caught = []

    def __enter__(self):
        if self.foreign:  # catch_warnings is process-wide: never in the caller's threads
            self._context = warnings.catch_warnings(record=True)  # the worker's filters apply
            self.caught = self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.foreign:
            self._context.__exit__(*exc)

    def messages(self):
        # deprecations are about the worker's libraries, not about this estimate
        return [(w.category, str(w.message)) for w in self.caught
                if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]


def pilot_task(source, X, y, attention_mask, question, eps):
    """Prepare the problem, run the pilots; return a :class:`Pilot` and the worker's warnings.

    The map of the estimate is chosen by :func:`volsk._pipeline.choose_map`, what ``fit``
    runs, with the same arguments: the pilot's choice is ``fit``'s.
    """
    with _Caught(question) as caught:
        prepared = _prepared(source, X, y, attention_mask, question,
                             EPS_GRID[0] if isinstance(eps, str) else eps)
        est = question.estimator
        with fit_threads(prepared.n_threads):
            problem, choice = pipeline.choose_map(
                prepared.problem, eps, est.preconditioner_exponent,
                n_samples=question.n_directions, seed=question.seed)
            # this worker's shards find the problem bound to the chosen map
            prepared = _Prepared(problem, prepared.n_threads, prepared.optimizer)
            _keep(question, choice, prepared)
            start = pipeline.calibrate_search(problem, question.seed)
        data = LocalVolumeEstimator._data_fingerprint(problem, y)
    pilot = Pilot(choice, start, pipeline.summarise(problem), data,
                   fingerprint(data, prepared.optimizer), prepared.n_threads,
                   problem.evaluator.device.type)
    return pilot, caught.messages()


def check_device(generator, device, pilot_device):
    """Raise ValueError when a "device"-generator shard runs on another kind of device than
    the pilot: its directions would be another generator's (not the estimate's)."""
    if generator == "device" and device != pilot_device:
        raise ValueError(
            f'generator="device": a shard ran on a {device} device but the pilot on a '
            f"{pilot_device} one, and each kind of device draws other directions. Run every "
            'shard on one kind of device (set device=...) or use generator="host", whose '
            "directions are the same everywhere."
        )


def shard_task(source, X, y, attention_mask, question, pilot, first, stop):
    """The records of directions ``first … stop − 1``; a :class:`Shard` and the warnings."""
    with _Caught(question) as caught:
        problem = _prepared(source, X, y, attention_mask, question, None,
                            pilot.choice).problem
        check_device(question.generator, problem.evaluator.device.type, pilot.device)
        began = time.perf_counter()
        with fit_threads(pilot.n_threads):
            records = pipeline.estimate_directions(problem, range(first, stop), question.seed,
                                                   start=pilot.start)
        seconds = time.perf_counter() - began
    shard = Shard(first, stop, records, problem.evaluator.device.type, seconds)
    return shard, caught.messages()
