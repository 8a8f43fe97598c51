"""LLVM IR building blocks for the AVX-512 and AVX2 inner loops (int4_simd.py, fp8_simd.py): what Numba's vectoriser
will not emit (vpermps / vpermi2b table lookups, vdpbf16ps, in-register code placement) is written here once and
inlined into Numba intrinsics."""

from __future__ import annotations

import os

from llvmlite import ir
from numba.core import cgutils

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
V16I32, V16F32, V64I8 = ir.VectorType(I32, 16), ir.VectorType(F32, 16), ir.VectorType(I8, 64)
V8I32, V8F32 = ir.VectorType(I32, 8), ir.VectorType(F32, 8)
V16I16, V32I8 = ir.VectorType(I16, 16), ir.VectorType(I8, 32)
I8P = ir.PointerType(I8)


class _BFloat(ir.Type):
    """LLVM's bfloat, which llvmlite's IR builder lacks (vdpbf16ps takes <32 x bfloat>)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


V32BF16 = ir.VectorType(_BFloat(), 32)


def cpu_features() -> list[str]:
    """The features Numba compiles for: NUMBA_CPU_FEATURES, none for a named generic target, else the host's."""
    from numba.core import config

    if config.CPU_FEATURES is not None:
        return config.CPU_FEATURES.split(",")
    if config.CPU_NAME is not None:  # a named target (NUMBA_CPU_NAME=generic for portable caches): no host features
        return []
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_features().flatten().split(",")


def cpu_name() -> str:
    """The CPU Numba compiles for (NUMBA_CPU_NAME, else the host's, e.g. "znver3", "sapphirerapids")."""
    from numba.core import config

    if config.CPU_NAME is not None:
        return config.CPU_NAME
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_name()


def has_features(env: str, *features: str) -> bool:
    """All of `features` (e.g. "avx512f") are compiled for, and the env switch `env` is not "0"."""
    have = cpu_features()
    return os.environ.get(env, "1") != "0" and all(f"+{f}" in have for f in features)


def splat(vty, v):
    """<n x ty> of v; an unsigned integer pattern (0xFFFF0000) is wrapped into the element's signed range."""
    if isinstance(vty.element, ir.IntType) and v >= 1 << (vty.element.width - 1):
        v -= 1 << vty.element.width
    return ir.Constant(vty, [ir.Constant(vty.element, v)] * vty.count)


def call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def vload(builder, base, off, vty):
    """Unaligned load of a vector at byte offset `off` (i64) from the i8* `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [off]), vty.as_pointer()), align=1)


def fma(builder, a, b, c):
    """a * b + c, one rounding (<16 x float> or <8 x float>)."""
    return call(builder, f"llvm.fma.v{a.type.count}f32", a.type, [a, b, c])


def dpbf16(builder, acc, a, b):
    """acc[i] += a[2i] * b[2i] + a[2i+1] * b[2i+1] (vdpbf16ps: bf16 products are exact in fp32)."""
    return call(builder, "llvm.x86.avx512bf16.dpbf16ps.512", V16F32, [acc, a, b])


def opaque(builder, p):
    """p, hidden from LLVM's optimiser (an empty inline asm): loads through it are not merged across rows, so they
    stay memory operands of the FMAs instead of values held in (and spilled from) the 16 AVX2 registers."""
    return builder.call(ir.InlineAsm(ir.FunctionType(p.type, [p.type]), "", "=r,0", side_effect=True), [p])


def prefetch(builder, ptr):
    """Software prefetch of `ptr` into L1 (read, high locality, data)."""
    call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr] + [ir.Constant(I32, v) for v in (0, 3, 1)])


def hsum(builder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi, flags=("fast",))
    return builder.extract_element(v, ir.Constant(I32, 0))


def row_pointers(builder, base, row_bytes, r, st, n):
    """i8* pointers to rows r, r + st, ..., r + (n - 1) st of a row-major array at `base` (i64 r, st, row_bytes)."""
    return [builder.gep(base, [builder.mul(builder.add(r, builder.mul(st, ir.Constant(I64, i))), row_bytes)])
            for i in range(n)]  # fmt: skip


def array_data(context, builder, ty, val):
    """(i8* data, the array struct) of a Numba array argument."""
    arr = context.make_array(ty)(context, builder, val)
    return builder.bitcast(arr.data, I8P), arr
