"""The two kv_b products of MLA's absorbed decode, straight from the fp8 weight (one token):

    q_abs[h, c] = sum_d q_nope[h, d] * W[h, d, c]          W = kv_b viewed [heads, dn + dv, C]
    out[h, v]   = sum_c ctx[h, c]    * W[h, dn + v, c]

so decode never writes a dequantized copy of kv_b (16.8M weights per Kimi-K2 layer). The first is a weighted sum
of rows (one head per thread), the second a dot per row.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fp8 import BLOCK, FP8_UNIT, fp8_to_f32, gemv_rows


@njit(fastmath=True, inline="always")
def _axpy(acc, w, a, k0, k1):
    """acc[k] += a * e4m3(w[k]) for k0 <= k < k1 (a carries the block scale and 2^8)."""
    for k in range(np.uint64(k0), np.uint64(k1)):
        acc[k] += a * fp8_to_f32(w[k])


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _absorb_query(q, W, S, dn, dv, out):
    H, C = out.shape
    for h in prange(H):
        acc = np.zeros(C, np.float32)
        for d in range(dn):
            r = h * (dn + dv) + d
            coef = q[h, d] * FP8_UNIT
            for b in range(0, C, BLOCK):
                _axpy(acc, W[r], S[r // BLOCK, b // BLOCK] * coef, b, min(C, b + BLOCK))
        for c in range(C):
            out[h, c] = acc[c]


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _absorb_value(ctx, W, S, dn, dv, out):
    H, C = ctx.shape
    for h in prange(H):
        r0 = h * (dn + dv) + dn
        y = np.empty(dv, np.float32)
        xs = np.empty(C, np.float32)
        gemv_rows(W, S, r0, r0 + dv, ctx[h], y, xs)
        for v in range(dv):
            out[h, v] = y[v]


def _check(W, S, H, dn, dv, C):
    want = (H * (dn + dv), C)
    if W.dtype != np.int8 or W.shape != want or S.dtype != np.float32 or S.shape != (-(-want[0] // BLOCK), -(-C // BLOCK)):
        raise ValueError(f"kv_b: expected int8 {want} and float32 scales, got {W.dtype}{W.shape}, {S.dtype}{S.shape}")


def absorb_query(q_nope: np.ndarray, W: np.ndarray, S: np.ndarray, dv: int) -> np.ndarray:
    """q_nope [H, dn] float32 -> [H, C]: the query in the latent space."""
    H, dn = q_nope.shape
    _check(W, S, H, dn, dv, W.shape[1])
    out = np.empty((H, W.shape[1]), np.float32)
    _absorb_query(np.ascontiguousarray(q_nope, np.float32), W, S, dn, dv, out)
    return out


def absorb_value(ctx: np.ndarray, W: np.ndarray, S: np.ndarray, dn: int) -> np.ndarray:
    """ctx [H, C] float32 (attention-weighted latents) -> [H, dv]: the heads' values."""
    H, C = ctx.shape
    dv = W.shape[0] // H - dn
    _check(W, S, H, dn, dv, C)
    out = np.empty((H, dv), np.float32)
    _absorb_value(np.ascontiguousarray(ctx, np.float32), W, S, dn, dv, out)
    return out
