"""Giving freed memory back to the system.

Owns: when the C heap's free memory is handed back (glibc's
``malloc_trim``). Python frees a dead peer's backlog at once, but glibc
keeps freed heap pages for reuse, so after a stuck peer with 16 MiB queued,
or a 100 MiB backlog routed again, the router's RSS stayed up to 150 MiB
above where it started though nothing lived there (docs/reliability.md,
probes 1 and 2). ``HeapTrimmer.check`` runs with the router's one-second
timers: when more than ``threshold`` bytes of the heap have been freed
since it last looked, it trims. (Free heap it trimmed stays counted as free
by glibc, whose pages are gone all the same: so the trigger is what was
freed since, not what is free.)

Elsewhere (not glibc, or a glibc without ``mallinfo2``) it does nothing.

Must not know: the router, peers, sockets.
"""

from __future__ import annotations

import ctypes
from typing import Optional


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _glibc() -> Optional[ctypes.CDLL]:
    # The process's own symbols, libc's among them: ctypes.util.find_library
    # would run ldconfig in a subprocess, and import subprocess and shutil
    # (~0.3 MiB kept for the process's life) to do so.
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


class HeapTrimmer:
    """Trims the C heap when much of it is free."""

    #: Free heap bytes past which a check trims.
    threshold = 4 << 20

    def __init__(self) -> None:
        self._libc = _glibc()
        self.trims = 0
        self._baseline = self.free_bytes()   # free heap bytes after the last trim, or less

    @property
    def available(self) -> bool:
        return self._libc is not None

    def free_bytes(self) -> int:
        """Heap bytes glibc holds free (0 where it cannot say)."""
        if self._libc is None:
            return 0
        return int(self._libc.mallinfo2().fordblks)

    def check(self) -> bool:
        """Trim if more than ``threshold`` bytes were freed since the last
        trim; True if it did."""
        if self._libc is None:
            return False
        free = self.free_bytes()
        if free < self._baseline:
            self._baseline = free               # reused meanwhile
        if free - self._baseline <= self.threshold:
            return False
        self._libc.malloc_trim(0)
        self.trims += 1
        self._baseline = self.free_bytes()
        return True
