"""Per-phase wall-clock accounting of a forward pass (off unless a benchmark turns it on).

`with PROFILE("attention"): ...` costs one attribute check when disabled. When enabled on a GPU, each section
synchronizes the device on entry and exit so the time lands in the phase that queued the work; that removes
the overlap inside a section but not the CPU-expert / GPU overlap, which spans sections.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext



class Profile:
    def __init__(self):
        self.enabled = False
        self.sync = None  # called around each section (a GPU's synchronize), so GPU time lands where it is spent
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()  # the expert worker adds its own phases from another thread

    def start(self, sync=None) -> None:
        self.reset()
        self.enabled, self.sync = True, sync

    def stop(self) -> dict[str, float]:
        self.enabled = False
        return dict(self.seconds)

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()

    def add(self, phase: str, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self.seconds[phase] += seconds
                self.calls[phase] += 1

    @contextmanager
    def _timed(self, phase: str):
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.add(phase, time.perf_counter() - t0)

    def __call__(self, phase: str):
        return self._timed(phase) if self.enabled else _NULL


_NULL = nullcontext()  # reusable: entered on every section while profiling is off
PROFILE = Profile()
