"""glibc's allocator, set so that a long-running server returns the memory of large short-lived buffers.

By default glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB): after a few
big images, their buffers (Pillow's 16 MiB blocks, 20 MiB request messages) come from the heap instead and stay
there, fragmented, so resident memory only grows. A fixed threshold keeps every buffer of 4 MiB or more mmapped
(returned to the system when freed), and two arenas stop every thread from growing a heap of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 << 20
ARENA_MAX = 2
# For child processes (tritonserver and its Python-backend stubs), which read them when they start.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_ARENA_MAX": str(ARENA_MAX)}
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # mallopt parameters (malloc.h)


def trim() -> None:
    """Give the free memory inside the heaps back to the system (glibc's malloc_trim), e.g. after large work."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bound_heap() -> None:
    """Apply the same settings to this process (on glibc; elsewhere nothing)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_ARENA_MAX, ARENA_MAX)):
        log.warning("mallopt refused the allocator settings; memory may grow after large requests")
