"""Peak-memory tracking of a block of work (CUDA allocator peak, or the CPU process's peak resident set)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Self

import torch

from ..allocator import tuned

log = logging.getLogger(__name__)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block above what was in use when it started (activations, cache, temporaries).

    CUDA: the allocator's peak. CPU: the process's peak resident set (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``); where that reset is impossible, or the process keeps freed memory
    (:func:`attnshare.allocator.keep_freed_memory`: temporaries reuse pages it already holds), the value is None
    rather than a wrong number.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.start = 0
        self.peak_bytes: int | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.resettable = not tuned() and _reset_peak_rss()
            self.start = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.resettable:
            hwm = _status_kib("VmHWM")
            self.peak_bytes = None if hwm is None else max(hwm * 1024 - self.start, 0)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        log.info("cannot reset the peak resident set size here; peak memory is not reported")
        return False
