"""Random draws of code run in one thread, routed to generators of its own.

:class:`PrivateDraws` is a torch dispatch mode: while it is active in a thread, every random
kernel that thread runs (``Tensor.uniform_``/``normal_``, ``torch.nn.init``, ``torch.randn``,
``torch.randperm``...) draws from the mode's own generators, seeded by the mode. torch's global
generators are neither read nor advanced, and other threads' draws are untouched — dispatch
modes are thread-local. The numbers are those that seeding torch's global generator with the
same seed would give: the same kernels draw from the same kind of generator, in the same
order. volsk.priors re-initialises model copies under it.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PrivateDraws"]

# held while a kernel without a generator argument draws from a global generator whose state
# is swapped for a mode's own (see PrivateDraws._swapped)
_GLOBAL_GENERATOR_LOCK = threading.Lock()


@functools.cache
def _route(func):
    """How a kernel draws: ``("pass",)`` (not random), ``("inject",)`` (takes a generator),
    ``("overload", op)`` (a sibling overload takes one, e.g. ``randn.default`` →
    ``randn.generator``) or ``("swap",)`` (none does)."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return ("pass",)
    names = [a.name for a in func._schema.arguments]
    if "generator" in names:
        return ("inject",)
    packet = func.overloadpacket
    for overload in packet.overloads():
        op = getattr(packet, overload)
        others = [a.name for a in op._schema.arguments]
        if "generator" in others and [n for n in others if n != "generator"] == names:
            return ("overload", op)
    return ("swap",)


def _device_of(args, kwargs):
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device
    device = kwargs.get("device")
    if device is not None:
        return torch.device(device)
    default = getattr(torch, "get_default_device", None)  # torch >= 2.3
    return default() if default is not None else torch.device("cpu")


def _global_generator(device):
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.default_generators[index]
    return None


class PrivateDraws(TorchDispatchMode):
    """Routes the random draws of the code run under it to generators of its own.

    torch's dispatch modes are thread-local, so only the entering thread's draws are routed.
    A kernel with a ``generator`` argument left at None gets this mode's generator for its
    device; one without gets its sibling overload that takes a generator; the rest draw from
    the global generator of their device with its state swapped for this mode's (under a
    process-wide lock, restored before it is released). One generator per device, created
    when first needed, seeded with the last :meth:`manual_seed`.

    Examples
    --------
    >>> import torch
    >>> from volsk._private_draws import PrivateDraws
    >>> state = torch.get_rng_state()
    >>> draws = PrivateDraws()
    >>> draws.manual_seed(3)
    >>> with draws:
    ...     a = torch.empty(4).uniform_()
    ...     b = torch.randn(2)  # no generator argument: its sibling overload takes draws' own
    >>> reference = torch.Generator().manual_seed(3)
    >>> torch.equal(a, torch.empty(4).uniform_(generator=reference))
    True
    >>> torch.equal(b, torch.randn(2, generator=reference))
    True
    >>> torch.equal(torch.get_rng_state(), state)  # the global generator was not used
    True
    """

    def __init__(self):
        super().__init__()
        self._seed = 0
        self._generators = {}

    @classmethod
    def _should_skip_dynamo(cls):
        # torch would wrap __torch_dispatch__ in torch._dynamo.disable, whose first call
        # imports torch._dynamo (seconds); nothing is compiled under this mode
        return False

    def manual_seed(self, seed):
        """Seed every generator of this mode (and those it creates later) with ``seed``."""
        self._seed = int(seed)
        for generator in self._generators.values():
            generator.manual_seed(self._seed)

    def _generator(self, device):
        if device not in self._generators:
            try:
                self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
            except RuntimeError:  # a device with no generators (meta): nothing is drawn
                self._generators[device] = None
        return self._generators[device]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        route = _route(func)
        if route[0] == "pass" or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        device = _device_of(args, kwargs)
        generator = self._generator(device)
        if generator is None:
            return func(*args, **kwargs)
        if route[0] == "inject":
            return func(*args, **{**kwargs, "generator": generator})
        if route[0] == "overload":
            return route[1](*args, **{**kwargs, "generator": generator})
        return self._swapped(func, device, generator, args, kwargs)

    @staticmethod
    def _swapped(func, device, generator, args, kwargs):
        shared = _global_generator(device)
        if shared is None:
            return func(*args, **kwargs)
        with _GLOBAL_GENERATOR_LOCK:
            saved = shared.get_state()
            shared.set_state(generator.get_state())
            try:
                return func(*args, **kwargs)
            finally:
                generator.set_state(shared.get_state())
                shared.set_state(saved)
