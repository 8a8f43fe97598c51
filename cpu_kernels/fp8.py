"""fp8 e4m3 -> fp32 inside Numba loops, exactly and without fp32 denormals.

The code byte is placed into an fp16 bit pattern (sign to bit 15, exponent and mantissa to bits 13..7) and
widened to fp32 by the hardware (vcvtph2ps). The result is the e4m3 value times 2^-8 for all 254 finite codes,
subnormals included, because fp16 subnormals mirror e4m3 subnormals. The 2^8 goes into the block scale.

Why not the direct fp32 placement ((b & 0x80) << 24 | (b & 0x7F) << 20, times 2^120)? It turns every e4m3
subnormal and every small product into an fp32 denormal; on Intel cores each one costs a microcode assist and
random weights ran at ~1 GB/s instead of ~20 (measured on the dev box).
Numba pitfalls seen: `int32 << int` widens to int64 and kills vectorisation (hence an LLVM intrinsic); slicing
rows inside a prange body gives 'A'-layout arrays that do not vectorise (index whole rows from offsets instead);
one row at a time leaves DRAM streaming at ~8 GB/s (8 rows in flight per thread reach ~22); 8 rows that share
a 4 KiB page (2 KiB down_proj rows) confuse the prefetchers (~13 GB/s) until the rows are spread a page apart.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

FP8_UNIT = np.float32(256.0)  # fp8_to_f32(code) * FP8_UNIT == e4m3 value
BLOCK = 128
PAGE = 4096  # the hardware prefetchers follow one ascending stream per page


@intrinsic
def fp8_to_f32(typingctx, code):
    """int8 e4m3 code -> float32 (value * 2^-8)."""
    if not (isinstance(code, types.Integer) and code.bitwidth == 8):
        return None

    def codegen(context, builder, sig, args):
        i16 = ir.IntType(16)
        v = builder.shl(builder.sext(args[0], i16), ir.Constant(i16, 7))
        v = builder.and_(v, ir.Constant(i16, 0xBF80 - (1 << 16)))  # keep sign (15) and bits 13..7
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(code), codegen


@njit(fastmath=True, inline="always")
def dot8(W, r, st, x, K):
    """Unscaled dots of rows r, r+st, ..., r+7st of W with x[:K]: eight streams in flight, one x load per step."""
    w0, w1, w2, w3 = W[r], W[r + st], W[r + 2 * st], W[r + 3 * st]
    w4, w5, w6, w7 = W[r + 4 * st], W[r + 5 * st], W[r + 6 * st], W[r + 7 * st]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for k in range(np.uint64(K)):
        xv = x[k]
        a0 += fp8_to_f32(w0[k]) * xv
        a1 += fp8_to_f32(w1[k]) * xv
        a2 += fp8_to_f32(w2[k]) * xv
        a3 += fp8_to_f32(w3[k]) * xv
        a4 += fp8_to_f32(w4[k]) * xv
        a5 += fp8_to_f32(w5[k]) * xv
        a6 += fp8_to_f32(w6[k]) * xv
        a7 += fp8_to_f32(w7[k]) * xv
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(fastmath=True, inline="always")
def dot8x2(G, U, r, st, x, y, K):
    """dot8 on two matrices at once (gate with x, up with y): sixteen streams in flight."""
    g0, g1, g2, g3 = G[r], G[r + st], G[r + 2 * st], G[r + 3 * st]
    g4, g5, g6, g7 = G[r + 4 * st], G[r + 5 * st], G[r + 6 * st], G[r + 7 * st]
    u0, u1, u2, u3 = U[r], U[r + st], U[r + 2 * st], U[r + 3 * st]
    u4, u5, u6, u7 = U[r + 4 * st], U[r + 5 * st], U[r + 6 * st], U[r + 7 * st]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = np.float32(0.0)
    for k in range(np.uint64(K)):
        xv, yv = x[k], y[k]
        a0 += fp8_to_f32(g0[k]) * xv
        a1 += fp8_to_f32(g1[k]) * xv
        a2 += fp8_to_f32(g2[k]) * xv
        a3 += fp8_to_f32(g3[k]) * xv
        a4 += fp8_to_f32(g4[k]) * xv
        a5 += fp8_to_f32(g5[k]) * xv
        a6 += fp8_to_f32(g6[k]) * xv
        a7 += fp8_to_f32(g7[k]) * xv
        b0 += fp8_to_f32(u0[k]) * yv
        b1 += fp8_to_f32(u1[k]) * yv
        b2 += fp8_to_f32(u2[k]) * yv
        b3 += fp8_to_f32(u3[k]) * yv
        b4 += fp8_to_f32(u4[k]) * yv
        b5 += fp8_to_f32(u5[k]) * yv
        b6 += fp8_to_f32(u6[k]) * yv
        b7 += fp8_to_f32(u7[k]) * yv
    return a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7


@njit(fastmath=True, inline="always")
def dot1(w, x, k0, k1):
    a = np.float32(0.0)
    for k in range(np.uint64(k0), np.uint64(k1)):
        a += fp8_to_f32(w[k]) * x[k]
    return a


@njit(fastmath=True)
def gemv_rows(W, S, r0, r1, x, out, xs):
    """out[r - r0] = W[r] . x with block scales, for rows r0 <= r < r1 (W int8 fp8 codes [N, K]).

    The scales of a 128-row block are folded into a scaled copy of x (xs, K floats of scratch), so each row is
    one long dot with one horizontal reduction instead of one per 128 columns.
    """
    K = W.shape[1]
    r = r0
    while r < r1:
        rb = r // BLOCK
        end = min(r1, (rb + 1) * BLOCK)
        scale_x(S, rb, x, xs)
        st = min(-(-PAGE // K), (end - r) // 8)  # rows >= 4 KiB apart: each stream in its own page
        while st > 0 and r + 8 * st <= end:
            for j in range(st):
                a = dot8(W, r + j, st, xs, K)
                for i in range(8):
                    out[r + j + i * st - r0] = a[i]
            r += 8 * st
        while r < end:
            out[r - r0] = dot1(W[r], xs, 0, K)
            r += 1


@njit(fastmath=True)
def scale_x(S, rb, x, xs):
    """xs = x * (block scales of 128-row block rb) * 2^8: folds a row block's scales into the vector."""
    K = x.shape[0]
    for b in range((K + BLOCK - 1) // BLOCK):
        sc = S[rb, b] * FP8_UNIT
        for k in range(np.uint64(b * BLOCK), np.uint64(min(K, b * BLOCK + BLOCK))):
            xs[k] = x[k] * sc


@njit(fastmath=True)
def gemv_rows2(G, SG, U, SU, r0, r1, x, out_g, out_u, xg, xu):
    """gemv_rows for two matrices of the same shape (gate and up) applied to the same x, streamed together."""
    K = G.shape[1]
    r = r0
    while r < r1:
        rb = r // BLOCK
        end = min(r1, (rb + 1) * BLOCK)
        scale_x(SG, rb, x, xg)
        scale_x(SU, rb, x, xu)
        st = min(-(-PAGE // K), (end - r) // 8)
        while st > 0 and r + 8 * st <= end:
            for j in range(st):
                a = dot8x2(G, U, r + j, st, xg, xu, K)
                for i in range(8):
                    out_g[r + j + i * st - r0] = a[i]
                    out_u[r + j + i * st - r0] = a[8 + i]
            r += 8 * st
        while r < end:
            out_g[r - r0] = dot1(G[r], xg, 0, K)
            out_u[r - r0] = dot1(U[r], xu, 0, K)
            r += 1
