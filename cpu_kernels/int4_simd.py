"""Native-INT4 expert kernels with the inner loops written in LLVM IR for AVX-512, and for decode AVX2 + FMA (the
generic Numba kernels, int4_kernels.py, are the fallback and the layout reference). `ISA` is picked at import.

AVX-512 (the inner loops written in LLVM IR; Numba's vectoriser converts one byte per lane, 10 vector ops per
16 bytes and row: compute-bound at 8.5 GB/s per core, 0.55 of STREAM on 2 cores). One 64-byte load of a row
holds 128 elements; dword lane i holds elements 8i .. 8i+7 of them, one per nibble, and vpermps looks a lane's
low nibble up in the 16 codes -8..7 (fp32), so element 8i + k of the chunk is vpermps(codes, dword >> 4k)
(7 shifts + 8 lookups per 128 elements, the -8 included). x is copied once per token into the matching order
(`arrange`: XP[128c + 16k + i] = x[128c + 8i + k]). Lane i lies in group i // 4 of the chunk, so decode sums
the 8 products per lane (t, 8 FMAs) and adds t * scale (one FMA; the 4 bf16 scales are widened and spread
over the lanes by one vpermt2w): 25 vector ops per 64 bytes and row, 17 GB/s per core from L2. Work split as
in decode.py, 8 rows in flight (gate's 8, then up's: 16 at once spill registers, 15.3 GB/s per core), stream i
of a 64-row item reading rows r + 8i .. r + 8i + 7 one after the other (long sequential streams: +4% over rows a
page apart); each row, and its scale row (short streams the hardware prefetchers miss: +5 to 8% end to end), is
prefetched PREFETCH bytes ahead in software. Measured on the dev box (2 cores, STREAM 26-28 GB/s,
bench/cpu_experts.py --quick): 0.85-0.90 of STREAM (generic: 0.54). The fast mode (int8 activations, VNNI) is
int4_fast.py. Prefill: a 4-row x 4-token register tile scales each converted code vector once (q * s, exact) and
feeds it to 4 tokens (92-95 GFLOP/s single-threaded from L2, generic 80); experts with at most STREAM_MAX tokens
stream their rows per token like decode; 16 / 128 / 512 tokens: 74 / 98 / 142 GFLOP/s (generic 52 / 80 / 124).
Row lengths that are not a multiple of 128 elements end in `_tail` (scalar, exact fp32).
Alternatives measured: AVX-512 VNNI with x split into four int8 digits of a 28-bit fixed point per group:
20.7 GB/s per core from L2, +3 to 5% end to end, but fixed point loses an outlier's small group neighbours
(2^-28 of the group's max); bf16 dot products (vdpbf16ps, x in three bf16 parts): 6 GB/s per core.

AVX2 + FMA, decode only (no AVX-512F; prefill stays generic): the same driver with its own `_chunks8` codegen and
`arrange`. A chunk is two 32-byte halves; in half h, dword lane i holds elements 64h + 8i + k (lanes 0-3: one
group, 4-7: the next). vcvtdq2ps(raw & 0xF << 4k) is n_k * 2^4k exactly (k = 7: raw >> 28), times x * 2^-4k from
the arranged x (CX = 144 floats per chunk: 128 of those, then 16 corrections c = -8 * sum of a lane's 8 x); t
starts at c, so t = sum (n - 8) x with exact products (for |x| >= 2^-102: x * 2^-24 stays normal); then
acc += t * [s_g x4, s_g+1 x4] (vpbroadcastq + vpshufb). 3 vector ops per 8 weights (and, cvt, FMA), 52 per 64
bytes and row, and this Zen 3 retires ~3 a cycle: op-bound. 4 rows in flight (2 passes per _chunks8), 2 FMA chains
per half. Zen 3 EPYC dev box (2 cores, KVM, noisy: best of 30 rounds): single core from cache 9.7-10.7 GB/s,
1.65-1.8x the generic's 4.3-6.1 in the same runs; 2 threads, bench/cpu_experts.py --quick: 0.42-0.55 of STREAM,
11-15 GB/s (generic 0.29, 6.5 GB/s). Tried: 8 rows in flight (spills, -30%); letting LLVM merge the rows' x
loads (-25%, hence `simd_ir.opaque`); masks and vpshufb controls as memory operands, and the whole row chunk as inline
asm without spills (no faster: the ops, not the spills, bound it); no software prefetch (+3% from cache, 0 to -5%
end to end: kept). Fewer ops would need a cheaper exact nibble -> fp32 than and + cvt: fp16 denormals through
vcvtph2ps, or-ing in an exponent, 8-entry vpermps tables: as many ops by count, or bits lost.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd_ir as sir
from .decode import _silu_clamped
from .int4_kernels import (CHUNK, GROUP, STREAM_MAX, _moe_decode_generic, _moe_prefill_generic, bf16_to_f32,
                           hi_q, lo_q)  # fmt: skip
from .prefill import group_by_expert
from .simd_ir import F32 as _F32, I16 as _I16, I32 as _I32, I64 as _I64, V16F32 as _V16F32, V16I32 as _V16I32
from .simd_ir import call as _call, fma as _fma, hsum as _hsum, splat as _splat, vload as _vload



# The decode inner loop, chosen once: AVX-512, else AVX2 + FMA, else the generic kernels (int4_kernels.py).
ISA = ("avx512" if sir.has_features("HYBRID_INT4_SIMD", "avx512f")
       else "avx2" if sir.has_features("HYBRID_INT4_SIMD", "avx2", "fma") else None)  # fmt: skip
SIMD = ISA is not None
CX = 144 if ISA == "avx2" else 128  # floats per 128-element chunk of an arranged x
PREFETCH = 512  # bytes ahead in each weight row (software prefetch into L1)


def _scales16(builder, base, off):
    """The 4 bf16 group scales at byte offset `off` -> <16 x float> [s0 x4, s1 x4, s2 x4, s3 x4] (exact)."""
    v = _vload(builder, base, off, ir.VectorType(_I16, 4))
    mask = [4 if w % 2 == 0 else w // 8 for w in range(32)]  # even words: 0 (from the zero vector), odd: s[lane // 4]
    v = builder.shuffle_vector(v, ir.Constant(ir.VectorType(_I16, 4), None), ir.Constant(ir.VectorType(_I32, 32), mask))
    return builder.bitcast(v, _V16F32)


def _weight_rows(context, builder, sig, args, m, r, st, n):
    """(weight row, scale row) byte pointers of rows r + i * st (i < n) of the matrix and bf16 scales in args m, m + 1,
    and the weight rows' length in bytes."""
    wp, W = sir.array_data(context, builder, sig.args[m], args[m])
    sp, S = sir.array_data(context, builder, sig.args[m + 1], args[m + 1])
    Kb = builder.extract_value(W.shape, 1)
    sb = builder.mul(builder.extract_value(S.shape, 1), ir.Constant(_I64, 2))
    return list(zip(sir.row_pointers(builder, wp, Kb, r, st, n), sir.row_pointers(builder, sp, sb, r, st, n))), Kb


