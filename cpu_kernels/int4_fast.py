"""The INT4 decode kernel's fast mode: activations quantized to int8 per 32-element group, nibbles times int8
by AVX-512 VNNI (vpdpbusd), or on AVX2 by vpmaddubsw + vpmaddwd, as llama.cpp's Q4 x Q8 and KTransformers do. Off
by default (the quality numbers are in the README); the exact kernel is int4_simd.py's. On AVX2 (a Zen 3 EPYC,
2 cores, KVM) 20.4 GB/s per core from cache vs the generic exact kernel's 5.2 (bench/cpu_experts.py --quick); 4 rows
in flight (8 spill the 16 registers: 13 against 21 in a one-off A/B).

A 64-byte load of a row holds 128 weights: its low nibbles (weights 2b) and high nibbles (2b + 1) are masked into
two byte vectors of unsigned codes n = q + 8, and each vpdpbusd sums four n * x8 products per dword lane, so lane
i of a chunk gathers weights 8i .. 8i + 7 (group i // 4). Per lane and chunk: t = dot - 8 * (sum of its 8 x8, per
token), then acc += float(t) * (weight scale * activation scale): 12 vector ops per 64 bytes and row (exact
path: 25). x8 = round(x / s), s = max|x| / 127 per group; rows whose length is not a multiple of 128 finish their
last partial chunk in exact fp32.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd_ir as sir
from .decode import _silu_clamped
from .int4_kernels import CHUNK, GROUP
from .int4_simd import _scales8, _scales16, _tail, _weight_rows

VNNI = sir.has_features("HYBRID_INT4_SIMD", "avx512f", "avx512bw", "avx512vnni")
ISA = "avx512" if VNNI else "avx2" if sir.has_features("HYBRID_INT4_SIMD", "avx2", "fma") else None
FAST = ISA is not None  # where neither, fast decodes exactly
NR = 8 if ISA == "avx512" else 4  # rows in flight (AVX2: 16 registers)
CB = 64  # bytes (128 weights) per chunk
PREFETCH = 512
_V64I8 = sir.V64I8


def _rows_codegen():
    """Dots of the full chunks of rows r + i * st (i < 8) with a token's quantized activations Q."""

    def codegen(context, builder, sig, args):
        rows, Kb = _weight_rows(context, builder, sig, args, 0, args[2], args[3], 8)
        qp, _ = sir.array_data(context, builder, sig.args[4], args[4])
        low = sir.splat(_V64I8, 15)
        accs = [cgutils.alloca_once_value(builder, sir.splat(sir.V16F32, 0.0)) for _ in rows]
        with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(sir.I64, CB))) as loop:
            c = loop.index
            woff, soff = builder.mul(c, ir.Constant(sir.I64, CB)), builder.mul(c, ir.Constant(sir.I64, 8))
            qoff = builder.mul(c, ir.Constant(sir.I64, 256))  # per chunk: x8 lo, x8 hi, lane sums, lane scales
            xl = sir.vload(builder, qp, qoff, _V64I8)
            xh = sir.vload(builder, qp, builder.add(qoff, ir.Constant(sir.I64, 64)), _V64I8)
            xsum = sir.vload(builder, qp, builder.add(qoff, ir.Constant(sir.I64, 128)), sir.V16I32)
            xscale = sir.vload(builder, qp, builder.add(qoff, ir.Constant(sir.I64, 192)), sir.V16F32)
            ahead = builder.add(woff, ir.Constant(sir.I64, PREFETCH))
            sahead = builder.add(soff, ir.Constant(sir.I64, PREFETCH // 8))
            for (wrow, srow), acc in zip(rows, accs):
                sir.prefetch(builder, builder.gep(wrow, [ahead]))
                sir.prefetch(builder, builder.gep(srow, [sahead]))  # short scale rows: the prefetchers miss them
                raw = sir.vload(builder, wrow, woff, _V64I8)
                lo = builder.and_(raw, low)
                hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(raw, sir.V16I32),
                                                               sir.splat(sir.V16I32, 4)), _V64I8), low)  # fmt: skip
                t = sir.call(builder, "llvm.x86.avx512.vpdpbusd.512", sir.V16I32, [sir.splat(sir.V16I32, 0), lo, xl])
                t = sir.call(builder, "llvm.x86.avx512.vpdpbusd.512", sir.V16I32, [t, hi, xh])
                f = builder.sitofp(builder.sub(t, xsum), sir.V16F32)
                scale = builder.fmul(_scales16(builder, srow, soff), xscale)
                builder.store(sir.fma(builder, f, scale, builder.load(acc)), acc)
        return context.make_tuple(builder, sig.return_type, [sir.hsum(builder, builder.load(a)) for a in accs])

    return codegen


