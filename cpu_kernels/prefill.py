"""Grouped GEMM for prefill: tokens grouped by expert; each dequantized weight tile serves all of its tokens.

Per expert, 4 weight rows are dequantized to fp32 (scales applied) into a thread-local tile, then a 4-token x
4-row micro-kernel runs over the full width with 16 accumulators (one reduction per dot, not per block). Token
groups are padded to a multiple of 4 by repeating the expert's last token. Phase 1 computes
h = silu(gate x) * up x per (assignment, row); phase 2 y = down h per (assignment, output row); a final pass sums
each token's assignments with their routing weights.
Reference: `cpu_kernels.moe.reference_moe`; input checks: `cpu_kernels.moe.check_inputs`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .decode import _silu
from .fp8 import dequant_rows, gemv_rows, gemv_rows2

TASK_ROWS = 64  # rows per work item
TR = 4  # rows per micro-kernel
TT = 4  # tokens per micro-kernel
STREAM_MAX = 4  # experts with this many tokens or fewer skip the tiles and stream rows per token
KC = 1024  # columns per tile: 4 x 1024 fp32 weights + 4 token chunks = 32 KiB, inside L1


@njit(fastmath=True, inline="always")
def _micro(w, X, j, k0, kc):
    """16 partial dots: tile rows w[0..3][:kc] with token rows X[j..j+3] at columns k0..k0+kc."""
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    x0, x1, x2, x3 = X[j], X[j + 1], X[j + 2], X[j + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    base = np.uint64(k0)
    for k in range(np.uint64(kc)):
        v0, v1, v2, v3 = w0[k], w1[k], w2[k], w3[k]
        y0, y1, y2, y3 = x0[base + k], x1[base + k], x2[base + k], x3[base + k]
        a00 += v0 * y0
        a01 += v1 * y0
        a02 += v2 * y0
        a03 += v3 * y0
        a10 += v0 * y1
        a11 += v1 * y1
        a12 += v2 * y1
        a13 += v3 * y1
        a20 += v0 * y2
        a21 += v1 * y2
        a22 += v2 * y2
        a23 += v3 * y2
        a30 += v0 * y3
        a31 += v1 * y3
        a32 += v2 * y3
        a33 += v3 * y3
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(fastmath=True)
def _grouped_rows(W, S, r0, r1, X, x0, n, out, tile):
    """out[j, r - r0] = W[r] . X[x0 + j] for j < n (rows of X padded to a multiple of TT), r0 <= r < r1.

    K is cut into KC-wide chunks so a dequantized 4-row tile and the chunk of the tokens stay in L1.
    """
    K = W.shape[1]
    out[:n, : r1 - r0] = 0.0
    for k0 in range(0, K, KC):
        kc = min(KC, K - k0)
        for rb in range(r0, r1, TR):
            dequant_rows(W, S, rb, TR, k0, kc, tile)
            for j in range(0, n, TT):
                a = _micro(tile, X, x0 + j, k0, kc)
                for jj in range(min(TT, n - j)):
                    for i in range(min(TR, r1 - rb)):
                        out[j + jj, rb + i - r0] += a[jj * TR + i]


@njit(parallel=True, fastmath=True, cache=True)
def moe_prefill(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """Same result as moe_decode, organised for many tokens per expert; out is overwritten."""
    T, H = x.shape
    K = ids.shape[1]
    E, inter = gate.shape[0], gate.shape[1]
    P = T * K
    # group assignments by expert (counting sort); pad each group to a multiple of TT
    count = np.zeros(E + 1, np.int64)
    for p in range(P):
        count[ids[p // K, p % K] + 1] += 1
    start = np.zeros(E + 1, np.int64)  # start of each expert's padded group
    for e in range(E):
        start[e + 1] = start[e] + (count[e + 1] + TT - 1) // TT * TT
    fill = start[:E].copy()
    src = np.empty(start[E], np.int64)  # padded slot -> assignment p
    for p in range(P):
        e = ids[p // K, p % K]
        src[fill[e]] = p
        fill[e] += 1
    for e in range(E):
        for s in range(fill[e], start[e + 1]):
            src[s] = src[fill[e] - 1]
    xg = np.empty((start[E], H), np.float32)
    for s in prange(start[E]):
        xg[s] = x[src[s] // K]
    # (expert, row chunk) work lists for both phases
    n_in, n_out = (inter + TASK_ROWS - 1) // TASK_ROWS, (H + TASK_ROWS - 1) // TASK_ROWS
    active = np.empty(np.count_nonzero(count[1:]), np.int64)
    i = 0
    for e in range(E):
        if count[e + 1] > 0:
            active[i] = e
            i += 1
    h = np.empty((start[E], inter), np.float32)
    for item in prange(active.shape[0] * n_in):
        e, c = active[item // n_in], item % n_in
        s0, n = start[e], count[e + 1]
        r0, r1 = c * TASK_ROWS, min(inter, c * TASK_ROWS + TASK_ROWS)
        g = np.empty((n, TASK_ROWS), np.float32)
        u = np.empty((n, TASK_ROWS), np.float32)
        if n <= STREAM_MAX:  # few tokens: stream fp8 rows per token (the rows stay in L2 for the next one)
            sg, su = np.empty(H, np.float32), np.empty(H, np.float32)
            for j in range(n):
                gemv_rows2(gate[e], gate_s[e], up[e], up_s[e], r0, r1, xg[s0 + j], g[j], u[j], sg, su)
        else:
            tile = np.empty((TR, KC), np.float32)
            _grouped_rows(gate[e], gate_s[e], r0, r1, xg, s0, n, g, tile)
            _grouped_rows(up[e], up_s[e], r0, r1, xg, s0, n, u, tile)
        for j in range(n):
            for i in range(r1 - r0):
                h[s0 + j, r0 + i] = _silu(g[j, i]) * u[j, i]
    for e in active:  # padding rows of h repeat the group's last real row
        for s in range(start[e] + count[e + 1], start[e + 1]):
            h[s] = h[start[e] + count[e + 1] - 1]
    y = np.empty((start[E], H), np.float32)
    for item in prange(active.shape[0] * n_out):
        e, c = active[item // n_out], item % n_out
        s0, n = start[e], count[e + 1]
        r0, r1 = c * TASK_ROWS, min(H, c * TASK_ROWS + TASK_ROWS)
        yo = np.empty((n, TASK_ROWS), np.float32)
        if n <= STREAM_MAX:
            hs = np.empty(inter, np.float32)
            for j in range(n):
                gemv_rows(down[e], down_s[e], r0, r1, h[s0 + j], yo[j], hs)
        else:
            tile = np.empty((TR, KC), np.float32)
            _grouped_rows(down[e], down_s[e], r0, r1, h, s0, n, yo, tile)
        for j in range(n):
            y[s0 + j, r0:r1] = yo[j, : r1 - r0]
    slot = np.empty(P, np.int64)  # assignment p -> its (unpadded) slot
    for e in range(E):
        for s in range(start[e], start[e] + count[e + 1]):
            slot[src[s]] = s
    for t in prange(T):
        out[t] = 0.0
        for k in range(K):
            out[t] += weights[t, k] * y[slot[t * K + k]]
