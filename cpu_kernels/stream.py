"""STREAM-like host read bandwidth: every thread sums its share of a large buffer (the decode roof)."""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _read_sum(a, nt):
    chunk = (a.shape[0] + nt - 1) // nt
    parts = np.zeros(nt, np.int64)
    for t in prange(nt):
        lo, hi = t * chunk, min(a.shape[0], t * chunk + chunk)
        s = np.int64(0)
        for i in range(np.uint64(lo), np.uint64(hi)):
            s += a[i]
        parts[t] = s
    return parts.sum()


def read_bandwidth(buffers: list[np.ndarray], repeats: int = 3) -> float:
    """Best-of-`repeats` read bandwidth in GB/s over all `buffers` (use >= 2 GB in all so caches cannot help)."""
    words = [b.reshape(-1).view(np.int64) for b in buffers]
    nt = numba.get_num_threads()
    _read_sum(words[0][:1024], nt)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in words:
            _read_sum(w, nt)
        best = max(best, sum(w.nbytes for w in words) / (time.perf_counter() - t0) / 1e9)
    return best
