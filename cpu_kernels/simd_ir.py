"""LLVM IR building blocks for the AVX-512 inner loops (int4_simd.py, fp8_simd.py): what Numba's vectoriser will
not emit (vpermps / vpermi2b table lookups, vdpbf16ps) is written here once and inlined into Numba intrinsics."""

from __future__ import annotations

import os

from llvmlite import ir
from numba.core import cgutils

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
V16I32, V16F32, V64I8 = ir.VectorType(I32, 16), ir.VectorType(F32, 16), ir.VectorType(I8, 64)
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


def has_features(env: str, *features: str) -> bool:
    """All of `features` (e.g. "avx512f") are compiled for, and the env switch `env` is not "0"."""
    have = cpu_features()
    return os.environ.get(env, "1") != "0" and all(f"+{f}" in have for f in features)


def splat(vty, v):
    return ir.Constant(vty, [ir.Constant(vty.element, v)] * vty.count)


def call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def vload(builder, base, off, vty):
    """Unaligned load of a vector at byte offset `off` (i64) from the i8* `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [off]), vty.as_pointer()), align=1)


def fma(builder, a, b, c):
    return call(builder, "llvm.fma.v16f32", V16F32, [a, b, c])


def dpbf16(builder, acc, a, b):
    """acc[i] += a[2i] * b[2i] + a[2i+1] * b[2i+1] (vdpbf16ps: bf16 products are exact in fp32)."""
    return call(builder, "llvm.x86.avx512bf16.dpbf16ps.512", V16F32, [acc, a, b])


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


def array_data(context, builder, ty, val):
    """(i8* data, the array struct) of a Numba array argument."""
    arr = context.make_array(ty)(context, builder, val)
    return builder.bitcast(arr.data, I8P), arr
