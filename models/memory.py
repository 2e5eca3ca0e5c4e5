"""glibc's allocator, told to keep the memory of one forward for the next.

By default glibc gives an allocation above 128 KiB its own mmap and returns freed heap above
128 KiB to the kernel, raising both limits only as it sees larger blocks freed. Eager PyTorch
allocates every activation of every forward afresh, so on the CPU each forward pages its memory
in again: measured on efficientnet_lite0 (batch 1, 2 threads, this 2-core VM), 3,600-7,500
minor page faults per forward and a median forward of 26.5-32.7 ms; with the limits below, about
100 faults and 20.5 ms. ONNX Runtime keeps its own arena and is unaffected (8.0 ms either way).
The cost: the process keeps up to TRIM_THRESHOLD of freed memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # blocks below this come from the heap (glibc's largest allowed)
TRIM_THRESHOLD = 512 * 2**20  # free heap above this at the top is returned to the kernel


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (idempotent); False where the C
    library is not glibc (the defaults stay)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("mallopt refused the allocator thresholds; glibc's defaults stay")
    return done
