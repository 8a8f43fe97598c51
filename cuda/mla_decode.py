"""MLA absorbed decode attention (flash-decoding): one query token, nh heads, against the latent cache.

Each (split, head block) program scores its slice of the context, s = (q_abs . c + q_pe . pe) * scale, and writes
its running max, sum of exps and unnormalised p @ c; the combine merges the splits by log-sum-exp. The cache is
read in its own dtype (bf16 on GPUs) and widened in registers: never an fp32 copy of the cache.
Loaded by hybrid/gpu_kernels.py (this folder is not a package). Reductions call tl.reduce with triton's own combine
functions rather than tl.max / tl.sum (which do exactly that): those two are @triton.jit functions, which the
interpreter cannot call when triton was imported before TRITON_INTERPRET was set; it recognises the combine functions.
"""

import triton
import triton.language as tl


@triton.jit
def mla_split_kernel(qa_ptr, qpe_ptr, c_ptr, pe_ptr, m_ptr, l_ptr, acc_ptr, nh, length, split_tokens, scale,
                     stride_c, stride_pe, C, DR, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Partials of split s for heads of block hb: m, l [splits, nh] and acc [splits, nh, C]."""
    split, hb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # int64 index math throughout
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c, offs_r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    mask_h, mask_c, mask_r = heads < nh, offs_c < C, offs_r < DR
    q = tl.load(qa_ptr + heads[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :], other=0.0)
    q_pe = tl.load(qpe_ptr + heads[:, None] * DR + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :],
                   other=0.0)  # fmt: skip
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, length)
    t = start + tl.arange(0, BLOCK_T)
    # columns past C / DR are clamped (their q is 0); tokens past `end` are masked to 0, never read: the cache
    # beyond `length` may hold anything, and 0 * NaN would poison the sums
    c_ptrs = c_ptr + t[:, None] * stride_c + tl.minimum(offs_c, C - 1)[None, :]
    pe_ptrs = pe_ptr + t[:, None] * stride_pe + tl.minimum(offs_r, DR - 1)[None, :]
    c_step, pe_step = BLOCK_T * stride_c, BLOCK_T * stride_pe
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_H,), 0.0, tl.float32)
    acc = tl.full((BLOCK_H, BLOCK_C), 0.0, tl.float32)
    for _ in range(start, end, BLOCK_T):  # every tile holds >= 1 valid token, so m_i is finite after it
        mask_t = t < end
        kc = tl.load(c_ptrs, mask=mask_t[:, None], other=0.0).to(tl.float32)  # bf16 widened in registers
        kpe = tl.load(pe_ptrs, mask=mask_t[:, None], other=0.0).to(tl.float32)
        # bf16 cache values are exact in tf32; tf32x3 splits the fp32 operand so the dots keep fp32 accuracy
        s = tl.dot(q_pe, tl.trans(kpe), tl.dot(q, tl.trans(kc), input_precision="tf32x3"), input_precision="tf32x3")
        s = tl.where(mask_t[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))  # = tl.max: see the docstring
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)  # = tl.sum
        acc = tl.dot(p, kc, acc * alpha[:, None], input_precision="tf32x3")
        m_i = m_new
        t += BLOCK_T
        c_ptrs += c_step
        pe_ptrs += pe_step
    part = split * nh + heads
    tl.store(m_ptr + part, m_i, mask=mask_h)
    tl.store(l_ptr + part, l_i, mask=mask_h)
    tl.store(acc_ptr + part[:, None] * C + offs_c[None, :], acc, mask=mask_h[:, None] & mask_c[None, :])


@triton.jit
def mla_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, nh, n_splits, C, BLOCK_C: tl.constexpr):
    """ctx[h] = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s: the splits merged by log-sum-exp."""
    h = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    m_run, l_run = tl.load(m_ptr + h), tl.load(l_ptr + h)  # split 0: every split holds >= 1 token
    acc = tl.load(acc_ptr + h * C + offs_c, mask=mask_c, other=0.0)
    for s in range(1, n_splits):
        part = s * nh + h
        m_s = tl.load(m_ptr + part)
        m_new = tl.maximum(m_run, m_s)
        alpha, beta = tl.exp(m_run - m_new), tl.exp(m_s - m_new)
        l_run = l_run * alpha + tl.load(l_ptr + part) * beta
        acc = acc * alpha + tl.load(acc_ptr + part * C + offs_c, mask=mask_c, other=0.0) * beta
        m_run = m_new
    tl.store(out_ptr + h * C + offs_c, acc / l_run, mask=mask_c)
