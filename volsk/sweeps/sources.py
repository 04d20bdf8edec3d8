"""Model sources of sweeps and sharded fits: modules, factories and checkpoints, loaded where
they run.

A source travels to the worker that runs a task and becomes a model there: a module is shipped
as a CPU copy (never as CUDA tensors), a zero-argument factory or a :class:`Checkpoint` (a
``torch.save`` file or a Hugging Face ``save_pretrained`` directory) builds or loads its model
in the worker, so a sweep over many checkpoints never holds them all in memory. A worker
process keeps the last checkpoint it loaded (:func:`load_model`), so the tasks it runs for that
checkpoint — a sweep's grid rows, a sharded fit's shards — load it once.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._fingerprint import fingerprint

__all__ = ["Checkpoint"]

#: Checkpoints a process keeps loaded for its next tasks (one: a large model is large).
LOADED_MODELS = 1


@dataclass(frozen=True)
class Checkpoint:
    """A saved model, loaded only inside the worker that uses it.

    Either a file written by ``torch.save`` (a state dict, a checkpoint dict holding one, or a
    whole module), or a directory written by a Hugging Face model's ``save_pretrained``. A
    sweep over a hundred checkpoints then holds at most one model per worker in memory, and
    what travels to a worker is the path and the factory, never the weights. A worker keeps
    the last checkpoint it loaded for the next tasks that use it. The model is loaded on the
    CPU; the estimator places it on the worker's device (``device="auto"``: its GPU when it
    has one).

    Parameters
    ----------
    path : str or os.PathLike
        The file or directory; the workers read it (on a multi-machine cluster: a shared
        filesystem).
    factory : callable or class, optional
        For a file: a zero-argument callable returning a freshly built module, into which the
        saved state dict is loaded (not needed when the file holds a whole module, then
        ``weights_only=False``). For a directory: the model class, whose
        ``from_pretrained(path)`` loads it (e.g. ``transformers.GPTNeoXForCausalLM`` or
        ``transformers.AutoModelForCausalLM``).
    key : str, optional
        For a checkpoint dict (``{"model": state_dict, "optimizer": ..., "epoch": ...}``): the
        entry holding the model's state dict. None: the file is the state dict (or module).
    optimizer : callable, optional
        ``optimizer(model) -> torch.optim.Optimizer``. Its state is loaded from the
        ``optimizer_key`` entry of the checkpoint dict and passed to ``fit(..., optimizer=)``
        (for the "adam" preconditioners).
    optimizer_key : str, default="optimizer"
    weights_only : bool, default=True
        Passed to ``torch.load``. False is needed for a whole pickled module; use it only for
        files you trust.

    See Also
    --------
    volsk.sweeps.sweep : fits one row per (model source, parameter combination).
    volsk.sweeps.fit_sharded : one estimate, its directions split over workers.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> import volsk
    >>> path = os.path.join(tempfile.mkdtemp(), "step_100.pt")
    >>> torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    >>> ckpt = volsk.Checkpoint(path, lambda: torch.nn.Linear(3, 2))
    >>> ckpt.load().weight.shape
    torch.Size([2, 3])

    A Hugging Face directory is loaded by its class:

    >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    >>> config = GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
    ...                        num_attention_heads=2, intermediate_size=16)
    >>> directory = os.path.join(tempfile.mkdtemp(), "step_100")
    >>> GPTNeoXForCausalLM(config).save_pretrained(directory)
    >>> type(volsk.Checkpoint(directory, GPTNeoXForCausalLM).load()).__name__
    'GPTNeoXForCausalLM'
    """

    path: str | os.PathLike
    factory: object = None
    key: str | None = None
    optimizer: object = None
    optimizer_key: str = "optimizer"
    weights_only: bool = True

    def load(self):
        """The model (or ``{"model": model, "optimizer": optimizer}``), on the CPU."""
        if os.path.isdir(self.path):
            return self._load_pretrained()
        saved = torch.load(self.path, map_location="cpu", weights_only=self.weights_only)
        state = saved if self.key is None else saved[self.key]
        if isinstance(state, torch.nn.Module):
            model = state
        else:
            if self.factory is None:
                raise ValueError(
                    f"Checkpoint({os.fspath(self.path)!r}) holds a state dict: give a factory, "
                    "a zero-argument callable that builds the module to load it into"
                )
            model = self.factory()
            model.load_state_dict(state)
        if self.optimizer is None:
            return model
        optimizer = self.optimizer(model)
        optimizer.load_state_dict(saved[self.optimizer_key])
        return {"model": model, "optimizer": optimizer}

    def _load_pretrained(self):
        where = os.fspath(self.path)
        if not hasattr(self.factory, "from_pretrained"):
            raise ValueError(
                f"Checkpoint({where!r}) is a directory (a Hugging Face save_pretrained "
                "checkpoint): give its model class as factory, e.g. "
                "Checkpoint(path, transformers.AutoModelForCausalLM)"
            )
        if self.optimizer is not None:
            raise ValueError(
                f"Checkpoint({where!r}): optimizer state is read from torch.save files only; "
                "save the model and optimizer state dicts with torch.save to use it"
            )
        return self.factory.from_pretrained(where)

    def fingerprint(self):
        """(absolute path, size, modification time) of the file, or of every file of the
        directory: a changed checkpoint misses the caches."""
        if not os.path.isdir(self.path):
            stat = os.stat(self.path)
            return (os.path.abspath(self.path), stat.st_size, stat.st_mtime_ns)
        files = []
        for root, _dirs, names in sorted(os.walk(self.path)):
            for name in sorted(names):
                stat = os.stat(os.path.join(root, name))
                files.append((os.path.relpath(os.path.join(root, name), self.path),
                              stat.st_size, stat.st_mtime_ns))
        return (os.path.abspath(self.path), tuple(files))


class _CPUModule:
    """An nn.Module travelling to a worker: pickled as a CPU copy, never as CUDA tensors."""

    def __init__(self, module):
        self.module = module

    def __reduce__(self):
        return (_identity, (_cpu_copy(self.module),))

    def __sizeof__(self):
        # what it pickles to: joblib's dask backend then scatters it once per call (as it does
        # any argument over 1 kB shared by the tasks) instead of sending it with every task
        tensors = itertools.chain(self.module.parameters(), self.module.buffers())
        return object.__sizeof__(self) + sum(t.numel() * t.element_size() for t in tensors)


def _identity(obj):
    return obj


def _cpu_copy(module):
    """The module itself when it lives on the CPU, else a copy whose tensors are on the CPU."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    if all(t.device.type == "cpu" for t in tensors):
        return module
    memo = {}  # pre-filled so deepcopy never duplicates the device tensors
    for t in tensors:
        cpu = t.detach().to("cpu")
        if isinstance(t, torch.nn.Parameter):
            cpu = torch.nn.Parameter(cpu, requires_grad=t.requires_grad)
        memo[id(t)] = cpu
    return copy.deepcopy(module, memo)