def _rows_codegen(nmat):
    """Code for the full 128-element chunks of rows r + i * st (i < 8) of nmat matrices, with the arranged x XP."""

    def codegen(context, builder, sig, args):
        r, st = args[2 * nmat], args[2 * nmat + 1]
        xp = sir.array_data(context, builder, sig.args[2 * nmat + 2], args[2 * nmat + 2])[0]
        rows = []  # (weight row, scale row) byte pointers
        for m in range(nmat):
            mrows, Kb = _weight_rows(context, builder, sig, args, 2 * m, r, st, 8)
            rows += mrows
        codes = ir.Constant(_V16F32, [ir.Constant(_F32, float(q)) for q in range(-8, 8)])
        accs = [cgutils.alloca_once_value(builder, _splat(_V16F32, 0.0)) for _ in rows]
        with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(_I64, 64))) as loop:
            c = loop.index
            woff, soff = builder.mul(c, ir.Constant(_I64, 64)), builder.mul(c, ir.Constant(_I64, 8))
            xoff = builder.mul(c, ir.Constant(_I64, 4 * CX))
            xs = [_vload(builder, xp, builder.add(xoff, ir.Constant(_I64, 64 * k)), _V16F32) for k in range(8)]
            ahead = builder.add(woff, ir.Constant(_I64, PREFETCH))
            sahead = builder.add(soff, ir.Constant(_I64, PREFETCH // 8))
            for (wrow, srow), acc in zip(rows, accs):
                pf = [builder.gep(wrow, [ahead]), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)]
                _call(builder, "llvm.prefetch.p0", ir.VoidType(), pf)  # read, keep in L1, data
                pf[0] = builder.gep(srow, [sahead])  # the scale rows too: short streams the prefetchers miss
                _call(builder, "llvm.prefetch.p0", ir.VoidType(), pf)
                raw = _vload(builder, wrow, woff, _V16I32)
                t = None
                for k in range(8):  # element 8i + k of lane i: nibble k of dword i
                    idx = builder.lshr(raw, _splat(_V16I32, 4 * k)) if k else raw
                    q = _call(builder, "llvm.x86.avx512.permvar.sf.512", _V16F32, [codes, idx])
                    t = builder.fmul(q, xs[k]) if t is None else _fma(builder, q, xs[k], t)
                builder.store(_fma(builder, _scales16(builder, srow, soff), t, builder.load(acc)), acc)
        return context.make_tuple(builder, sig.return_type, [_hsum(builder, builder.load(a)) for a in accs])

    return codegen


# ---- AVX2 + FMA decode path (in this file: Numba's cache of _moe_decode_simd only watches this file) -------------
# Half h (32 bytes) of a chunk: dword lane i holds elements 64h + 8i + k, nibble k in bits 4k..4k+3; lanes 0-3
# are group 2h of the chunk, 4-7 group 2h + 1. Arranged x per chunk: [h][k][i] x * 2^-4k (128), then [h][i] the
# corrections c = -8 * sum_k x[64h + 8i + k] (16).
ROWS2 = 4  # rows per pass over the chunks (_chunks8: 2 passes); 8 at once spill 16 ymm registers: -30%
SPLIT2 = 2  # FMA chains per half and row: shorter dependency chains, +5 to 8%


def _scales8(builder, srow, soff, h):
    """Half h's two bf16 scales of the chunk at byte offset soff -> <8 x float> [s_2h x4, s_2h+1 x4] (exact)."""
    q = builder.load(builder.bitcast(builder.gep(srow, [soff]), _I64.as_pointer()), align=1)
    v = builder.insert_element(ir.Constant(ir.VectorType(_I64, 4), None), q, ir.Constant(_I32, 0))
    v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 4), [0] * 4))  # vpbroadcastq
    ctrl = [b for g in (2 * h, 2 * h + 1) for b in [-128, -128, 2 * g, 2 * g + 1] * 4]  # -128: a zero byte
    ctrl = ir.Constant(sir.V32I8, [ir.Constant(sir.I8, b) for b in ctrl])
    return builder.bitcast(_call(builder, "llvm.x86.avx2.pshuf.b", sir.V32I8, [builder.bitcast(v, sir.V32I8), ctrl]),
                           sir.V8F32)  # fmt: skip


