"""How many intra-op threads torch uses while volsk fits: the ``n_threads`` parameter.

A fit of a small model is a long series of small tensor operations (batched forwards of a few
thousand parameters, root-finding steps). With several intra-op threads each operation pays
the threads' hand-over, and on a machine whose cores are busy with other work the waiting
threads stall it: one small fit then takes tens of times longer than on one thread. Large
models do enough work per operation for threads to pay. So ``n_threads="auto"`` runs models of
fewer than :data:`AUTO_MAX_PARAMETERS` trainable parameters on one thread and leaves torch's
setting alone above; ``benchmarks/threads.py`` measures the crossover (its table is in
``benchmarks/RESULTS.md``).

:func:`fit_threads` sets the number inside a ``with`` block and gives the caller's setting back
when the block ends, whether it returns, raises or is interrupted (KeyboardInterrupt). Under
torch's OpenMP backend the count is kept per thread (a new thread starts from the last value
set anywhere), so each fit saves and restores the setting of the thread it runs in: fits
running at the same time in threads of one process (joblib's threading backend) give each
caller its own setting back.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._checks import is_integer

__all__ = ["AUTO_MAX_PARAMETERS", "resolve_n_threads", "fit_threads", "trainable_parameters"]

# "auto": one thread below this many trainable parameters, torch's own setting from here on.
# benchmarks/threads.py, on a busy 2-core machine: one thread was faster at every size it
# measured, up to this one, by a factor that falls with size (9 at 5k parameters, 1.6 at 5M);
# above it, threads on idle cores pay
AUTO_MAX_PARAMETERS = 5_000_000


def trainable_parameters(model) -> int | None:
    """Trainable parameters of the network ``fit`` will estimate, or None if it is not one.

    ``model`` is what ``fit`` receives: a module, a fitted skorch net (its ``module_``) or a
    Pipeline ending in one. X is not transformed: only the network's size is read.

    Examples
    --------
    >>> import torch
    >>> from volsk._threads import trainable_parameters
    >>> trainable_parameters(torch.nn.Linear(3, 2))
    8
    >>> trainable_parameters("not a model") is None
    True
    """
    steps = getattr(model, "steps", None)  # a Pipeline: its last step is the net
    if isinstance(steps, list) and steps:
        model = steps[-1][1]
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "module_", None)
    if not isinstance(module, torch.nn.Module):
        return None
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def resolve_n_threads(n_threads, n_parameters) -> int | None:
    """The number of threads a fit runs with (None: leave torch's setting as it is).

    Parameters
    ----------
    n_threads : "auto", int >= 1 or None
        The estimator's parameter.
    n_parameters : int or None
        Trainable parameters of the model (None when unknown: "auto" then leaves torch's
        setting alone).

    Examples
    --------
    >>> from volsk._threads import resolve_n_threads
    >>> resolve_n_threads("auto", 4810)
    1
    >>> resolve_n_threads("auto", 50_000_000) is None
    True
    >>> resolve_n_threads(4, 4810)
    4
    """
    if n_threads is None:
        return None
    if isinstance(n_threads, str) and n_threads == "auto":
        if n_parameters is not None and n_parameters < AUTO_MAX_PARAMETERS:
            return 1
        return None
    if not is_integer(n_threads, 1):
        raise ValueError(
            f"n_threads must be 'auto', None or an integer >= 1, got {n_threads!r}"
        )
    return int(n_threads)


@contextmanager
def fit_threads(n_threads, model=None):
    """Run the ``with`` block with torch's intra-op threads set for fitting ``model``.

    The calling thread's setting (``torch.get_num_threads()``) is restored when the block ends,
    also when it raises or is interrupted.

    Parameters
    ----------
    n_threads : "auto", int >= 1 or None
        See :func:`resolve_n_threads`.
    model : torch.nn.Module, skorch net, Pipeline or None
        What ``fit`` was given; its size decides "auto".

    Examples
    --------
    >>> import torch
    >>> from volsk._threads import fit_threads
    >>> before = torch.get_num_threads()
    >>> with fit_threads("auto", torch.nn.Linear(3, 2)):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    n = resolve_n_threads(n_threads, None if model is None else trainable_parameters(model))
    previous = torch.get_num_threads()
    changed = n is not None and n != previous
    if changed:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if changed:
            torch.set_num_threads(previous)
