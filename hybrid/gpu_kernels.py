"""GPU kernels (Triton sources in cuda/): launchers with input checks, and the plain-torch references.
fp8_linear* (block-fp8 weights; the grouped forms also plain bf16 with scale=None), bf16_linear (the non-expert
linears of K2-Thinking / K2.5), int4_linear (the native-INT4 routed experts), mla_decode (fp8 or bf16 kv_b).

Without CUDA, or with HYBRID_GPU_STANDIN=1, the same kernels run on CPU tensors through Triton's interpreter.
Block sizes are fixed for an H100 and the interpreter runs the same ones, so CPU tests check the GPU's tiling.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import torch

from . import device as gpu_device
from .device import standin_enabled
from .fp8 import dequantize

SOURCES = Path(__file__).resolve().parents[1] / "cuda"
MAX_TOKENS = 16  # fp8_linear pads the tokens to one 16-row mma tile
BLOCK_N, BLOCK_K = 64, 128  # fp8_linear: 8 KB of codes per step, one scale column per K tile
# bf16 weights in the same kernel (no scale column to follow): BF16_TILES, the largest that compile without spills
# for sm_80 and sm_90 (bench/gpu_compile.py); its split-K programs stream >= MIN_TILES_PER_SPLIT * BLOCK_K columns
BF16_TILES = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
BLOCK_R_T, BLOCK_K_T = 64, 128  # the transposed product: 8 KB of codes per step
BLOCK_H, BLOCK_T = 16, 32  # mla_decode: 16 heads share each cache tile; 32 tokens (36 KB of bf16) per step
MIN_TILES_PER_SPLIT = 4  # split-K programs stream >= 512 columns (32 KB of codes) each
MIN_SPLIT_TOKENS = 256  # below this the [splits, nh, C] partials cost more than the cache they summarise
WAVES = 4  # programs per SM to aim for: enough loads in flight to saturate HBM
INT4_GROUP = 32  # int4_linear: columns per bf16 scale
# int4_linear tiles, the largest that compile without spills for sm_80 and sm_90 (bench/gpu_compile.py): decode
# (M <= 16, memory-bound) reads 2 KB of packed words a step, two programs per SM; prefill (compute-bound) unpacks
# each weight tile once for 64 activation rows, one scale group a step
INT4_DECODE = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
INT4_PREFILL = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}


def interpreting() -> bool:
    """True where the kernels run on CPU tensors through Triton's interpreter."""
    return standin_enabled() or not torch.cuda.is_available()


