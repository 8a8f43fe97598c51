"""Numba kernels for native-INT4 routed experts (compressed-tensors pack-quantized, group 32, bf16 scales).

Weights: uint8 byte view [N, K/2] of the int32 `weight_packed` (byte j holds element 2j in its low nibble and
2j+1 in its high nibble, offset binary: q = nibble - 8) and uint16 bf16 bits [N, K/32] of `weight_scale`.
Arithmetic everywhere: fp32 products of x with the exact weights (q * s is exact in fp32) and fp32 sums.
These are the generic kernels; where the CPU has AVX-512F (or, for decode, AVX2 + FMA), int4_simd.py's are used
instead (`moe_decode_int4`, `moe_prefill_int4` there pick; HYBRID_INT4_SIMD=0 forces the generic ones).

Generic: activations in a *split* layout, [x0 x2 x4 ... | x1 x3 x5 ...], so byte j of a row pairs with xs[j]
(low nibble) and xs[K/2 + j] (high nibble); byte j adds s * (q_lo * xe + q_hi * xo) to one fp32 accumulator
per row; one horizontal sum per row. Decode: 8 weight rows in flight (a 4 KiB page apart; 16 for gate and up
together: 13.3 -> 15 GB/s on the dev box), one flat loop over the bytes; the 8 rows' bf16 group scales are
first converted into a small fp32 buffer SF, and the loop reads SF[i][j >> 4] (16 bytes per group): LLVM sees
the index is uniform over a 16-lane vector and broadcasts it (single thread, L2-resident rows: 8.5 GB/s;
converting the bf16 scale in the loop: 6.7; broadcasting scales into a per-byte fp32 buffer first: 2.1).
Work split as in decode.py: phase 1 hands out (assignment, 64-row chunk) items of gate and up; phase 2 64-row
chunks of the output, each summing over all assignments (no two threads write the same output row).
Prefill: tokens grouped by expert as in prefill.py; per work item (expert, 64 rows) a 4-row x 4-token
micro-kernel unpacks and scales each weight once per step in registers and feeds it to 4 tokens (8 FMAs);
experts with at most STREAM_MAX tokens stream their rows per token like decode. (Dequantizing 4-row tiles
into an fp32 buffer first ran at 29 GFLOP/s single-threaded for 12 tokens: LLVM kept those stores scalar.)
"""

from __future__ import annotations


import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .decode import _silu
from .prefill import group_by_expert

CHUNK = 64  # rows per work item
GROUP = 32  # elements per scale group (16 bytes)
PAGE = 4096
TR, TT = 4, 4  # prefill micro-kernel: rows x tokens
STREAM_MAX = 2


