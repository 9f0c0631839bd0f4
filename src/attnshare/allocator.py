"""Process allocator tuning for CPU inference: keep freed memory for reuse.

glibc returns every freed chunk above its mmap threshold to the OS at once, and trims the top of its heap, so each
large temporary of a forward (a LiSA prefill block's scores and head-FFN tensors: 9-19 MB per block for one
2,048-token sequence) is page-faulted in afresh at the next allocation. Keeping freed chunks up to 32 MB in the
heap, measured on the 2-core box (`attnshare bench --scenario long --batch 1`, docs/results/bench.md): LiSA's eager
prefill ×0.70 → ×0.75-0.81 of base, ×0.90 → ×0.99 with a linear head mixing (``--ffn-width 0``).

The CLI calls :func:`keep_freed_memory` once per process (``bench --no-keep-freed-memory`` opts out); library users
call it themselves. Freed memory then stays with the process, so a CPU peak measured from the resident set no longer
shows a forward's temporaries: :func:`tuned` tells the bench to report none.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # give heap memory back only when more than 1 GB of it is free

_STATE = {"tuned": False}


def keep_freed_memory() -> bool:
    """Ask the C library to keep freed chunks of up to 32 MB for reuse; whether it could (False off glibc)."""
    if _STATE["tuned"]:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's C library
    except (OSError, AttributeError):
        log.info("no glibc mallopt here; the allocator keeps its defaults")
        return False
    _STATE["tuned"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                       TRIM_THRESHOLD))
    return _STATE["tuned"]


def tuned() -> bool:
    """Whether this process keeps freed memory (:func:`keep_freed_memory` succeeded)."""
    return _STATE["tuned"]
