"""Process-wide malloc tuning for the long-running commands (``serve``, ``replay``).

The sidecar allocates from several threads (the chunk worker, the ``to_thread`` pool that
writes, reads and packs the spool, gRPC's threads). glibc gives each thread its own malloc
arena, up to eight per core, and keeps what each arena freed, so the resident set grows with
the number of threads that ever handled a big chunk rather than with what is live. One arena
for the whole process keeps the sidecar's peak RSS under 150 MiB through a 1,000,000-event
backlog and its drain, at no measurable CPU cost (BENCHMARKS.md, "Peak RSS"). Setting it here,
instead of ``MALLOC_ARENA_MAX`` in the environment, makes it hold however the sidecar is
started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Final

M_ARENA_MAX: Final = -8  # glibc's malloc.h


def limit_arenas(count: int = 1) -> bool:
    """Caps glibc's malloc arenas at ``count``; call it before the process starts threads.

    Returns True when the limit is set, False where it does not apply (not glibc, e.g. musl
    or macOS, whose allocators have no per-thread arenas to cap).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))
