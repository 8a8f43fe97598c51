"""GPU kernels (Triton sources in cuda/): launchers with input checks, and the plain-torch references.

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
BLOCK_R_T, BLOCK_K_T = 64, 128  # the transposed product: 8 KB of codes per step
BLOCK_H, BLOCK_T = 16, 32  # mla_decode: 16 heads share each cache tile; 32 tokens (36 KB of bf16) per step
MIN_TILES_PER_SPLIT = 4  # split-K programs stream >= 512 columns (32 KB of codes) each
MIN_SPLIT_TOKENS = 256  # below this the [splits, nh, C] partials cost more than the cache they summarise
WAVES = 4  # programs per SM to aim for: enough loads in flight to saturate HBM


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
    for name in ("fp8_linear", "mla_decode"):
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


def _check_fp8_weight(q: torch.Tensor, scale: torch.Tensor, device: torch.device, names=("q", "scale")) -> None:
    qn, sn = names
    _check(q.dtype == torch.float8_e4m3fn and q.dim() == 2, qn, f"must be a 2-D float8_e4m3fn tensor, got "
           f"{q.dtype} {tuple(q.shape)}")  # fmt: skip
    _check(q.is_contiguous(), qn, "must be contiguous (a weight is never copied silently)")
    grid = (math.ceil(q.shape[0] / 128), math.ceil(q.shape[1] / 128))
    _check(scale.dtype == torch.float32, sn, f"must be float32, got {scale.dtype}")
    _check(tuple(scale.shape) == grid, sn, f"shape {tuple(scale.shape)} does not match {qn}'s 128x128 blocks {grid}")
    for name, t in ((qn, q), (sn, scale)):
        _check(t.device == device, name, f"is on {t.device}, the activations on {device}")
    _check(device.type == "cuda" or interpreting(), qn, f"is on {device}: the kernels compile for CUDA tensors (set "
           "HYBRID_GPU_STANDIN=1 to interpret them on the CPU)")  # fmt: skip


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
               hw_fp8: bool | None = None, split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """y [M, N] = x [M<=16, K] fp32 @ (fp8(q) * block scale)^T, read straight from the fp8 codes."""
    _check(x.dim() == 2, "x", f"must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(q.dim() == 2, "q", f"must be 2-D [N, K], got shape {tuple(q.shape)}")
    _check(out is None or out.dim() == 2, "out", "must be 2-D [M, N]")
    y = fp8_linear_grouped(x[None], q, scale, q.shape[0], 0, 0, None if out is None else out[None],
                           hw_fp8=hw_fp8, split_k=split_k)  # fmt: skip
    return y[0] if out is None else out


def fp8_linear_grouped(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows: int, row_stride: int,
                       row_offset: int = 0, out: torch.Tensor | None = None, *, hw_fp8: bool | None = None,
                       split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """y[g] = x[g] [M, K] @ W[g * row_stride + row_offset :][:rows]^T for each group g: -> [G, M, rows]."""
    _check(x.dtype == torch.float32 and x.dim() == 3, "x", f"must be a 3-D float32 tensor [G, M, K], got "
           f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    G, M, K = x.shape
    _check(1 <= M <= MAX_TOKENS, "x", f"has {M} rows per group; the kernel takes 1..{MAX_TOKENS}")
    _check(G >= 1 and K >= 1, "x", f"is empty: shape {tuple(x.shape)}")
    _check_fp8_weight(q, scale, x.device)
    _check(q.shape[1] == K, "q", f"has {q.shape[1]} columns, x has {K}")
    _check(rows >= 1 and row_stride >= 0 and row_offset >= 0, "rows", "must be >= 1, row_stride and row_offset >= 0")
    last = (G - 1) * row_stride + row_offset + rows
    _check(last <= q.shape[0], "q", f"has {q.shape[0]} rows, the groups reach row {last}")
    if out is None:
        out = x.new_empty(G, M, rows)
    _check(out.dtype == torch.float32 and tuple(out.shape) == (G, M, rows) and out.stride(-1) == 1, "out",
           f"must be float32 {(G, M, rows)} with unit last stride, got {out.dtype} {tuple(out.shape)}")  # fmt: skip
    _check(out.device == x.device, "out", f"is on {out.device}, x on {x.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    hw = _use_hw_fp8(x, hw_fp8)
    k_tiles, n_programs = math.ceil(K / BLOCK_K), G * math.ceil(rows / BLOCK_N)
    if split_k is None:  # few output rows (kv_a: 9 blocks) would leave most SMs idle: split the columns too
        split_k = min(math.ceil(WAVES * gpu_device.of(x).sm_count() / n_programs), k_tiles // MIN_TILES_PER_SPLIT)
    tiles = math.ceil(k_tiles / max(1, min(split_k, k_tiles)))
    splits = math.ceil(k_tiles / tiles)  # no empty split
    # partial sums go to a [splits, G, M, N] buffer summed afterwards: deterministic, no atomics
    y = out if splits == 1 else x.new_empty(splits, G, M, rows)
    ys = (0, *out.stride()[:2]) if splits == 1 else y.stride()[:3]
    _sources()["fp8_linear"].fp8_linear_kernel[(n_programs, splits)](
        x, q if hw else q.view(torch.uint8), scale.contiguous(), y, M, rows, K, math.ceil(rows / BLOCK_N), k_tiles,
        tiles, x.stride(0), x.stride(1), row_stride, row_offset, scale.shape[1], *ys, SCALE_MUL=1.0 if hw else 256.0,
        HW_FP8=hw, EVEN_K=K % BLOCK_K == 0, BLOCK_M=MAX_TOKENS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
        num_stages=4)  # fmt: skip
    if splits > 1:
        torch.sum(y, dim=0, out=out)
    return out


def fp8_linear_grouped_t(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, row_stride: int,
                         row_offset: int = 0, *, hw_fp8: bool | None = None) -> torch.Tensor:  # fmt: skip
    """y[g] = x[g] [R] @ W[g * row_stride + row_offset :][:R] [R, K] for each group g: -> [G, K]."""
    _check(x.dtype == torch.float32 and x.dim() == 2, "x", f"must be a 2-D float32 tensor [G, R], got "
           f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    G, R = x.shape
    _check(G >= 1 and R >= 1, "x", f"is empty: shape {tuple(x.shape)}")
    _check_fp8_weight(q, scale, x.device)
    _check(row_stride >= 0 and row_offset >= 0, "row_stride", "strides and offsets must be >= 0")
    last = (G - 1) * row_stride + row_offset + R
    _check(last <= q.shape[0], "q", f"has {q.shape[0]} rows, the groups reach row {last}")
    x, K, hw = x.contiguous(), q.shape[1], _use_hw_fp8(x, hw_fp8)
    y = x.new_empty(G, K)
    _sources()["fp8_linear"].fp8_linear_t_kernel[(G, math.ceil(K / BLOCK_K_T))](
        x, q if hw else q.view(torch.uint8), scale.contiguous(), y, R, K, x.stride(0), row_stride, row_offset,
        scale.shape[1], SCALE_MUL=1.0 if hw else 256.0, HW_FP8=hw, EVEN_R=R % BLOCK_R_T == 0, BLOCK_R=BLOCK_R_T,
        BLOCK_K=BLOCK_K_T, num_warps=8, num_stages=3)  # fmt: skip
    return y


def default_split_tokens(length: int, nh: int, cache: torch.Tensor) -> int:
    """Tokens per split: enough splits for WAVES/2 programs per SM, each at least MIN_SPLIT_TOKENS long."""
    splits = max(1, WAVES * gpu_device.of(cache).sm_count() // (2 * math.ceil(nh / BLOCK_H)))
    return max(MIN_SPLIT_TOKENS, math.ceil(math.ceil(length / splits) / BLOCK_T) * BLOCK_T)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_q: torch.Tensor, kv_b_scale: torch.Tensor,
               c: torch.Tensor, pe: torch.Tensor, length: int, softmax_scale: float, dv: int,
               split_tokens: int | None = None, *, hw_fp8: bool | None = None) -> torch.Tensor:  # fmt: skip
    """MLA absorbed decode attention for one token over c[:length], pe[:length] -> [nh, dv] fp32."""
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
    _check_fp8_weight(kv_b_q, kv_b_scale, q_nope.device, ("kv_b_q", "kv_b_scale"))
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


def mla_decode_reference(q_nope, q_pe, kv_b_q, kv_b_scale, c, pe, length: int, softmax_scale: float, dv: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The model's absorbed decode in `dtype` with einsums over a `dtype` copy of the cache (the old path)."""
    nh, dn = q_nope.shape
    w = dequantize(kv_b_q, kv_b_scale).to(dtype).view(nh, dn + dv, -1)
    q_abs = torch.einsum("hd,hdc->hc", q_nope.to(dtype), w[:, :dn])
    kc, kpe = c[:length].to(dtype), pe[:length].to(dtype)
    scores = (q_abs @ kc.T + q_pe.to(dtype) @ kpe.T) * softmax_scale
    ctx = torch.softmax(scores, dim=-1) @ kc
    return torch.einsum("hc,hvc->hv", ctx, w[:, dn:])