def _rows_avx2_codegen(context, builder, sig, args):
    """AVX2: each 32-byte half of a chunk as the AVX-512 kernel's lanes 8h .. 8h + 7 (same Q layout): vpmaddubsw
    (nibble x int8, adjacent pairs to int16: at most 2 * 15 * 127, no saturation), low + high nibble sums, vpmaddwd
    with ones to the dword lanes; 11 vector ops per 32 bytes and row."""
    rows, Kb = _weight_rows(context, builder, sig, args, 0, args[2], args[3], NR)
    qp, _ = sir.array_data(context, builder, sig.args[4], args[4])
    low, ones = sir.splat(sir.V32I8, 15), sir.splat(sir.V16I16, 1)
    accs = [cgutils.alloca_once_value(builder, sir.splat(sir.V8F32, 0.0)) for _ in rows]
    with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(sir.I64, CB))) as loop:
        c = loop.index
        woff, soff = builder.mul(c, ir.Constant(sir.I64, CB)), builder.mul(c, ir.Constant(sir.I64, 8))
        qoff = builder.mul(c, ir.Constant(sir.I64, 256))
        ahead = builder.add(woff, ir.Constant(sir.I64, PREFETCH))
        sahead = builder.add(soff, ir.Constant(sir.I64, PREFETCH // 8))
        for wrow, srow in rows:
            sir.prefetch(builder, builder.gep(wrow, [ahead]))
            sir.prefetch(builder, builder.gep(srow, [sahead]))
        for h in range(2):
            q = [builder.add(qoff, ir.Constant(sir.I64, off + 32 * h)) for off in (0, 64, 128, 192)]
            xl, xh = sir.vload(builder, qp, q[0], sir.V32I8), sir.vload(builder, qp, q[1], sir.V32I8)
            xsum, xscale = sir.vload(builder, qp, q[2], sir.V8I32), sir.vload(builder, qp, q[3], sir.V8F32)
            for (wrow, srow), acc in zip(rows, accs):
                raw = sir.vload(builder, wrow, builder.add(woff, ir.Constant(sir.I64, 32 * h)), sir.V32I8)
                lo = builder.and_(raw, low)
                hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(raw, sir.V16I16),
                                                               sir.splat(sir.V16I16, 4)), sir.V32I8), low)  # fmt: skip
                p = [sir.call(builder, "llvm.x86.avx2.pmadd.ub.sw", sir.V16I16, [n, xv])
                     for n, xv in ((lo, xl), (hi, xh))]  # fmt: skip
                t = sir.call(builder, "llvm.x86.avx2.pmadd.wd", sir.V8I32, [builder.add(p[0], p[1]), ones])
                f = builder.sitofp(builder.sub(t, xsum), sir.V8F32)
                scale = builder.fmul(_scales8(builder, srow, soff, h), xscale)
                builder.store(sir.fma(builder, f, scale, builder.load(acc)), acc)
    return context.make_tuple(builder, sig.return_type, [sir.hsum(builder, builder.load(a)) for a in accs])


@intrinsic
def _rows8(typingctx, W, S, r, st, Q):
    if ISA == "avx2":
        return types.UniTuple(types.float32, NR)(W, S, r, st, Q), _rows_avx2_codegen
    return types.UniTuple(types.float32, 8)(W, S, r, st, Q), _rows_codegen()


@njit(fastmath=True)
def quantize(x, Q):
    """Q (int8 view, 256 bytes per 128-element chunk): x8 of the low-nibble and of the high-nibble weights, then
    per dword lane 8 * the sum of its 8 x8 (int32) and its group's scale max|x| / 127 (float32)."""
    Qi, Qf = Q.view(np.int32), Q.view(np.float32)
    x8 = np.empty(CB * 2, np.int8)
    for c in range(x.shape[0] // (2 * CB)):
        for g in range(4):
            k0 = 2 * CB * c + GROUP * g
            amax = np.float32(0.0)
            for k in range(GROUP):
                amax = max(amax, abs(x[k0 + k]))
            s = amax / np.float32(127.0)
            inv = np.float32(0.0) if s == 0 else np.float32(1.0) / s
            for k in range(GROUP):
                x8[GROUP * g + k] = np.int8(round(x[k0 + k] * inv))
            for lane in range(4 * g, 4 * g + 4):
                Qf[64 * c + 48 + lane] = s
        for b in range(CB):
            Q[256 * c + b], Q[256 * c + 64 + b] = x8[2 * b], x8[2 * b + 1]
        for lane in range(16):
            t = 0
            for k in range(8):
                t += x8[8 * lane + k]
            Qi[64 * c + 32 + lane] = 8 * t


@njit(fastmath=True)
def gemv_fast(W, S, r0, r1, Q, x, out):
    """out[r - r0] = W[r] . x for r0 <= r < r1 with the quantized activations Q (`quantize`d x)."""
    Kb = W.shape[1]
    j0 = Kb // CB * CB
    r = r0
    st = (r1 - r0) // NR
    while st > 0 and r + NR * st <= r1:
        for j in range(st):
            a = _rows8(W, S, r + j, st, Q)
            for i in range(NR):
                row = r + j + i * st
                out[row - r0] = a[i] + _tail(W[row], S[row], x, j0, Kb)
        r += NR * st
    while r < r1:
        out[r - r0] = _tail(W[r], S[r], x, 0, Kb)
        r += 1


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def moe_decode_int4_fast(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """int4_simd._moe_decode_simd with int8 activations (phase 1 quantizes x, phase 2 each h)."""
    T, H = x.shape
    K = ids.shape[1]
    inter = gate.shape[1]
    P = T * K
    QX = np.empty((T, max(1, H // 128) * 256), np.int8)
    for t in range(T):
        quantize(x[t], QX[t])
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
        gemv_fast(gate[e], gate_s[e], r0, r1, QX[t], x[t], g)
        gemv_fast(up[e], up_s[e], r0, r1, QX[t], x[t], u)
        for i in range(r1 - r0):
            h[p, r0 + i] = _silu_clamped(g[i]) * u[i]
    QH = np.empty((P, max(1, inter // 128) * 256), np.int8)
    for p in prange(P):
        quantize(h[p], QH[p])
    n_out = (H + CHUNK - 1) // CHUNK
    for c in prange(n_out):
        r0, r1 = c * CHUNK, min(H, c * CHUNK + CHUNK)
        y = np.empty(CHUNK, np.float32)
        for t in range(T):
            out[t, r0:r1] = 0.0
        for p in range(P):
            t, k = p // K, p % K
            e = ids[t, k]
            if e < 0:
                continue
            gemv_fast(down[e], down_s[e], r0, r1, QH[p], h[p], y)
            wk = weights[t, k]
            for i in range(r1 - r0):
                out[t, r0 + i] += wk * y[i]
