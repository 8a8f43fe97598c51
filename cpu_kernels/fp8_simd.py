"""fp8 e4m3 decode kernel with AVX-512 table conversion, or AVX2 in-register placement on AMD Zen (decode.py and
fp8.py are the generic fallback).

AVX2 (`_rows_avx2_codegen`, exact): no byte tables in AVX2, so each code's bits are moved into place: the sign to
bit 31, exponent and mantissa to bits 26..20 of an fp32, which is then the e4m3 value times 2^-120 for every code
(subnormals become fp32 denormals, at full speed on Zen; Intel cores assist each one, hence AMD only). 9 integer
ops + 4 FMAs per 32 codes, 4 rows in flight with two accumulators each (8 rows spill the 16 registers): on a Zen 3
EPYC (2 cores, KVM) 17.6 GB/s per core from cache vs the generic's 10.1 (bench/cpu_experts.py --quick); measured
and dropped in one-off microbenchmarks (generic ~10.7 there): fp16 patterns through vcvtph2ps (11), sign-extension
to dwords (12), exact bf16 via vpshufb tables plus a subnormal patch (11).

The generic kernel converts each code to fp32 through fp16 (vcvtph2ps: 2 uops per 16 codes): ~20 uops per 64
bytes and row, 16.5 GB/s per core from L2, short of the DRAM share of bandwidth-rich cores. Here each 64-byte
load of a row becomes 64 exact bf16 weights by two 128-entry table lookups (vpermi2b: the low and the high byte
of the bf16 pattern of |code|; e4m3's 3 mantissa bits and exponent range fit bf16, subnormals included), one
vpternlog for the sign and two byte interleaves (vpunpck*bw). Exact path: each dword of bf16 words is widened to
two fp32 weights by a shift and a mask, 4 fp32 FMAs per 64 weights: 13 vector ops, 22 GB/s per core (1.34x),
fp32-exact like the generic kernel. Fast mode: activations rounded to bf16 and 2 vdpbf16ps per 64 weights
(relative error <= 2^-9 per activation; on this Xeon vdpbf16ps is slow enough that it is not faster, 20.5 GB/s).
Measured, not kept: x split into three bf16 parts with vdpbf16ps (exact, 9.8 GB/s per core); 16 rows in flight
(gate and up together: spills, 17 GB/s); AMX tdpbf16ps on tiles of converted weights (exact with the three parts
as three columns, but the tile stores bound it: 20.7 GB/s; 24.4 without the dot products, 60 without conversion).
Activation layout: the interleave puts codes 16L + j (lane L < 4, j < 8) in words 8L + j of the first bf16
vector and codes 16L + 8 + j in the second, so x is arranged once per token into the order the path reads
(`arrange`), then per 128-row block scaled by that block's column scales (`prepare`). Work split as decode.py
(phase 1: gate, then up, per (assignment, 64-row item); phase 2: 64-row output chunks summed over assignments),
8 rows in flight, stream i reading rows r + 8i .. r + 8i + 7 one after another, 512 B software prefetch per row.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd_ir as sir
from .decode import _silu_clamped
from .fp8 import FP8_UNIT, fp8_to_f32

def _isa() -> str | None:
    """avx512: the table conversion; avx2: in-register placement, only on AMD Zen (its FMA takes the fp32 denormals
    that e4m3 subnormals become at full speed; Intel cores take a microcode assist per denormal); else None."""
    if sir.has_features("HYBRID_FP8_SIMD", "avx512f", "avx512bw", "avx512vbmi", "avx512bf16"):
        return "avx512"
    if sir.has_features("HYBRID_FP8_SIMD", "avx2", "fma") and sir.cpu_name().startswith("znver"):
        return "avx2"
    return None


ISA = _isa()
SIMD = ISA is not None
FAST = ISA == "avx512"  # the fast mode's vdpbf16ps; elsewhere fast decodes exactly
NR = 8 if ISA == "avx512" else 4  # rows in flight (AVX2: 16 registers)
CHUNK = 64  # rows per work item (within one 128-row scale block)
CX = 64  # codes per 64-byte chunk of a row
PREFETCH = 512  # bytes ahead in each weight row
# AVX2 placement: the fp32 pattern is the e4m3 value times 2^-120; x carries 2^60 of it (folded into the block
# scales: an x * s up to 2^68 stays finite, products of x * s down to 2^-51 stay normal) and each row's sum the rest
X_UNIT = OUT_UNIT = np.float32(2.0**60) if ISA == "avx2" else np.float32(1.0)


def _bf16_tables() -> tuple[np.ndarray, np.ndarray]:
    """Low and high byte of the bf16 pattern of each e4m3 magnitude 0..127 (0x7F, a NaN code: bf16 NaN)."""
    codes = np.arange(128)
    exp, man = codes >> 3, codes & 7
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0)).astype(np.float32)
    bits = mag.view(np.uint32) >> 16
    assert ((bits << 16).view(np.float32) == mag)[:127].all()  # every finite magnitude is a bf16
    bits[127] = 0x7FC0
    return (bits & 0xFF).astype(np.uint8), (bits >> 8).astype(np.uint8)


_LO, _HI = _bf16_tables()
# word j of the first bf16 vector <- code 16 (j // 8) + j % 8, of the second <- that + 8 (vpunpcklbw / vpunpckhbw)
_WORDS_A = [v for L in range(4) for j in range(8) for v in (16 * L + j, 64 + 16 * L + j)]
_WORDS_B = [v for L in range(4) for j in range(8) for v in (16 * L + 8 + j, 64 + 16 * L + 8 + j)]


def _bytes(vals) -> ir.Constant:
    return ir.Constant(sir.V64I8, [ir.Constant(sir.I8, int(v) - 256 if v > 127 else int(v)) for v in vals])


def _rows_codegen(fast: bool):
    """Dots of the full 64-byte chunks of rows r + i * st (i < 8) of W with the arranged x: fp32 (exact: the bf16
    words widened by a shift and a mask, 4 FMAs) or bf16 (fast: 2 vdpbf16ps)."""

    def codegen(context, builder, sig, args):
        r, st = args[1], args[2]
        wp, W = sir.array_data(context, builder, sig.args[0], args[0])
        Kb = builder.extract_value(W.shape, 1)
        rows = sir.row_pointers(builder, wp, Kb, r, st, 8)
        xp = sir.array_data(context, builder, sig.args[3], args[3])[0]
        tables = [_bytes(t) for t in (_LO[:64], _LO[64:], _HI[:64], _HI[64:])]
        sign, high = sir.splat(sir.V64I8, -128), sir.splat(sir.V16I32, 0xFFFF0000 - (1 << 32))
        accs = [cgutils.alloca_once_value(builder, sir.splat(sir.V16F32, 0.0)) for _ in rows]
        with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(sir.I64, CX))) as loop:
            woff = builder.mul(loop.index, ir.Constant(sir.I64, CX))
            if fast:  # 64 bf16 words per chunk: the first and the second interleaved vector's activations
                xoff = builder.mul(loop.index, ir.Constant(sir.I64, 2 * CX))
                xs = [sir.vload(builder, xp, builder.add(xoff, ir.Constant(sir.I64, 64 * q)), sir.V32BF16)
                      for q in range(2)]  # fmt: skip
            else:  # 64 floats per chunk: even and odd words of the first vector, then of the second
                xoff = builder.mul(loop.index, ir.Constant(sir.I64, 4 * CX))
                xs = [sir.vload(builder, xp, builder.add(xoff, ir.Constant(sir.I64, 64 * q)), sir.V16F32)
                      for q in range(4)]  # fmt: skip
            ahead = builder.add(woff, ir.Constant(sir.I64, PREFETCH))
            for wrow, acc in zip(rows, accs):
                if PREFETCH: sir.prefetch(builder, builder.gep(wrow, [ahead]))
                raw = sir.vload(builder, wrow, woff, sir.V64I8)
                lo = sir.call(builder, "llvm.x86.avx512.vpermi2var.qi.512", sir.V64I8, [tables[0], raw, tables[1]])
                hi = sir.call(builder, "llvm.x86.avx512.vpermi2var.qi.512", sir.V64I8, [tables[2], raw, tables[3]])
                hi = builder.or_(hi, builder.and_(raw, sign))
                words = [builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(sir.I32, 64), w))
                         for w in (_WORDS_A, _WORDS_B)]  # fmt: skip
                v = builder.load(acc)
                if fast:
                    for w, xv in zip(words, xs):
                        v = sir.dpbf16(builder, v, builder.bitcast(w, sir.V32BF16), xv)
                else:
                    for q, w in enumerate(words):
                        d = builder.bitcast(w, sir.V16I32)
                        even = builder.bitcast(builder.shl(d, sir.splat(sir.V16I32, 16)), sir.V16F32)
                        odd = builder.bitcast(builder.and_(d, high), sir.V16F32)
                        v = sir.fma(builder, odd, xs[2 * q + 1], sir.fma(builder, even, xs[2 * q], v))
                builder.store(v, acc)
        return context.make_tuple(builder, sig.return_type, [sir.hsum(builder, builder.load(a)) for a in accs])

    return codegen


def _rows_avx2_codegen(context, builder, sig, args):
    """AVX2 (exact): NR rows; a 32-byte half of a chunk, as 16-bit words, gives the odd codes' bf16-like patterns
    (sign at 15, exponent and mantissa at 10..4: arithmetic shift by 4, mask) and, shifted left by 8 first, the even
    codes'; dword lane i's 4 codes become 4 fp32 vectors by a mask or a shift by 16: 9 integer ops and 4 FMAs per
    32 codes. Arranged x: xa[64c + 32h + 8b + i] = x of code 32h + 4i + b of chunk c."""
    r, st = args[1], args[2]
    wp, W = sir.array_data(context, builder, sig.args[0], args[0])
    Kb = builder.extract_value(W.shape, 1)
    rows = sir.row_pointers(builder, wp, Kb, r, st, NR)
    xp = sir.array_data(context, builder, sig.args[3], args[3])[0]
    mask16, high = sir.splat(sir.V16I16, 0x87F0), sir.splat(sir.V8I32, 0xFFFF0000)
    accs = [cgutils.alloca_once_value(builder, sir.splat(sir.V8F32, 0.0)) for _ in range(2 * NR)]
    with cgutils.for_range(builder, builder.udiv(Kb, ir.Constant(sir.I64, CX))) as loop:
        woff = builder.mul(loop.index, ir.Constant(sir.I64, CX))
        xoff = builder.mul(loop.index, ir.Constant(sir.I64, 4 * CX))
        ahead = builder.add(woff, ir.Constant(sir.I64, PREFETCH))
        for wrow in rows:
            if PREFETCH: sir.prefetch(builder, builder.gep(wrow, [ahead]))
        for half in range(2):
            hoff = builder.add(woff, ir.Constant(sir.I64, 32 * half))
            for i, wrow in enumerate(rows):
                xpr = sir.opaque(builder, xp)  # per row: 4 loads folded into the FMAs, not 4 registers spilled
                xs = [sir.vload(builder, xpr, builder.add(xoff, ir.Constant(sir.I64, 128 * half + 32 * b)), sir.V8F32)
                      for b in range(4)]  # fmt: skip
                raw = sir.vload(builder, wrow, hoff, sir.V16I16)
                odd = builder.and_(builder.ashr(raw, sir.splat(sir.V16I16, 4)), mask16)
                even = builder.and_(builder.ashr(builder.shl(raw, sir.splat(sir.V16I16, 8)), sir.splat(sir.V16I16, 4)),
                                    mask16)  # fmt: skip
                f = []
                for words in (even, odd):
                    d = builder.bitcast(words, sir.V8I32)
                    f += [builder.bitcast(builder.shl(d, sir.splat(sir.V8I32, 16)), sir.V8F32),
                          builder.bitcast(builder.and_(d, high), sir.V8F32)]  # fmt: skip
                # f holds bytes 0, 2, 1, 3 of each dword; two accumulators per row halve the FMA chain
                for b, fv in zip((0, 2, 1, 3), f):
                    acc = accs[2 * i + b % 2]
                    builder.store(sir.fma(builder, fv, xs[b], builder.load(acc)), acc)
    sums = [builder.fadd(builder.load(accs[2 * i]), builder.load(accs[2 * i + 1]), flags=("fast",)) for i in range(NR)]
    return context.make_tuple(builder, sig.return_type, [sir.hsum(builder, v) for v in sums])


def _rows_intrinsic(fast: bool):
    @intrinsic
    def rows(typingctx, W, r, st, X):
        if ISA == "avx2":
            return types.UniTuple(types.float32, NR)(W, r, st, X), _rows_avx2_codegen
        return types.UniTuple(types.float32, 8)(W, r, st, X), _rows_codegen(fast)

    return rows


_rows8, _rows8_fast = _rows_intrinsic(False), _rows_intrinsic(True)


@intrinsic
def _bf16(typingctx, v):
    """float32 rounded to the nearest bf16 (ties to even), still a float32 (its low 16 bits zero)."""

    def codegen(context, builder, sig, args):
        u = builder.bitcast(args[0], sir.I32)
        odd = builder.and_(builder.lshr(u, ir.Constant(sir.I32, 16)), ir.Constant(sir.I32, 1))
        u = builder.add(builder.add(u, ir.Constant(sir.I32, 0x7FFF)), odd)
        return builder.bitcast(builder.and_(u, ir.Constant(sir.I32, 0xFFFF0000 - (1 << 32))), sir.F32)

    return types.float32(types.float32), codegen


@intrinsic
def _top16(typingctx, v):
    """The bf16 bit pattern of a float32 whose low 16 bits are zero."""

    def codegen(context, builder, sig, args):
        u = builder.lshr(builder.bitcast(args[0], sir.I32), ir.Constant(sir.I32, 16))
        return builder.trunc(u, sir.I16)

    return types.uint16(types.float32), codegen


@njit(fastmath=True)
def arrange(x, xa, k0, k1, fast):
    """xa[k] = the activation of the code that position k of a chunk's arranged x multiplies, k0 <= k < k1 (whole
    chunks). A chunk's bf16 words: vector V (0: codes 16L + j, 1: codes 16L + 8 + j) word w (= 8L + j); the
    exact order is [V0 even words, V0 odd, V1 even, V1 odd] (16 floats each), the fast one [V0 words, V1 words]."""
    for k in range(k0, k1):
        c, j = k // CX, k % CX
        if ISA == "avx2":  # half h = j // 32, byte b = (j // 8) % 4, lane i = j % 8
            xa[k] = x[CX * c + 32 * (j // 32) + 4 * (j % 8) + (j // 8) % 4]
            continue
        if fast:
            v, w = j // 32, j % 32
        else:
            v, w = j // 32, 2 * (j % 16) + (j // 16) % 2
        xa[k] = x[CX * c + 16 * (w // 8) + 8 * v + w % 8]


@njit(fastmath=True)
def scale(xa, s, xs):
    """xs[k] = xa[k] * s[k // 128]: a 128-row block's column scales folded into the arranged activations."""
    for b in range((xs.shape[0] + 127) // 128):
        sc = s[b] * X_UNIT
        for k in range(np.uint64(128 * b), np.uint64(min(xs.shape[0], 128 * b + 128))):
            xs[k] = xa[k] * sc


@njit
def scale_bf16(xa, s, xb):
    """xb[k] = bf16 bits of xa[k] * s[k // 128], rounded to nearest even (the fast mode's activations)."""
    for b in range((xb.shape[0] + 127) // 128):
        sc = s[b]
        for k in range(np.uint64(128 * b), np.uint64(min(xb.shape[0], 128 * b + 128))):
            xb[k] = _top16(_bf16(xa[k] * sc))


@njit(fastmath=True)
def prepare(xa, s, xs, fast):
    if fast:
        scale_bf16(xa, s, xs.view(np.uint16)[: xs.shape[0]])
    else:
        scale(xa, s, xs)


@njit(fastmath=True, inline="always")
def _tail(W, row, s, x, k0):
    """Columns k0.. of row `row` (a last, partial chunk, or a whole row) in fp32 with the generic conversion."""
    a = np.float32(0.0)
    for k in range(k0, W.shape[1]):
        a += fp8_to_f32(W[row, k]) * x[k] * (s[k >> 7] * FP8_UNIT)
    return a


@njit(fastmath=True)
def gemv(W, s, r0, r1, xs, x, out, fast):
    """out[r - r0] = W[r] . (x * block scales s) for rows r0 <= r < r1 of one 128-row block (xs: `prepare`d)."""
    kf = W.shape[1] // CX * CX
    xb = xs.view(np.uint16)
    r = r0
    st = (r1 - r0) // NR
    while st > 0 and r + NR * st <= r1:
        for j in range(st):
            a = _rows8_fast(W, r + j, st, xb) if fast else _rows8(W, r + j, st, xs)
            for i in range(NR):
                out[r + j + i * st - r0] = a[i] * OUT_UNIT + _tail(W, r + j + i * st, s, x, kf)
        r += NR * st
    while r < r1:
        out[r - r0] = _tail(W, r, s, x, 0)
        r += 1


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def moe_decode_simd(x, ids, weights, gate, gate_s, up, up_s, down, down_s, out, fast):
    """decode.moe_decode with the table-converted rows (fast: activations rounded to bf16, vdpbf16ps)."""
    fast = fast and FAST  # AVX2 has no bf16 dot product: exact
    T, H = x.shape
    K = ids.shape[1]
    inter = gate.shape[1]
    P = T * K
    hf, nf = H // CX * CX, inter // CX * CX
    xa = np.empty((T, hf), np.float32)
    for t in range(T):
        arrange(x[t], xa[t], 0, hf, fast)
    h = np.empty((P, inter), np.float32)
    n_in = (inter + CHUNK - 1) // CHUNK
    for item in prange(P * n_in):
        p, c = item // n_in, item % n_in
        t, e = p // K, ids[p // K, p % K]
        if e < 0:  # an assignment computed elsewhere
            continue
        r0, r1 = c * CHUNK, min(inter, c * CHUNK + CHUNK)
        sg, su = gate_s[e, r0 >> 7], up_s[e, r0 >> 7]
        xg = np.empty(hf, np.float32)  # fast: the first half holds the bf16 activations
        xu = np.empty(hf, np.float32)
        prepare(xa[t], sg, xg, fast)
        prepare(xa[t], su, xu, fast)
        g = np.empty(CHUNK, np.float32)
        u = np.empty(CHUNK, np.float32)
        gemv(gate[e], sg, r0, r1, xg, x[t], g, fast)  # gate's 8 rows, then up's: 16 at once spill registers
        gemv(up[e], su, r0, r1, xu, x[t], u, fast)
        for i in range(r1 - r0):
            h[p, r0 + i] = _silu_clamped(g[i]) * u[i]
    ha = np.empty((P, nf), np.float32)
    for p in prange(P):
        arrange(h[p], ha[p], 0, nf, fast)
    n_out = (H + CHUNK - 1) // CHUNK
    for c in prange(n_out):
        r0, r1 = c * CHUNK, min(H, c * CHUNK + CHUNK)
        y = np.empty(CHUNK, np.float32)
        xd = np.empty(nf, np.float32)
        for t in range(T):
            out[t, r0:r1] = 0.0
        for p in range(P):
            t, k = p // K, p % K
            e = ids[t, k]
            if e < 0:
                continue
            sd = down_s[e, r0 >> 7]
            prepare(ha[p], sd, xd, fast)
            gemv(down[e], sd, r0, r1, xd, h[p], y, fast)
            wk = weights[t, k]
            for i in range(r1 - r0):
                out[t, r0 + i] += wk * y[i]
