"""Handing freed heap memory back to the operating system between large-model evaluations.

A language model's evaluations allocate and free blocks of a few to a few tens of MiB (a data
batch's logits, the KL's chunks, a JVP's duals). glibc serves blocks under its mmap threshold
(adaptive, up to 32 MiB) from its heap and keeps what is freed there; interleaved with blocks
that live on, the heap fragments and the process's resident memory creeps up with every
direction although the live memory does not. :func:`trim` asks glibc to return the free pages
(``malloc_trim(0)``, as dask's workers do); elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["trim"]


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the C heap's free pages to the operating system; True if any were returned.

    Examples
    --------
    >>> from volsk._memory import trim
    >>> trim() in (True, False)
    True
    """
    return bool(_TRIM(0)) if _TRIM is not None else False
