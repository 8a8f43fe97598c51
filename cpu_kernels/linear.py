"""y = x W^T for a block-scaled fp8 weight and a few tokens (the CPU path of non-expert linears in decode).

Reads the fp8 codes once (1 byte per weight) instead of materialising an fp32 copy (4 bytes written, 4 read).
Rows are split into 64-row items across threads, each streamed by `gemv_rows` like the expert kernels.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .fp8 import BLOCK, gemv_rows

CHUNK = 64


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _fp8_linear(x, W, S, out):
    T, K = x.shape
    N = W.shape[0]
    n_chunks = (N + CHUNK - 1) // CHUNK
    for item in prange(T * n_chunks):
        t, c = item // n_chunks, item % n_chunks
        r0, r1 = c * CHUNK, min(N, c * CHUNK + CHUNK)
        y = np.empty(CHUNK, np.float32)
        xs = np.empty(K, np.float32)
        gemv_rows(W, S, r0, r1, x[t], y, xs)
        for i in range(r1 - r0):
            out[t, r0 + i] = y[i]


def fp8_linear(x: np.ndarray, W: np.ndarray, S: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [T, N] = x [T, K] @ (W [N, K] int8 e4m3 codes * block scales S [ceil(N/128), ceil(K/128)])^T."""
    T, K = x.shape
    N = W.shape[0]
    want_s = (-(-N // BLOCK), -(-K // BLOCK))
    if (x.dtype != np.float32 or W.dtype != np.int8 or W.shape[1] != K or S.dtype != np.float32
            or S.shape != want_s or out.dtype != np.float32 or out.shape != (T, N)):  # fmt: skip
        raise ValueError(f"fp8_linear: x float32 [T, K], W int8 [N, K], S float32 {want_s}, out float32 [T, N]; "
                         f"got {x.dtype}{x.shape}, {W.dtype}{W.shape}, {S.dtype}{S.shape}, {out.dtype}{out.shape}")
    for name, a in (("x", x), ("W", W), ("S", S), ("out", out)):
        if not a.flags.c_contiguous:
            raise ValueError(f"fp8_linear: {name} must be C-contiguous")
    _fp8_linear(x, W, S, out)
    return out


@intrinsic
def bf16_to_f32(typingctx, bits):
    """int16 bf16 bit pattern -> float32 (exact: bf16 is the top half of an fp32)."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _bf16_linear(x, W, out):
    T, K = x.shape
    N = W.shape[0]
    n_chunks = (N + CHUNK - 1) // CHUNK
    for item in prange(n_chunks):
        r0, r1 = item * CHUNK, min(N, item * CHUNK + CHUNK)
        for r in range(r0, r1):
            w = W[r]
            for t in range(T):
                xt = x[t]
                a = np.float32(0.0)
                for k in range(np.uint64(K)):
                    a += bf16_to_f32(w[k]) * xt[k]
                out[t, r] = a


def bf16_linear(x: np.ndarray, W: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [T, N] = x [T, K] @ W^T for bf16 W given as its int16 bit patterns [N, K] (the lm_head in decode)."""
    T, K = x.shape
    if x.dtype != np.float32 or W.dtype != np.int16 or W.shape[1] != K or out.dtype != np.float32 \
            or out.shape != (T, W.shape[0]) or not (x.flags.c_contiguous and W.flags.c_contiguous):  # fmt: skip
        raise ValueError(f"bf16_linear: x float32 [T, K], W int16 [N, K], out float32 [T, N]; "
                         f"got {x.dtype}{x.shape}, {W.dtype}{W.shape}, {out.dtype}{out.shape}")
    _bf16_linear(x, W, out)
    return out