@intrinsic
def bf16_to_f32(typingctx, bits):
    """uint16 bf16 bit pattern -> float32 (exact)."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


def _nibble(shift):
    @intrinsic
    def nib(typingctx, byte):
        if not (isinstance(byte, types.Integer) and byte.bitwidth == 8):
            return None

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            v = builder.zext(args[0], i32)
            if shift:
                v = builder.lshr(v, ir.Constant(i32, shift))
            v = builder.sub(builder.and_(v, ir.Constant(i32, 15)), ir.Constant(i32, 8))
            return builder.sitofp(v, ir.FloatType())

        return types.float32(byte), codegen

    return nib


lo_q = _nibble(0)  # uint8 byte -> float32 q of its low nibble (element 2j), in -8..7
hi_q = _nibble(4)  # ... of its high nibble (element 2j + 1)


@njit(fastmath=True)
def split(x, xs):
    """xs = [x[0::2] | x[1::2]] (the layout every kernel here reads activations in)."""
    half = x.shape[0] // 2
    for j in range(half):
        xs[j] = x[2 * j]
        xs[half + j] = x[2 * j + 1]


@njit(fastmath=True, inline="always")
def _split_pos(r, n):
    return r // 2 if r % 2 == 0 else n // 2 + r // 2


@njit(fastmath=True, inline="always")
def _dot8(W, SF, r, st, xs, Kb):
    """Dots of rows r, r+st, ..., r+7st (their fp32 group scales in SF[0..7]) with split activations xs."""
    w0, w1, w2, w3 = W[r], W[r + st], W[r + 2 * st], W[r + 3 * st]
    w4, w5, w6, w7 = W[r + 4 * st], W[r + 5 * st], W[r + 6 * st], W[r + 7 * st]
    s0, s1, s2, s3, s4, s5, s6, s7 = SF[0], SF[1], SF[2], SF[3], SF[4], SF[5], SF[6], SF[7]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for j in range(np.uint64(Kb)):
        xe, xo = xs[j], xs[Kb + j]
        g = j >> np.uint64(4)  # 16 bytes per scale group
        a0 += s0[g] * (lo_q(w0[j]) * xe + hi_q(w0[j]) * xo)
        a1 += s1[g] * (lo_q(w1[j]) * xe + hi_q(w1[j]) * xo)
        a2 += s2[g] * (lo_q(w2[j]) * xe + hi_q(w2[j]) * xo)
        a3 += s3[g] * (lo_q(w3[j]) * xe + hi_q(w3[j]) * xo)
        a4 += s4[g] * (lo_q(w4[j]) * xe + hi_q(w4[j]) * xo)
        a5 += s5[g] * (lo_q(w5[j]) * xe + hi_q(w5[j]) * xo)
        a6 += s6[g] * (lo_q(w6[j]) * xe + hi_q(w6[j]) * xo)
        a7 += s7[g] * (lo_q(w7[j]) * xe + hi_q(w7[j]) * xo)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(fastmath=True, inline="always")
def _dot1(w, s, xs, Kb):
    a = np.float32(0.0)
    for j in range(np.uint64(Kb)):
        a += bf16_to_f32(s[j >> np.uint64(4)]) * (lo_q(w[j]) * xs[j] + hi_q(w[j]) * xs[Kb + j])
    return a


@njit(fastmath=True)
def gemv_rows(W, S, r0, r1, xs, out, SF):
    """out[r - r0] = W[r] . x for r0 <= r < r1 (xs: x in split layout; SF: [8, K/32] fp32 scratch)."""
    Kb = W.shape[1]
    r = r0
    st = min(-(-PAGE // Kb), (r1 - r0) // 8)  # rows >= 4 KiB apart: each stream in its own page
    while st > 0 and r + 8 * st <= r1:
        for j in range(st):
            _fill_scales(S, r + j, st, SF)
            a = _dot8(W, SF, r + j, st, xs, Kb)
            for i in range(8):
                out[r + j + i * st - r0] = a[i]
        r += 8 * st
    while r < r1:
        out[r - r0] = _dot1(W[r], S[r], xs, Kb)
        r += 1


@njit(fastmath=True, inline="always")
def _dot8x2(G, U, SG, SU, r, st, xs, Kb):
    """_dot8 on gate and up at once (same rows, same x): sixteen streams in flight."""
    g0, g1, g2, g3 = G[r], G[r + st], G[r + 2 * st], G[r + 3 * st]
    g4, g5, g6, g7 = G[r + 4 * st], G[r + 5 * st], G[r + 6 * st], G[r + 7 * st]
    gs0, gs1, gs2, gs3, gs4, gs5, gs6, gs7 = SG[0], SG[1], SG[2], SG[3], SG[4], SG[5], SG[6], SG[7]
    u0, u1, u2, u3 = U[r], U[r + st], U[r + 2 * st], U[r + 3 * st]
    u4, u5, u6, u7 = U[r + 4 * st], U[r + 5 * st], U[r + 6 * st], U[r + 7 * st]
    us0, us1, us2, us3, us4, us5, us6, us7 = SU[0], SU[1], SU[2], SU[3], SU[4], SU[5], SU[6], SU[7]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = np.float32(0.0)
    for j in range(np.uint64(Kb)):
        xe, xo = xs[j], xs[Kb + j]
        k = j >> np.uint64(4)
        a0 += gs0[k] * (lo_q(g0[j]) * xe + hi_q(g0[j]) * xo)
        a1 += gs1[k] * (lo_q(g1[j]) * xe + hi_q(g1[j]) * xo)
        a2 += gs2[k] * (lo_q(g2[j]) * xe + hi_q(g2[j]) * xo)
        a3 += gs3[k] * (lo_q(g3[j]) * xe + hi_q(g3[j]) * xo)
        a4 += gs4[k] * (lo_q(g4[j]) * xe + hi_q(g4[j]) * xo)
        a5 += gs5[k] * (lo_q(g5[j]) * xe + hi_q(g5[j]) * xo)
        a6 += gs6[k] * (lo_q(g6[j]) * xe + hi_q(g6[j]) * xo)
        a7 += gs7[k] * (lo_q(g7[j]) * xe + hi_q(g7[j]) * xo)
        b0 += us0[k] * (lo_q(u0[j]) * xe + hi_q(u0[j]) * xo)
        b1 += us1[k] * (lo_q(u1[j]) * xe + hi_q(u1[j]) * xo)
        b2 += us2[k] * (lo_q(u2[j]) * xe + hi_q(u2[j]) * xo)
        b3 += us3[k] * (lo_q(u3[j]) * xe + hi_q(u3[j]) * xo)
        b4 += us4[k] * (lo_q(u4[j]) * xe + hi_q(u4[j]) * xo)
        b5 += us5[k] * (lo_q(u5[j]) * xe + hi_q(u5[j]) * xo)
        b6 += us6[k] * (lo_q(u6[j]) * xe + hi_q(u6[j]) * xo)
        b7 += us7[k] * (lo_q(u7[j]) * xe + hi_q(u7[j]) * xo)
    return a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7


@njit(fastmath=True)
def _fill_scales(S, r, st, SF):
    """SF[i] = fp32 group scales of row r + i * st, i < 8."""
    for i in range(8):
        row, sf = S[r + i * st], SF[i]
        for g in range(row.shape[0]):
            sf[g] = bf16_to_f32(row[g])


@njit(fastmath=True)
def gemv_rows2(G, SG, U, SU, r0, r1, xs, out_g, out_u, SF, SF2):
    """gemv_rows for gate and up (same shape, same x), streamed together."""
    Kb = G.shape[1]
    r = r0
    st = min(-(-PAGE // Kb), (r1 - r0) // 8)
    while st > 0 and r + 8 * st <= r1:
        for j in range(st):
            _fill_scales(SG, r + j, st, SF)
            _fill_scales(SU, r + j, st, SF2)
            a = _dot8x2(G, U, SF, SF2, r + j, st, xs, Kb)
            for i in range(8):
                out_g[r + j + i * st - r0] = a[i]
                out_u[r + j + i * st - r0] = a[8 + i]
        r += 8 * st
    while r < r1:
        out_g[r - r0] = _dot1(G[r], SG[r], xs, Kb)
        out_u[r - r0] = _dot1(U[r], SU[r], xs, Kb)
        r += 1


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _moe_decode_generic(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """moe_decode_int4 in plain Numba (fp32 per element, split activations): CPUs without AVX-512F or AVX2."""
    T, H = x.shape
    K = ids.shape[1]
    inter = gate.shape[1]
    P = T * K
    xs = np.empty((T, H), np.float32)
    for t in range(T):
        split(x[t], xs[t])
    h = np.empty((P, inter), np.float32)  # split layout, ready for down
    n_in = (inter + CHUNK - 1) // CHUNK
    for item in prange(P * n_in):
        p, c = item // n_in, item % n_in
        t, e = p // K, ids[p // K, p % K]
        if e < 0:  # an assignment computed elsewhere
            continue
        r0, r1 = c * CHUNK, min(inter, c * CHUNK + CHUNK)
        g = np.empty(CHUNK, np.float32)
        u = np.empty(CHUNK, np.float32)
        SF = np.empty((2, 8, H // GROUP), np.float32)
        gemv_rows2(gate[e], gate_s[e], up[e], up_s[e], r0, r1, xs[t], g, u, SF[0], SF[1])
        for i in range(r1 - r0):
            h[p, _split_pos(r0 + i, inter)] = _silu(g[i]) * u[i]
    n_out = (H + CHUNK - 1) // CHUNK
    for c in prange(n_out):
        r0, r1 = c * CHUNK, min(H, c * CHUNK + CHUNK)
        y = np.empty(CHUNK, np.float32)
        SF = np.empty((8, inter // GROUP), np.float32)
        for t in range(T):
            out[t, r0:r1] = 0.0
        for p in range(P):
            t, k = p // K, p % K
            e = ids[t, k]
            if e < 0:
                continue
            gemv_rows(down[e], down_s[e], r0, r1, h[p], y, SF)
            wk = weights[t, k]
            for i in range(r1 - r0):
                out[t, r0 + i] += wk * y[i]


@njit(fastmath=True, inline="always")
def _micro(W, SF, r, x0, x1, x2, x3, Kb):
    """16 dots: rows W[r..r+3] (fp32 group scales in SF[0..3]) with four tokens (split layout), full width.

    Each weight is unpacked and scaled (q * scale, exact) once per step and fed to 4 tokens x 2 FMAs.
    """
    w0, w1, w2, w3 = W[r], W[r + 1], W[r + 2], W[r + 3]
    s0, s1, s2, s3 = SF[0], SF[1], SF[2], SF[3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for j in range(np.uint64(Kb)):
        g = j >> np.uint64(4)
        q0 = w0[j]
        l0, h0 = lo_q(q0) * s0[g], hi_q(q0) * s0[g]
        q1 = w1[j]
        l1, h1 = lo_q(q1) * s1[g], hi_q(q1) * s1[g]
        q2 = w2[j]
        l2, h2 = lo_q(q2) * s2[g], hi_q(q2) * s2[g]
        q3 = w3[j]
        l3, h3 = lo_q(q3) * s3[g], hi_q(q3) * s3[g]
        e, o = x0[j], x0[Kb + j]
        a00 += l0 * e + h0 * o
        a01 += l1 * e + h1 * o
        a02 += l2 * e + h2 * o
        a03 += l3 * e + h3 * o
        e, o = x1[j], x1[Kb + j]
        a10 += l0 * e + h0 * o
        a11 += l1 * e + h1 * o
        a12 += l2 * e + h2 * o
        a13 += l3 * e + h3 * o
        e, o = x2[j], x2[Kb + j]
        a20 += l0 * e + h0 * o
        a21 += l1 * e + h1 * o
        a22 += l2 * e + h2 * o
        a23 += l3 * e + h3 * o
        e, o = x3[j], x3[Kb + j]
        a30 += l0 * e + h0 * o
        a31 += l1 * e + h1 * o
        a32 += l2 * e + h2 * o
        a33 += l3 * e + h3 * o
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(fastmath=True)
def _grouped_rows(W, S, r0, r1, X, s0, n, out, SF):
    """out[j, r - r0] = W[r] . X[s0 + j] for j < n, r0 <= r < r1 (X split layout; SF: [8, K/32] scratch)."""
    Kb = W.shape[1]
    last = s0 + n - 1
    r = r0
    while r + TR <= r1:
        for i in range(TR):
            row, sf = S[r + i], SF[i]
            for g in range(row.shape[0]):
                sf[g] = bf16_to_f32(row[g])
        for j in range(0, n, TT):
            a = _micro(W, SF, r, X[s0 + j], X[min(s0 + j + 1, last)], X[min(s0 + j + 2, last)],
                       X[min(s0 + j + 3, last)], Kb)
            for jj in range(min(TT, n - j)):
                for i in range(TR):
                    out[j + jj, r + i - r0] = a[jj * TR + i]
        r += TR
    while r < r1:  # rows left over when the range is not a multiple of TR
        for j in range(n):
            out[j, r - r0] = _dot1(W[r], S[r], X[s0 + j], Kb)
        r += 1


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _moe_prefill_generic(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """moe_prefill_int4 in plain Numba (split activations): CPUs without AVX-512."""
    T, H = x.shape
    K = ids.shape[1]
    E, inter = gate.shape[0], gate.shape[1]
    P = T * K
    start, slot, active = group_by_expert(ids, E)  # slots start[e] .. start[e + 1] belong to expert e
    xg = np.empty((max(1, start[E]), H), np.float32)  # split layout
    for p in prange(P):
        if slot[p] >= 0:
            split(x[p // K], xg[slot[p]])
    n_in, n_out = (inter + CHUNK - 1) // CHUNK, (H + CHUNK - 1) // CHUNK
    h = np.empty((max(1, start[E]), inter), np.float32)  # split layout
    for item in prange(active.shape[0] * n_in):
        e, c = active[item // n_in], item % n_in
        s0, n = start[e], start[e + 1] - start[e]
        r0, r1 = c * CHUNK, min(inter, c * CHUNK + CHUNK)
        g = np.empty((n, CHUNK), np.float32)
        u = np.empty((n, CHUNK), np.float32)
        if n <= STREAM_MAX:
            SF = np.empty((2, 8, H // GROUP), np.float32)
            for j in range(n):
                gemv_rows2(gate[e], gate_s[e], up[e], up_s[e], r0, r1, xg[s0 + j], g[j], u[j], SF[0], SF[1])
        else:
            SF = np.empty((8, H // GROUP), np.float32)
            _grouped_rows(gate[e], gate_s[e], r0, r1, xg, s0, n, g, SF)
            _grouped_rows(up[e], up_s[e], r0, r1, xg, s0, n, u, SF)
        for j in range(n):
            for r in range(r1 - r0):
                h[s0 + j, _split_pos(r0 + r, inter)] = _silu(g[j, r]) * u[j, r]
    y = np.empty((max(1, start[E]), H), np.float32)
    for item in prange(active.shape[0] * n_out):
        e, c = active[item // n_out], item % n_out
        s0, n = start[e], start[e + 1] - start[e]
        r0, r1 = c * CHUNK, min(H, c * CHUNK + CHUNK)
        yo = np.empty((n, CHUNK), np.float32)
        if n <= STREAM_MAX:
            SF = np.empty((8, inter // GROUP), np.float32)
            for j in range(n):
                gemv_rows(down[e], down_s[e], r0, r1, h[s0 + j], yo[j], SF)
        else:
            SF = np.empty((8, inter // GROUP), np.float32)
            _grouped_rows(down[e], down_s[e], r0, r1, h, s0, n, yo, SF)
        for j in range(n):
            y[s0 + j, r0:r1] = yo[j, : r1 - r0]
    for t in prange(T):
        out[t] = 0.0
        for k in range(K):
            if slot[t * K + k] >= 0:
                out[t] += weights[t, k] * y[slot[t * K + k]]
