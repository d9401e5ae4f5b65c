"""Resident memory of this process: current RSS, and the peak over a window of work.

Linux keeps the peak RSS in /proc/self/status (VmHWM); writing "5" to /proc/self/clear_refs resets
that high-water mark to the current RSS, so the peak of one stretch of work (a training run) can be
read without the peaks of what came before (loading the checkpoint, encoding the data). Where that
reset does not work (another OS, an old kernel, a sandbox), a thread samples VmRSS instead; it can
miss short spikes, which the report says.
"""
from __future__ import annotations

import os
import re
import threading
import time

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
MiB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open(STATUS, encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Current resident set size (VmRSS), or the peak from getrusage where /proc is missing."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hwm_bytes() -> int | None:
    """Peak resident set size since start or since the last reset (VmHWM)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_hwm() -> bool:
    """Resets VmHWM to the current RSS; True only when the reset visibly took effect."""
    before = hwm_bytes()
    if before is None:
        return False
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    after = hwm_bytes()
    # After a reset the mark sits at the current RSS. Where it already did (nothing was freed since
    # the peak) a failed reset cannot be told apart, but then the mark is right from here on anyway.
    return after is not None and after <= rss_bytes() + 4 * MiB


class PeakWindow:
    """Peak RSS over a stretch of work: ``start()`` before it, ``stop()`` after.

    ``baseline`` is the RSS at start; ``peak`` the highest RSS seen until stop; ``method`` says how
    the peak was taken ("VmHWM after clear_refs" or "sampled every N ms").
    """

    def __init__(self, sample_interval_s: float = 0.005):
        self.interval = sample_interval_s
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self.process_peak_before = 0  # whole-process peak before the window (loading)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> "PeakWindow":
        self.process_peak_before = hwm_bytes() or rss_bytes()
        self.baseline = rss_bytes()
        if reset_hwm():
            self.method = "VmHWM after clear_refs"
        else:
            self.method = f"VmRSS sampled every {self.interval * 1000:.0f} ms"
            self.peak = self.baseline
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> "PeakWindow":
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        else:
            self.peak = hwm_bytes() or rss_bytes()
        return self

    @property
    def training_bytes(self) -> int:
        """Peak during the window minus RSS at its start: what the work itself needed."""
        return max(0, self.peak - self.baseline)

    @property
    def process_peak_bytes(self) -> int:
        """Whole-process peak: the larger of the peak before the window and the one inside it."""
        return max(self.process_peak_before, self.peak)

    def as_dict(self) -> dict:
        return {"baseline_rss_mib": self.baseline / MiB, "train_peak_rss_mib": self.peak / MiB,
                "train_mem_mib": self.training_bytes / MiB, "process_peak_mib": self.process_peak_bytes / MiB,
                "mem_method": self.method, "pid": os.getpid()}
