"""Fused routed-expert MLP for decode: a few tokens x top-k experts, every core busy even for one token.

Work is split by rows, not by expert: phase 1 hands out (assignment, 64-row chunk) items of gate and up
(2048 rows per expert -> 32 items each, so 1 token x 8 experts makes 256 items); phase 2 hands out 64-row
chunks of the output, each summing over all assignments, so no two threads write the same output row.
Reference: `cpu_kernels.moe.reference_moe`; input checks: `cpu_kernels.moe.check_inputs`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .fp8 import gemv_rows, gemv_rows2

CHUNK = 64  # rows per work item: a multiple of 8 (the row group of gemv_rows)


@njit(fastmath=True, inline="always")
def _silu(g):
    return g / (np.float32(1.0) + np.float32(math.exp(-g)))


@njit(fastmath=True, inline="always")
def _silu_clamped(g):
    """silu that stays finite where exp(-g) would overflow (vectorised under fastmath, g / inf is g * rcp(inf): nan)."""
    return g / (np.float32(1.0) + np.float32(math.exp(min(-g, np.float32(80.0)))))


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def moe_decode(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """out[t] = sum_k weights[t, k] * down(silu(gate x_t) * up x_t) of expert ids[t, k]; out is overwritten."""
    T, H = x.shape
    K = ids.shape[1]
    inter = gate.shape[1]
    P = T * K
    h = np.empty((P, inter), np.float32)
    n_in = (inter + CHUNK - 1) // CHUNK
    for item in prange(P * n_in):
        p, c = item // n_in, item % n_in
        t, e = p // K, ids[p // K, p % K]
        if e < 0:  # an assignment computed elsewhere
            continue
        r0, r1 = c * CHUNK, min(inter, c * CHUNK + CHUNK)
        g = np.empty(CHUNK, np.float32)
        u = np.empty(CHUNK, np.float32)
        xg = np.empty(H, np.float32)
        xu = np.empty(H, np.float32)
        gemv_rows2(gate[e], gate_s[e], up[e], up_s[e], r0, r1, x[t], g, u, xg, xu)
        for i in range(r1 - r0):
            h[p, r0 + i] = _silu(g[i]) * u[i]
    n_out = (H + CHUNK - 1) // CHUNK
    for c in prange(n_out):
        r0, r1 = c * CHUNK, min(H, c * CHUNK + CHUNK)
        y = np.empty(CHUNK, np.float32)
        hs = np.empty(inter, np.float32)
        for t in range(T):
            out[t, r0:r1] = 0.0
        for p in range(P):
            t, k = p // K, p % K
            e = ids[t, k]
            if e < 0:
                continue
            gemv_rows(down[e], down_s[e], r0, r1, h[p], y, hs)
            wk = weights[t, k]
            for i in range(r1 - r0):
                out[t, r0 + i] += wk * y[i]
