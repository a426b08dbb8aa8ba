"""Giving the C heap's free memory back to the system after a backlog.

A backlog (fixes held through a store outage, a flood of gateway calls) is built of
many small blocks: requests, their columns, the processors' pieces. Freed, they go
back to glibc's malloc, which keeps them in its arenas' free lists for reuse and
returns to the system only the free space at the top of each heap, so a process
keeps its peak size long after the backlog is gone. ``malloc_trim`` gives back
every free page. Other C libraries (musl, macOS) have no such call: nothing is done
there.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (it takes a few to tens of
    milliseconds for a heap of hundreds of MB: call it off the event loop, ctypes
    lets go of the GIL meanwhile); whether there was a way to."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def resident_bytes() -> int:
    """The process's resident memory now, bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
