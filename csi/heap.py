"""The process's heap: memory freed after one message kept for the next, not handed back to the kernel.

glibc's malloc gives allocations above its mmap threshold (128 KiB at first, raised as such blocks are freed)
pages of their own and returns a heap's free top once it passes the trim threshold. gRPC's TLS path allocates and
frees its encrypted buffers per message on its own threads: a stream of 1 MiB messages over mutual TLS paged in
fresh memory for nearly every page it sent (measured: 117,854 minor faults for 256 MiB on this machine's host,
32,000-100,000 on a lab storage node, where a fault costs most, against 0-2,315 for the same stream without TLS).
Fixed thresholds keep that memory in the heap: freed blocks are reused, and each malloc arena may keep up to
TRIM_THRESHOLD free at its top besides what it has in use. The agent, whose copies stream volumes between storage
nodes over TLS, sets them at start (bench/README.md has the measurement); a libc without mallopt (musl) keeps its
own behaviour.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1       # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20    # above a copy's 1 MiB messages and gRPC's buffers for them
TRIM_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Fixed mmap and trim thresholds for this process (every thread and arena); True when libc took both."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("this libc has no mallopt: its heap keeps its own thresholds")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    taken = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    if taken != [1, 1]:
        log.warning("mallopt refused the heap's thresholds (%s)", taken)
        return False
    return True
