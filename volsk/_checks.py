"""Argument checks shared by volsk's entry points: one meaning of "an integer" everywhere.

An integer argument is a Python or NumPy integer (anything registered as
:class:`numbers.Integral`) and never a bool, whose ``True`` would otherwise pass as 1.
"""

from __future__ import annotations

from numbers import Integral

__all__ = ["is_integer", "check_int"]


def is_integer(value, least: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool), at least ``least`` when given.

    Examples
    --------
    >>> import numpy as np
    >>> from volsk._checks import is_integer
    >>> is_integer(3, 1), is_integer(np.int64(0), 1), is_integer(True), is_integer(2.0)
    (True, False, False, False)
    """
    return (isinstance(value, Integral) and not isinstance(value, bool)
            and (least is None or bool(value >= least)))


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, or a ValueError naming ``name`` and the allowed range.

    Examples
    --------
    >>> from volsk._checks import check_int
    >>> check_int("epochs", 3, low=1)
    3
    """
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value