def _row_avx2(builder, wrow, srow, woff, soff, xp, xoff, acc):
    """acc += one chunk of one row; both halves' nibbles interleaved (independent chains side by side)."""

    def at(off, const):
        return builder.add(off, ir.Constant(_I64, const))

    sir.prefetch(builder, builder.gep(wrow, [at(woff, PREFETCH)]))  # both: 0 to +5% end to end (noise-level)
    sir.prefetch(builder, builder.gep(srow, [at(soff, PREFETCH // 8)]))
    raws = [_vload(builder, wrow, at(woff, 32 * h), sir.V8I32) for h in range(2)]
    ts = [[_vload(builder, xp, at(xoff, 4 * (128 + 8 * h)), sir.V8F32)] + [None] * (SPLIT2 - 1) for h in range(2)]
    for k in range(8):
        for h in range(2):
            if k < 7:
                v = builder.and_(raws[h], _splat(sir.V8I32, 0xF << 4 * k))
            else:
                v = builder.lshr(raws[h], _splat(sir.V8I32, 28))
            q = builder.sitofp(v, sir.V8F32)  # n * 2^4k, exact (4 significant bits), never denormal
            xk = _vload(builder, xp, at(xoff, 4 * (64 * h + 8 * k)), sir.V8F32)
            j = k % SPLIT2
            ts[h][j] = builder.fmul(q, xk) if ts[h][j] is None else _fma(builder, q, xk, ts[h][j])
    a = builder.load(acc)
    for h in range(2):
        sv = _scales8(builder, srow, soff, h)
        for t in ts[h]:
            a = _fma(builder, t, sv, a)
    builder.store(a, acc)


def _rows_avx2():
    """_rows_codegen(1) for AVX2: rows r + i * st (i < 8), in 2 passes of ROWS2 rows."""

    def codegen(context, builder, sig, args):
        r, st = args[2], args[3]
        rows, Kb = _weight_rows(context, builder, sig, args, 0, r, st, 8)  # (weight row, scale row) byte pointers
        xp, _ = sir.array_data(context, builder, sig.args[4], args[4])
        accs = [cgutils.alloca_once_value(builder, _splat(sir.V8F32, 0.0)) for _ in rows]
        for p in range(0, 8, ROWS2):
            with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(_I64, 64))) as loop:
                c = loop.index
                woff, soff = builder.mul(c, ir.Constant(_I64, 64)), builder.mul(c, ir.Constant(_I64, 8))
                xoff = builder.mul(c, ir.Constant(_I64, 4 * CX))
                for (wrow, srow), acc in zip(rows[p : p + ROWS2], accs[p : p + ROWS2]):
                    _row_avx2(builder, wrow, srow, woff, soff, sir.opaque(builder, xp), xoff, acc)
        return context.make_tuple(builder, sig.return_type, [_hsum(builder, builder.load(a)) for a in accs])

    return codegen


@njit(fastmath=True)
def _arrange_avx2(x, XP, g0, g1):
    """x's groups g0 <= g < g1 (inside its full 128-element chunks) in the AVX2 layout."""
    for g in range(g0, g1):
        c, h, i0 = g // 4, (g % 4) // 2, 4 * (g % 2)
        for i in range(i0, i0 + 4):
            e = 128 * c + 64 * h + 8 * i
            s = 0.0  # float64: the correction is rounded once
            for k in range(8):
                s += x[e + k]
                XP[CX * c + 64 * h + 8 * k + i] = x[e + k] * np.float32(2.0 ** (-4 * k)) if k < 7 else x[e + k]
            XP[CX * c + 128 + 8 * h + i] = np.float32(-8.0 * s)


@intrinsic
def _chunks8(typingctx, W, S, r, st, XP):
    """Dots of the full chunks of rows r, r+st, ..., r+7st of W (bf16 scales S) with the arranged x XP."""
    return types.UniTuple(types.float32, 8)(W, S, r, st, XP), _rows_avx2() if ISA == "avx2" else _rows_codegen(1)


@njit(fastmath=True)
def _arrange512(x, XP, g0, g1):
    """XP[128c + 16k + i] = x[128c + 8i + k] for the groups g0 <= g < g1 (inside x's full 128-element chunks)."""
    for g in range(g0, g1):
        c, i0 = g // 4, 4 * (g % 4)
        for i in range(i0, i0 + 4):
            for k in range(8):
                XP[CX * c + 16 * k + i] = x[CX * c + 8 * i + k]


arrange = _arrange_avx2 if ISA == "avx2" else _arrange512  # x in the layout _chunks8 reads


@njit(fastmath=True, inline="always")
def _tail(w, s, x, j0, Kb):
    """Bytes j0 <= j < Kb of row w (scales s) dotted with x in natural order, exact fp32."""
    a = np.float32(0.0)
    for j in range(j0, Kb):
        a += bf16_to_f32(s[j >> 4]) * (lo_q(w[j]) * x[2 * j] + hi_q(w[j]) * x[2 * j + 1])
    return a


@njit(fastmath=True)
def gemv_simd(W, S, r0, r1, XP, x, out):
    """out[r - r0] = W[r] . x for r0 <= r < r1 (XP: x arranged for _chunks8; the last partial chunk reads x)."""
    Kb = W.shape[1]
    j0 = Kb // 64 * 64
    r = r0
    st = (r1 - r0) // 8  # stream i: rows r + i * st .. r + i * st + st - 1, one after the other
    while st > 0 and r + 8 * st <= r1:
        for j in range(st):
            a = _chunks8(W, S, r + j, st, XP)
            for i in range(8):
                row = r + j + i * st
                out[row - r0] = a[i] + _tail(W[row], S[row], x, j0, Kb)
        r += 8 * st
    while r < r1:
        out[r - r0] = _tail(W[r], S[r], x, 0, Kb)
        r += 1


@njit(fastmath=True)
def gemv_simd2(G, SG, U, SU, r0, r1, XP, x, out_g, out_u):
    """gemv_simd for gate, then for up."""
    gemv_simd(G, SG, r0, r1, XP, x, out_g)
    gemv_simd(U, SU, r0, r1, XP, x, out_u)


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _moe_decode_simd(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """moe_decode_int4 with _chunks8 (AVX-512 or AVX2)."""
    T, H = x.shape
    K = ids.shape[1]
    inter = gate.shape[1]
    P = T * K
    gh, gi = H // 128 * 4, inter // 128 * 4  # groups in full chunks
    XP = np.empty((T, max(1, H // 128) * CX), np.float32)
    for t in range(T):
        arrange(x[t], XP[t], 0, gh)
    h = np.empty((P, inter), np.float32)
    HP = np.empty((P, max(1, inter // 128) * CX), np.float32)
    n_in = (inter + CHUNK - 1) // CHUNK
    for item in prange(P * n_in):
        p, c = item // n_in, item % n_in
        t, e = p // K, ids[p // K, p % K]
        if e < 0:  # an assignment computed elsewhere
            continue
        r0, r1 = c * CHUNK, min(inter, c * CHUNK + CHUNK)
        g = np.empty(CHUNK, np.float32)
        u = np.empty(CHUNK, np.float32)
        gemv_simd2(gate[e], gate_s[e], up[e], up_s[e], r0, r1, XP[t], x[t], g, u)
        for i in range(r1 - r0):
            h[p, r0 + i] = _silu_clamped(g[i]) * u[i]
        arrange(h[p], HP[p], r0 // GROUP, min(r1 // GROUP, gi))  # this item's groups of h
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
            gemv_simd(down[e], down_s[e], r0, r1, HP[p], h[p], y)
            wk = weights[t, k]
            for i in range(r1 - r0):
                out[t, r0 + i] += wk * y[i]


# ---- AVX-512 prefill path ------------------------------------------------------------------------------------
# TRS rows x TTS tokens per step: each row's converted codes are scaled once (q * s: exact in fp32) and each x
# vector, loaded once, feeds one FMA per row; TRS * TTS accumulators stay in registers.
TRS, TTS = 4, 4  # 4 x 4: 92-95 GFLOP/s single-threaded from L2 (12 tokens); 2 x 8: 62, 3 x 6: 81, 4 x 6: 68


def _micro_codegen():
    """Code for rows r .. r+TRS-1 of W x TTS tokens (rows tok[0..TTS-1] of the arranged XP), full chunks."""

    def codegen(context, builder, sig, args):
        rows, Kb = _weight_rows(context, builder, sig, args, 0, args[2], ir.Constant(_I64, 1), TRS)
        xp, XP = sir.array_data(context, builder, sig.args[3], args[3])
        tok = context.make_array(sig.args[4])(context, builder, args[4])
        xstride = builder.extract_value(XP.strides, 0)
        toks = [builder.gep(xp, [builder.mul(builder.load(builder.gep(tok.data, [ir.Constant(_I64, j)])), xstride)])
                for j in range(TTS)]  # fmt: skip
        codes = ir.Constant(_V16F32, [ir.Constant(_F32, float(q)) for q in range(-8, 8)])
        accs = [[cgutils.alloca_once_value(builder, _splat(_V16F32, 0.0)) for _ in toks] for _ in rows]
        with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(_I64, 64))) as loop:
            c = loop.index
            woff, soff = builder.mul(c, ir.Constant(_I64, 64)), builder.mul(c, ir.Constant(_I64, 8))
            xoff = builder.mul(c, ir.Constant(_I64, 4 * CX))
            raws, svs = [], []
            for wrow, srow in rows:
                pf = [builder.gep(wrow, [builder.add(woff, ir.Constant(_I64, PREFETCH))])]
                _call(builder, "llvm.prefetch.p0", ir.VoidType(), pf + [ir.Constant(_I32, v) for v in (0, 3, 1)])
                raws.append(_vload(builder, wrow, woff, _V16I32))
                svs.append(_scales16(builder, srow, soff))
            vals = [[builder.load(a) for a in racc] for racc in accs]
            for k in range(8):
                qs = []
                for raw, sv in zip(raws, svs):
                    idx = builder.lshr(raw, _splat(_V16I32, 4 * k)) if k else raw
                    q = _call(builder, "llvm.x86.avx512.permvar.sf.512", _V16F32, [codes, idx])
                    qs.append(builder.fmul(q, sv))  # q * s, exact
                for j, xt in enumerate(toks):
                    xv = _vload(builder, xt, builder.add(xoff, ir.Constant(_I64, 64 * k)), _V16F32)
                    for i, q in enumerate(qs):
                        vals[i][j] = _fma(builder, q, xv, vals[i][j])
            for racc, rv in zip(accs, vals):
                for a, v in zip(racc, rv):
                    builder.store(v, a)
        out = [_hsum(builder, builder.load(accs[i][j])) for j in range(TTS) for i in range(TRS)]
        return context.make_tuple(builder, sig.return_type, out)

    return codegen


@intrinsic
def _micro_simd(typingctx, W, S, r, XP, tok):
    """TTS x TRS dots (token-major): rows r .. r+TRS-1 of W with rows tok[0..TTS-1] of XP (full chunks)."""
    return types.UniTuple(types.float32, TRS * TTS)(W, S, r, XP, tok), _micro_codegen()


@njit(fastmath=True)
def _grouped_simd(W, S, r0, r1, XP, xn, s0, n, out):
    """out[j, r - r0] = W[r] . xn[s0 + j] for j < n, r0 <= r < r1 (XP: the same activations arranged)."""
    Kb = W.shape[1]
    j0 = Kb // 64 * 64
    last = s0 + n - 1
    tok = np.empty(TTS, np.int64)
    r = r0
    while r + TRS <= r1:
        for j in range(0, n, TTS):
            for q in range(TTS):
                tok[q] = min(s0 + j + q, last)  # a short last group repeats the expert's last token
            a = _micro_simd(W, S, r, XP, tok)
            for jj in range(min(TTS, n - j)):
                for i in range(TRS):
                    out[j + jj, r + i - r0] = a[jj * TRS + i] + _tail(W[r + i], S[r + i], xn[s0 + j + jj], j0, Kb)
        r += TRS
    while r < r1:
        for j in range(n):
            out[j, r - r0] = _tail(W[r], S[r], xn[s0 + j], 0, Kb)
        r += 1


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _moe_prefill_simd(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out):
    """moe_prefill_int4 with _micro_simd, and the decode path's gemv_simd / gemv_simd2 for experts with few tokens."""
    T, H = x.shape
    K = ids.shape[1]
    E, inter = gate.shape[0], gate.shape[1]
    P = T * K
    gh, gi = H // 128 * 4, inter // 128 * 4  # groups in full chunks
    start, slot, active = group_by_expert(ids, E)  # slots start[e] .. start[e + 1] belong to expert e
    ns = max(1, start[E])
    xn = np.empty((ns, H), np.float32)
    XP = np.empty((ns, max(1, H // 128) * CX), np.float32)
    for p in prange(P):
        if slot[p] >= 0:
            xn[slot[p]] = x[p // K]
            arrange(x[p // K], XP[slot[p]], 0, gh)
    n_in, n_out = (inter + CHUNK - 1) // CHUNK, (H + CHUNK - 1) // CHUNK
    h = np.empty((ns, inter), np.float32)
    HP = np.empty((ns, max(1, inter // 128) * CX), np.float32)
    for item in prange(active.shape[0] * n_in):
        e, c = active[item // n_in], item % n_in
        s0, n = start[e], start[e + 1] - start[e]
        r0, r1 = c * CHUNK, min(inter, c * CHUNK + CHUNK)
        g = np.empty((n, CHUNK), np.float32)
        u = np.empty((n, CHUNK), np.float32)
        if n <= STREAM_MAX:
            for j in range(n):
                gemv_simd2(gate[e], gate_s[e], up[e], up_s[e], r0, r1, XP[s0 + j], xn[s0 + j], g[j], u[j])
        else:
            _grouped_simd(gate[e], gate_s[e], r0, r1, XP, xn, s0, n, g)
            _grouped_simd(up[e], up_s[e], r0, r1, XP, xn, s0, n, u)
        for j in range(n):
            for r in range(r1 - r0):
                h[s0 + j, r0 + r] = _silu_clamped(g[j, r]) * u[j, r]
            arrange(h[s0 + j], HP[s0 + j], r0 // GROUP, min(r1 // GROUP, gi))
    y = np.empty((ns, H), np.float32)
    for item in prange(active.shape[0] * n_out):
        e, c = active[item // n_out], item % n_out
        s0, n = start[e], start[e + 1] - start[e]
        r0, r1 = c * CHUNK, min(H, c * CHUNK + CHUNK)
        yo = np.empty((n, CHUNK), np.float32)
        if n <= STREAM_MAX:
            for j in range(n):
                gemv_simd(down[e], down_s[e], r0, r1, HP[s0 + j], h[s0 + j], yo[j])
        else:
            _grouped_simd(down[e], down_s[e], r0, r1, HP, h, s0, n, yo)
        for j in range(n):
            y[s0 + j, r0:r1] = yo[j, : r1 - r0]
    for t in prange(T):
        out[t] = 0.0
        for k in range(K):
            if slot[t * K + k] >= 0:
                out[t] += weights[t, k] * y[slot[t * K + k]]


moe_decode_int4 = _moe_decode_simd if SIMD else _moe_decode_generic
moe_prefill_int4 = _moe_prefill_simd if ISA == "avx512" else _moe_prefill_generic  # no AVX2 prefill tile
