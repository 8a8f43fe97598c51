"""Native-INT4 linear (Kimi-K2-Thinking / K2.5 compressed-tensors `pack-quantized` routed experts), read straight
from the packed words (no dequantized copy), fp32 accumulation.

Format (KIMI_K2.md 8.4): packed int32 [N, K/8], element k of a row in bits 4*(k%8)..+3 of word k//8; offset binary
q = nibble - 8 in -8..7; scale bf16 [N, K/32]; W[n, k] = q * float32(scale[n, k // 32]). The words are signed int32
here: `>>` is an arithmetic shift, and the & 0xF after it keeps exactly the 4 bits wanted whatever the sign.
q * scale has at most 11 significant bits (bf16's 8 times 3 for |q| <= 8): exact in tf32, so tf32x3 (which splits
x into two tf32 halves) gives fp32 accuracy; plain tf32 would round x to 11 bits (~1e-3).
Loaded by hybrid/gpu_kernels.py (this folder is not a package); launcher, checks and reference live there. No nested
@triton.jit calls (tl.zeros, tl.sum, helpers): see cuda/fp8_linear.py's docstring.
"""

import triton
import triton.language as tl


@triton.jit
def int4_linear_kernel(x_ptr, p_ptr, s_ptr, y_ptr, M, N, K, m_blocks, k_tiles, tiles_per_split, stride_xm,
                       stride_ys, stride_ym, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):  # fmt: skip
    """y[split, m, n] = sum over this split's K tiles of x[m, k] * W[n, k]."""
    tl.static_assert(BLOCK_K % 32 == 0)  # whole scale groups per K tile
    # int64 index math: no 2^31 limits, and the interpreter skips its int32 overflow checks
    pid, split = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    # row blocks vary fastest: the programs running together unpack the same weight tiles (L2 hits, not HBM)
    pid_m, pid_n = pid % m_blocks, pid // m_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    # clamped rows read valid memory without masks; their results land in rows and columns the store drops
    rows = tl.minimum(offs_n, N - 1)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)  # activation columns
    offs_w = first * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)  # packed words: 8 columns each
    offs_g = first * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)  # scale groups: 32 columns each
    x_ptrs = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_xm + offs_k[None, :]
    p_ptrs = p_ptr + rows[:, None] * (K // 8) + offs_w[None, :]
    s_ptrs = s_ptr + rows[:, None] * (K // 32) + offs_g[None, :]
    shifts = tl.arange(0, 8) * 4
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for _ in range(first, last):
        if EVEN_K:  # no masks in the loop
            x = tl.load(x_ptrs)
            words = tl.load(p_ptrs)
            s = tl.load(s_ptrs)
        else:  # a ragged last K tile (K is a multiple of 32): zero activations and scales beyond K
            x = tl.load(x_ptrs, mask=(offs_k < K)[None, :], other=0.0)
            words = tl.load(p_ptrs, mask=(offs_w < K // 8)[None, :], other=0)
            s = tl.load(s_ptrs, mask=(offs_g < K // 32)[None, :], other=0.0)
            offs_k += BLOCK_K
            offs_w += BLOCK_K // 8
            offs_g += BLOCK_K // 32
        # [BN, BK/8, 8] nibbles, word j's nibble i at 8j + i: row-major reshapes keep the columns in order
        nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        q = tl.reshape(nib, (BLOCK_N, BLOCK_K // 32, 32)).to(tl.float32) - 8.0
        w = tl.reshape(q * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))  # exact: see the docstring
        acc += tl.dot(x, tl.trans(w), input_precision="tf32x3")
        x_ptrs += BLOCK_K
        p_ptrs += BLOCK_K // 8
        s_ptrs += BLOCK_K // 32
    y = y_ptr + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc, mask=mask_m[:, None] & mask_n[None, :])
