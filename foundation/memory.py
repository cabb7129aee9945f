"""Resident memory: hand freed heap back to the OS, and the process's peak resident set over a stretch of work.

Used by the experiment (the high-water mark after each phase in `run.json`, memory released between phases) and by
the benchmarks (`PeakMemory` resets the mark, so it is only for processes that measure nothing else).
"""

from __future__ import annotations

import ctypes
import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def release_free_heap() -> None:
    """Return the heap that freed objects left to the OS (glibc's `malloc_trim`).

    After a fit, glibc keeps most of what the freed activations and gradients occupied (about 0.6 GB after the
    demo's fit), so the next phase would start from the fit's high-water mark instead of from what is live.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        pass


def peak_rss_gib() -> float:
    """The process's resident high-water mark in GiB (since the last reset, where there was one)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        match = None
    if match:
        return int(match.group(1)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Peak resident set size (GiB) of this process while the `with` block ran.

    Linux resets the high-water mark on `echo 5 > /proc/self/clear_refs`; where that is not possible the figure is the
    process's peak so far (`resettable` is False) and an earlier, larger stretch can mask a later one.
    """

    def __init__(self) -> None:
        self.gib = float("nan")
        self.resettable = False

    def __enter__(self) -> PeakMemory:
        release_free_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc) -> None:
        self.gib = peak_rss_gib()
