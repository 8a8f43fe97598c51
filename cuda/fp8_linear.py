"""Block-fp8 e4m3 (or plain bf16) products for decode, read straight from the stored weights (no dequantized or fp32
copy), fp32 accumulation.

W[r, k] = fp8(q[r, k]) * scale[r // 128, k // 128]. Groups: group g uses its own activation rows and the weight rows
g * row_stride + row_offset + i, so one kernel serves a plain linear (one group) and MLA's per-head absorptions.
fp8 -> fp32: HW_FP8 uses the cvt instructions of sm_89+. sm_80/86 have none: the code b goes into an fp16 bit
pattern, ((b & 0x80) << 8) | ((b & 0x7F) << 7), which is exact for all 254 finite codes (subnormal codes land on fp16
subnormals) and worth value * 2^-8 (fp16's exponent bias 15 vs e4m3's 7): SCALE_MUL = 2^8 puts it back.
No nested @triton.jit calls (tl.zeros, tl.sum, helpers): the interpreter re-patches triton.language on each one
(~1 ms), and cannot call them at all when triton was imported before TRITON_INTERPRET was set.
BF16 (the K2-Thinking / K2.5 non-expert linears, KIMI_K2.md 8.4): the weight is plain bf16 [N, K], no block scale
(s_ptr is never read). bf16 -> fp32 is exact and so is fp32 -> tf32 of a bf16 value (8 significant bits of tf32's
11): tf32x3 keeps fp32 accuracy as for fp8. The K tile is free then (no scale column to follow).
Loaded by hybrid/gpu_kernels.py (this folder is not a package); launchers, checks and references live there.
"""

import triton
import triton.language as tl


@triton.jit
def fp8_linear_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, n_blocks, k_tiles, tiles_per_split, stride_xg,
                      stride_xm, row_stride, row_offset, s_cols, stride_ys, stride_yg, stride_ym,
                      SCALE_MUL: tl.constexpr, HW_FP8: tl.constexpr, BF16: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """y[split, g, m, n] = sum over this split's K tiles of x[g, m, k] * W[g * row_stride + row_offset + n, k]."""
    tl.static_assert(BF16 or BLOCK_K == 128)  # fp8: one scale column per K tile
    # int64 index math: no 2^31 limits, and the interpreter skips its int32 overflow checks
    pid_n, split = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    g = pid_n // n_blocks
    offs_n = (pid_n % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)  # M <= 16 rows padded to 16: mma tiles need 16
    mask_n, mask_m = offs_n < N, offs_m < M
    # clamped rows read valid memory without masks; their results land in rows and columns the store drops
    rows = g * row_stride + row_offset + tl.minimum(offs_n, N - 1)  # need not align to 128: scales per row
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + g * stride_xg + tl.minimum(offs_m, M - 1)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = q_ptr + rows[:, None] * K + offs_k[None, :]
    s_ptrs = s_ptr + (rows // 128) * s_cols + first
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for _ in range(first, last):
        if EVEN_K:  # no masks in the loop: the step is loads, convert, dot and scale
            x = tl.load(x_ptrs)
            codes = tl.load(w_ptrs)
        else:  # a ragged last K tile: zeros beyond K in both operands
            x = tl.load(x_ptrs, mask=(offs_k < K)[None, :], other=0.0)
            codes = tl.load(w_ptrs, mask=(offs_k < K)[None, :], other=0.0)
            offs_k += BLOCK_K
        # the weights are exact in tf32, x is not: tf32x3 keeps fp32 accuracy (plain tf32 loses ~1e-3)
        if BF16:  # plain bf16, no scale: widened exactly
            acc = tl.dot(x, tl.trans(codes.to(tl.float32)), acc, input_precision="tf32x3")
        else:
            if HW_FP8:  # sm_89+: cvt instructions for e4m3
                w = codes.to(tl.float32)
            else:  # sm_80/86: see the module docstring
                b = codes.to(tl.uint16)
                w = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision="tf32x3") * tl.load(s_ptrs)[None, :]
            s_ptrs += 1
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= SCALE_MUL  # the bit path's 2^8, exact (a power of two) and out of the loop
    y = y_ptr + split * stride_ys + g * stride_yg + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def fp8_linear_t_kernel(x_ptr, q_ptr, s_ptr, y_ptr, R, K, stride_xg, row_stride, row_offset, s_cols,
                        SCALE_MUL: tl.constexpr, HW_FP8: tl.constexpr, BF16: tl.constexpr, EVEN_R: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """y[g, k] = sum_r x[g, r] * W[g * row_stride + row_offset + r, k]: a contraction over the weight's rows."""
    tl.static_assert(BF16 or 128 % BLOCK_K == 0)  # fp8: a column tile lies in one scale column
    g, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_k, offs_r = pid_k * BLOCK_K + tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_R).to(tl.int64)
    rows = g * row_stride + row_offset + offs_r
    x_ptrs = x_ptr + g * stride_xg + offs_r
    w_ptrs = q_ptr + rows[:, None] * K + tl.minimum(offs_k, K - 1)[None, :]  # clamped columns: dropped at the store
    s_col = s_ptr + (pid_k * BLOCK_K) // 128
    w_step = BLOCK_R * K
    acc = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)  # reduced over rows once, after the loop
    for _ in range(0, R, BLOCK_R):
        if EVEN_R:  # no masks in the loop
            x = tl.load(x_ptrs)
            if not BF16:
                x *= tl.load(s_col + (rows // 128) * s_cols)
            codes = tl.load(w_ptrs)
        else:
            mask_r = rows < g * row_stride + row_offset + R
            x = tl.load(x_ptrs, mask=mask_r, other=0.0)
            if not BF16:
                x *= tl.load(s_col + (rows // 128) * s_cols, mask=mask_r, other=0.0)
            codes = tl.load(w_ptrs, mask=mask_r[:, None], other=0.0)
        if BF16 or HW_FP8:  # bf16 widens exactly; sm_89+ converts e4m3 with cvt instructions
            w = codes.to(tl.float32)
        else:
            b = codes.to(tl.uint16)
            w = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32)
        acc += x[:, None] * w  # one row of x: CUDA-core FMAs, no mma
        x_ptrs += BLOCK_R
        w_ptrs += w_step
        rows += BLOCK_R
    y = tl.reduce(acc, 0, tl.standard._sum_combine)  # = tl.sum(acc, 0): see mla_decode.py's docstring
    tl.store(y_ptr + g * K + offs_k, y * SCALE_MUL, mask=offs_k < K)
