"""Handing freed C heap memory back to the operating system.

glibc keeps memory that C code (GEOS, numpy, gRPC core) freed inside its heaps and
returns it only from the top of a heap. Building a fence index for 1,000 fences
allocates about 125 MB in a worker thread and frees nearly all of it; without a trim
that memory stays resident for the life of the process, as much as 10,000 idle
streams hold (bench/README.md, "Memory per stream"). ``malloc_trim`` releases the
free pages of every heap; elsewhere than glibc there is nothing to call and nothing
is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _find_trim()


def can_release() -> bool:
    """Whether this C library can hand free heap memory back (glibc)."""
    return _TRIM is not None


def release_free_memory() -> bool:
    """Return the free pages of every C heap to the system; True if any were."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