@functools.cache
def _sources():
    """The cuda/*.py modules, loaded (and their kernels decorated) after the interpreter switch is set."""
    if interpreting():
        os.environ["TRITON_INTERPRET"] = "1"
        import triton

        # triton reads the variable when a kernel is decorated, unless a program set the knob itself: override
        triton.knobs.runtime.interpret = True
    modules = {}
    for name in ("fp8_linear", "int4_linear", "mla_decode"):
        spec = importlib.util.spec_from_file_location(f"hybrid_cuda_{name}", SOURCES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def _use_hw_fp8(t: torch.Tensor, hw_fp8: bool | None) -> bool:
    gpu = gpu_device.of(t)
    has_cvt = gpu.capability() >= (8, 9)  # sm_89+: fp8 conversion instructions
    _check(has_cvt or not hw_fp8, "hw_fp8", f"{gpu.name} (compute capability {gpu.capability()}) has no fp8 "
           "conversion instructions (sm_89+ only)")  # fmt: skip
    return has_cvt if hw_fp8 is None else hw_fp8


def _check(cond: bool, name: str, problem: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {problem}")


def _check_weight(q: torch.Tensor, scale: torch.Tensor | None, device: torch.device, names=("q", "scale")) -> None:
    """fp8 codes and their fp32 128x128 block scales, or (scale None) a plain bf16 weight."""
    qn, sn = names
    want = torch.bfloat16 if scale is None else torch.float8_e4m3fn
    _check(q.dtype == want and q.dim() == 2, qn, f"must be a 2-D {str(want)[6:]} tensor"
           f"{' (no scale: a plain bf16 weight)' if scale is None else ''}, got {q.dtype} {tuple(q.shape)}")  # fmt: skip
    _check(q.is_contiguous(), qn, "must be contiguous (a weight is never copied silently)")
    if scale is not None:
        grid = (math.ceil(q.shape[0] / 128), math.ceil(q.shape[1] / 128))
        _check(scale.dtype == torch.float32, sn, f"must be float32, got {scale.dtype}")
        _check(tuple(scale.shape) == grid, sn, f"shape {tuple(scale.shape)} does not match {qn}'s 128x128 blocks "
               f"{grid}")  # fmt: skip
    for name, t in ((qn, q), (sn, scale)) if scale is not None else ((qn, q),):
        _check(t.device == device, name, f"is on {t.device}, the activations on {device}")
    _check(device.type == "cuda" or interpreting(), qn, f"is on {device}: the kernels compile for CUDA tensors (set "
           "HYBRID_GPU_STANDIN=1 to interpret them on the CPU)")  # fmt: skip


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
               hw_fp8: bool | None = None, split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x [M<=16, K] fp32 @ (fp8(q) * block scale)^T, read straight from the fp8 codes."""
    _check(scale is not None, "scale", "is None: a bf16 weight goes to bf16_linear")
    _check(x.dim() == 2, "x", f"must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(q.dim() == 2, "q", f"must be 2-D [N, K], got shape {tuple(q.shape)}")
    _check(out is None or out.dim() == 2, "out", "must be 2-D [M, N]")
    y = fp8_linear_grouped(x[None], q, scale, q.shape[0], 0, 0, None if out is None else out[None],
                           hw_fp8=hw_fp8, split_k=split_k)  # fmt: skip
    return y[0] if out is None else out


def bf16_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, *,
                split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x [M<=16, K] fp32 @ w^T, w a bf16 [N, K] weight read as it is stored (never an fp32 copy)."""
    _check(x.dtype == torch.float32 and x.dim() == 2, "x", f"must be a 2-D float32 tensor [M, K], got "
           f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    _check_weight(w, None, x.device, ("w", "scale"))
    _check(w.shape[1] == x.shape[1], "w", f"has {w.shape[1]} columns, x has {x.shape[1]}")
    _check(out is None or out.dim() == 2, "out", "must be 2-D [M, N]")
    y = fp8_linear_grouped(x[None], w, None, w.shape[0], 0, 0, None if out is None else out[None], split_k=split_k)
    return y[0] if out is None else out


def fp8_linear_grouped(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, rows: int, row_stride: int,
                       row_offset: int = 0, out: torch.Tensor | None = None, *, hw_fp8: bool | None = None,
                       split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """y[g] = x[g] [M, K] @ W[g * row_stride + row_offset :][:rows]^T for each group g: -> [G, M, rows].
    scale None: q is a plain bf16 weight (hw_fp8 then means nothing)."""
    _check(x.dtype == torch.float32 and x.dim() == 3, "x", f"must be a 3-D float32 tensor [G, M, K], got "
           f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    G, M, K = x.shape
    _check(1 <= M <= MAX_TOKENS, "x", f"has {M} rows per group; the kernel takes 1..{MAX_TOKENS}")
    _check(G >= 1 and K >= 1, "x", f"is empty: shape {tuple(x.shape)}")
    _check_weight(q, scale, x.device)
    _check(q.shape[1] == K, "q", f"has {q.shape[1]} columns, x has {K}")
    _check(rows >= 1 and row_stride >= 0 and row_offset >= 0, "rows", "must be >= 1, row_stride and row_offset >= 0")
    last = (G - 1) * row_stride + row_offset + rows
    _check(last <= q.shape[0], "q", f"has {q.shape[0]} rows, the groups reach row {last}")
    if out is None:
        out = x.new_empty(G, M, rows)
    _check(out.dtype == torch.float32 and tuple(out.shape) == (G, M, rows) and out.stride(-1) == 1, "out",
           f"must be float32 {(G, M, rows)} with unit last stride, got {out.dtype} {tuple(out.shape)}")  # fmt: skip
    _check(out.device == x.device, "out", f"is on {out.device}, x on {x.device}")
    _check(split_k is None or split_k >= 1, "split_k", f"must be >= 1, got {split_k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    bf16 = scale is None
    hw = not bf16 and _use_hw_fp8(x, hw_fp8)
    t = BF16_TILES if bf16 else {"BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "num_warps": 4, "num_stages": 4}
    n_blocks, k_tiles = math.ceil(rows / t["BLOCK_N"]), math.ceil(K / t["BLOCK_K"])
    if split_k is None:  # few output rows (kv_a: 9 blocks) would leave most SMs idle: split the columns too
        split_k = min(math.ceil(WAVES * gpu_device.of(x).sm_count() / (G * n_blocks)),
                      k_tiles * t["BLOCK_K"] // (MIN_TILES_PER_SPLIT * BLOCK_K))  # fmt: skip
    tiles = math.ceil(k_tiles / max(1, min(split_k, k_tiles)))
    splits = math.ceil(k_tiles / tiles)  # no empty split
    # partial sums go to a [splits, G, M, N] buffer summed afterwards: deterministic, no atomics
    y = out if splits == 1 else x.new_empty(splits, G, M, rows)
    ys = (0, *out.stride()[:2]) if splits == 1 else y.stride()[:3]
    # bf16: the weight stands in for the scale pointer, never read
    _sources()["fp8_linear"].fp8_linear_kernel[(G * n_blocks, splits)](
        x, q if hw or bf16 else q.view(torch.uint8), q if bf16 else scale.contiguous(), y, M, rows, K, n_blocks,
        k_tiles, tiles, x.stride(0), x.stride(1), row_stride, row_offset, 0 if bf16 else scale.shape[1], *ys,
        SCALE_MUL=1.0 if hw or bf16 else 256.0, HW_FP8=hw, BF16=bf16, EVEN_K=K % t["BLOCK_K"] == 0,
        BLOCK_M=MAX_TOKENS, **t)  # fmt: skip
    if splits > 1:
        torch.sum(y, dim=0, out=out)
    return out


def fp8_linear_grouped_t(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, row_stride: int,
                         row_offset: int = 0, *, hw_fp8: bool | None = None) -> torch.Tensor:  # fmt: skip
    """y[g] = x[g] [R] @ W[g * row_stride + row_offset :][:R] [R, K] for each group g: -> [G, K].
    scale None: q is a plain bf16 weight (hw_fp8 then means nothing)."""
    _check(x.dtype == torch.float32 and x.dim() == 2, "x", f"must be a 2-D float32 tensor [G, R], got "
           f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    G, R = x.shape
    _check(G >= 1 and R >= 1, "x", f"is empty: shape {tuple(x.shape)}")
    _check_weight(q, scale, x.device)
    _check(row_stride >= 0 and row_offset >= 0, "row_stride", "strides and offsets must be >= 0")
    last = (G - 1) * row_stride + row_offset + R
    _check(last <= q.shape[0], "q", f"has {q.shape[0]} rows, the groups reach row {last}")
    bf16 = scale is None
    x, K, hw = x.contiguous(), q.shape[1], not bf16 and _use_hw_fp8(x, hw_fp8)
    y = x.new_empty(G, K)
    _sources()["fp8_linear"].fp8_linear_t_kernel[(G, math.ceil(K / BLOCK_K_T))](
        x, q if hw or bf16 else q.view(torch.uint8), q if bf16 else scale.contiguous(), y, R, K, x.stride(0),
        row_stride, row_offset, 0 if bf16 else scale.shape[1], SCALE_MUL=1.0 if hw or bf16 else 256.0, HW_FP8=hw,
        BF16=bf16, EVEN_R=R % BLOCK_R_T == 0, BLOCK_R=BLOCK_R_T, BLOCK_K=BLOCK_K_T, num_warps=8,
        num_stages=3)  # fmt: skip
    return y


def _check_int4_weight(packed: torch.Tensor, scale: torch.Tensor, K: int, device: torch.device) -> None:
    _check(packed.dtype == torch.int32 and packed.dim() == 2, "packed", f"must be a 2-D int32 tensor [N, K/8], got "
           f"{packed.dtype} {tuple(packed.shape)}")  # fmt: skip
    _check(packed.is_contiguous(), "packed", "must be contiguous (a weight is never copied silently)")
    _check(packed.shape[1] * 8 == K, "packed", f"has {packed.shape[1]} words per row ({packed.shape[1] * 8} "
           f"columns), x has {K} columns")  # fmt: skip
    want = (packed.shape[0], K // INT4_GROUP)
    _check(scale.dtype == torch.bfloat16, "scale", f"must be bfloat16, got {scale.dtype}")
    _check(tuple(scale.shape) == want, "scale", f"shape {tuple(scale.shape)} does not match packed's "
           f"{INT4_GROUP}-column groups {want}")  # fmt: skip
    for name, t in (("packed", packed), ("scale", scale)):
        _check(t.device == device, name, f"is on {t.device}, the activations on {device}")
    _check(device.type == "cuda" or interpreting(), "packed", f"is on {device}: the kernels compile for CUDA tensors "
           "(set HYBRID_GPU_STANDIN=1 to interpret them on the CPU)")  # fmt: skip


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
                split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x [M, K] fp32 @ W^T, W[n, k] = (nibble k of packed[n] - 8) * scale[n, k // 32], read straight from
    the packed int32 words [N, K/8] and bf16 scales [N, K/32] (the `pack-quantized` routed experts). Any M: up to 16
    rows one decode tile, beyond that prefill tiles of 64 rows."""
    _check(x.dtype == torch.float32 and x.dim() == 2, "x", f"must be a 2-D float32 tensor [M, K], got "
           f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    M, K = x.shape
    _check(M >= 1 and K >= 1, "x", f"is empty: shape {tuple(x.shape)}")
    _check(K % INT4_GROUP == 0, "x", f"has {K} columns, not a multiple of the {INT4_GROUP}-column scale groups")
    _check_int4_weight(packed, scale, K, x.device)
    N = packed.shape[0]
    _check(N >= 1, "packed", "has no rows")
    if out is None:
        out = x.new_empty(M, N)
    _check(out.dtype == torch.float32 and tuple(out.shape) == (M, N) and out.stride(-1) == 1, "out",
           f"must be float32 {(M, N)} with unit last stride, got {out.dtype} {tuple(out.shape)}")  # fmt: skip
    _check(out.device == x.device, "out", f"is on {out.device}, x on {x.device}")
    _check(split_k is None or split_k >= 1, "split_k", f"must be >= 1, got {split_k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    decode = M <= MAX_TOKENS
    tiles = INT4_DECODE if decode else INT4_PREFILL
    bk = tiles["BLOCK_K"]
    m_blocks, k_tiles = math.ceil(M / tiles["BLOCK_M"]), math.ceil(K / bk)
    n_programs = m_blocks * math.ceil(N / tiles["BLOCK_N"])
    if split_k is None:  # few output tiles would leave SMs idle: split K too, >= 512 columns (16 KB of words) each
        # decode is memory-bound: WAVES programs per SM keep loads in flight; prefill is compute-bound: one wave
        waves = WAVES if decode else 1
        split_k = min(math.ceil(waves * gpu_device.of(x).sm_count() / n_programs),
                      k_tiles // math.ceil(MIN_TILES_PER_SPLIT * BLOCK_K / bk))  # fmt: skip
    per_split = math.ceil(k_tiles / max(1, min(split_k, k_tiles)))
    splits = math.ceil(k_tiles / per_split)  # no empty split
    # partial sums go to a [splits, M, N] buffer summed afterwards: deterministic, no atomics
    y = out if splits == 1 else x.new_empty(splits, M, N)
    ys = (0, out.stride(0)) if splits == 1 else y.stride()[:2]
    _sources()["int4_linear"].int4_linear_kernel[(n_programs, splits)](
        x, packed, scale.contiguous(), y, M, N, K, m_blocks, k_tiles, per_split, x.stride(0), *ys,
        EVEN_K=K % bk == 0, **tiles)  # fmt: skip
    if splits > 1:
        torch.sum(y, dim=0, out=out)
    return out


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """x @ W^T in `dtype` (float64 for a golden value), W dequantized with torch ops where the operands live (CUDA,
    the stand-in, the CPU): int32 shifts are arithmetic, the & 0xF after each keeps the nibble whatever the sign."""
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [N, K/8, 8]: column 8j + i
    q = nibbles.reshape(packed.shape[0], -1).to(dtype) - 8
    return x.to(dtype) @ (q * scale.to(dtype).repeat_interleave(INT4_GROUP, dim=-1)).T


def default_split_tokens(length: int, nh: int, cache: torch.Tensor) -> int:
    """Tokens per split: enough splits for WAVES/2 programs per SM, each at least MIN_SPLIT_TOKENS long."""
    splits = max(1, WAVES * gpu_device.of(cache).sm_count() // (2 * math.ceil(nh / BLOCK_H)))
    return max(MIN_SPLIT_TOKENS, math.ceil(math.ceil(length / splits) / BLOCK_T) * BLOCK_T)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_q: torch.Tensor, kv_b_scale: torch.Tensor | None,
               c: torch.Tensor, pe: torch.Tensor, length: int, softmax_scale: float, dv: int,
               split_tokens: int | None = None, *, hw_fp8: bool | None = None) -> torch.Tensor:  # fmt: skip
    """MLA absorbed decode attention for one token over c[:length], pe[:length] -> [nh, dv] fp32. kv_b: fp8 codes
    and their block scales, or (kv_b_scale None) the bf16 kv_b_proj weight [nh * (dn + dv), C] as it is stored."""
    _check(q_nope.dtype == torch.float32 and q_nope.dim() == 2, "q_nope", "must be a 2-D float32 tensor [nh, dn]")
    _check(q_pe.dtype == torch.float32 and q_pe.dim() == 2, "q_pe", "must be a 2-D float32 tensor [nh, dr]")
    (nh, dn), dr = q_nope.shape, q_pe.shape[1]
    _check(q_pe.shape[0] == nh, "q_pe", f"has {q_pe.shape[0]} heads, q_nope {nh}")
    _check(c.dim() == 2 and c.dtype in (torch.bfloat16, torch.float32), "c", f"must be a 2-D bfloat16 or float32 "
           f"cache [capacity, C], got {c.dtype} {tuple(c.shape)}")  # fmt: skip
    capacity, C = c.shape
    _check(pe.dtype == c.dtype, "pe", f"is {pe.dtype}, c is {c.dtype}")
    _check(tuple(pe.shape) == (capacity, dr), "pe", f"shape {tuple(pe.shape)}, expected {(capacity, dr)}")
    _check(dv >= 1, "dv", f"must be >= 1, got {dv}")
    _check_weight(kv_b_q, kv_b_scale, q_nope.device, ("kv_b_q", "kv_b_scale"))
    _check(tuple(kv_b_q.shape) == (nh * (dn + dv), C), "kv_b_q", f"shape {tuple(kv_b_q.shape)}, expected "
           f"{(nh * (dn + dv), C)} (nh * (dn + dv), C)")  # fmt: skip
    for name, t in (("q_pe", q_pe), ("c", c), ("pe", pe)):
        _check(t.device == q_nope.device, name, f"is on {t.device}, q_nope on {q_nope.device}")
    _check(1 <= length <= capacity, "length", f"must be in 1..{capacity} (the cache's capacity), got {length}")
    _check(split_tokens is None or split_tokens >= 1, "split_tokens", f"must be >= 1, got {split_tokens}")
    _check(c.stride(1) == 1 and pe.stride(1) == 1, "c", "c and pe need unit column stride (no copy of a cache)")

    q_abs = fp8_linear_grouped_t(q_nope.contiguous(), kv_b_q, kv_b_scale, dn + dv, 0, hw_fp8=hw_fp8)  # [nh, C]
    st = split_tokens or default_split_tokens(length, nh, c)
    splits = math.ceil(length / st)
    # new_empty: outputs on the inputs' device, whatever kind of tensor that is (CUDA, CPU, a stand-in's)
    m, l_sum, acc = q_abs.new_empty(splits, nh), q_abs.new_empty(splits, nh), q_abs.new_empty(splits, nh, C)
    kernels = _sources()["mla_decode"]
    block_c, block_r = max(16, _pow2(C)), max(16, _pow2(dr))
    kernels.mla_split_kernel[(splits, math.ceil(nh / BLOCK_H))](
        q_abs, q_pe.contiguous(), c, pe, m, l_sum, acc, nh, length, st, softmax_scale, c.stride(0), pe.stride(0), C,
        dr, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, num_warps=4, num_stages=2)  # fmt: skip
    ctx = q_abs.new_empty(nh, 1, C)
    kernels.mla_combine_kernel[(nh,)](m, l_sum, acc, ctx, nh, splits, C, BLOCK_C=block_c, num_warps=4)
    return fp8_linear_grouped(ctx, kv_b_q, kv_b_scale, dv, dn + dv, dn, hw_fp8=hw_fp8)[:, 0]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def fp8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """x @ dequantize(q, scale)^T computed in `dtype` (float64 for a golden value)."""
    return x.to(dtype) @ dequantize(q, scale).to(dtype).T


def bf16_linear_reference(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ w^T computed in `dtype` (float64 for a golden value): the old path's fp32 copy of the bf16 weight."""
    return x.to(dtype) @ w.to(dtype).T


def mla_decode_reference(q_nope, q_pe, kv_b_q, kv_b_scale, c, pe, length: int, softmax_scale: float, dv: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The model's absorbed decode in `dtype` with einsums over a `dtype` copy of the cache (the old path). kv_b_scale
    None: kv_b_q is the bf16 weight."""
    nh, dn = q_nope.shape
    w = (kv_b_q if kv_b_scale is None else dequantize(kv_b_q, kv_b_scale)).to(dtype).view(nh, dn + dv, -1)
    q_abs = torch.einsum("hd,hdc->hc", q_nope.to(dtype), w[:, :dn])
    kc, kpe = c[:length].to(dtype), pe[:length].to(dtype)
    scores = (q_abs @ kc.T + q_pe.to(dtype) @ kpe.T) * softmax_scale
    ctx = torch.softmax(scores, dim=-1) @ kc
    return torch.einsum("hc,hvc->hv", ctx, w[:, dn:])