def _check_models(models):
    """``models`` as a dict name -> source, or a TypeError/ValueError saying what to pass."""
    if not isinstance(models, Mapping):
        raise TypeError(
            "models must be a mapping name -> model, e.g. {'step_100': net} or "
            "{'step_100': Checkpoint(path, factory)}; got " + type(models).__name__
        )
    if len(models) == 0:
        raise ValueError("models is empty: give at least one model")
    for name, source in models.items():
        check_source(source, f"models[{name!r}]")
    return dict(models)


def check_source(source, what="source"):
    """``source`` if it is a model source, else a TypeError naming ``what`` and the fix."""
    if isinstance(source, str | os.PathLike):
        raise TypeError(
            f"{what} is a path; wrap it: Checkpoint(path, factory) (a state dict loaded into "
            "factory(), or a save_pretrained directory and its model class), or "
            "Checkpoint(path, weights_only=False) (a whole module)"
        )
    if not (
        isinstance(source, Checkpoint | torch.nn.Module)
        or callable(source)
        or hasattr(source, "module_")
        or hasattr(source, "steps")
    ):
        raise TypeError(
            f"{what} must be an nn.Module, a fitted skorch net or Pipeline, a zero-argument "
            f"callable returning one, or a Checkpoint; got {type(source).__name__}"
        )
    return source


def _load(source):
    """Turn a model source into (model, fit keyword arguments), inside the worker."""
    if isinstance(source, _CPUModule):
        source = source.module
    if isinstance(source, Checkpoint):
        loaded = source.load()
    elif isinstance(source, torch.nn.Module) or hasattr(source, "fit"):
        loaded = source  # a module, skorch net or Pipeline: fit accepts it as it is
    else:
        loaded = source()
    if isinstance(loaded, Mapping):
        if "model" not in loaded:
            raise ValueError(
                "a model factory returned a dict without a 'model' entry; return the model, or "
                "{'model': model, 'optimizer': optimizer}"
            )
        kwargs = {k: v for k, v in loaded.items() if k != "model"}
        unknown = set(kwargs) - {"optimizer", "attention_mask"}
        if unknown:
            raise ValueError(f"unknown fit arguments from a model factory: {sorted(unknown)}")
        return loaded["model"], kwargs
    return loaded, {}


# ------------------------------------------------------------- the worker's loaded checkpoint

_loaded: OrderedDict = OrderedDict()  # key -> (model, fit kwargs), in this process
_loaded_lock = threading.Lock()


def load_model(source):
    """``(model, fit keyword arguments)`` of a source, in the process that runs the task.

    A :class:`Checkpoint` is loaded once per process and kept for the next tasks that use it
    (the last ``LOADED_MODELS``, keyed by its file's identity and its fields); tasks running
    at the same time in threads share the one model, which fits never modify. Other sources
    are turned into a model each time.
    """
    if isinstance(source, _CPUModule):
        source = source.module
    if not isinstance(source, Checkpoint):
        return _load(source)
    key = fingerprint(source.fingerprint(), source)
    with _loaded_lock:  # one load at a time: threads asking for the same checkpoint wait for it
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
        while len(_loaded) >= LOADED_MODELS:  # free the old model before loading the new one
            _loaded.popitem(last=False)
        _loaded[key] = _load(source)
        return _loaded[key]


def clear_loaded():
    """Forget the checkpoints this process keeps loaded (the caller's, at the end of a run)."""
    with _loaded_lock:
        _loaded.clear()


def _ship(source):
    """What travels to the worker: a module as its CPU copy, any other source as it is."""
    return _CPUModule(source) if isinstance(source, torch.nn.Module) else source
