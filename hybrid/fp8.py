"""fp8 e4m3 weights with 128x128 fp32 block scales: dequantization, quantization, and the weight pair type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import FP8_BLOCK
from .device import on_device

FP8_MAX = 448.0
# torch's fp8 -> fp32 `.float()` runs at ~0.15 G elem/s on CPU; a 256-entry table gather is several times faster.
_FP8_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


@dataclass
class Fp8Weight:
    """A linear weight as stored: fp8 e4m3 [out, in] and its fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)]."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, dtype)


def codes(q: torch.Tensor) -> np.ndarray:
    """fp8 e4m3 weights as the int8 codes the Numba kernels read (zero-copy for a contiguous CPU tensor)."""
    return q.contiguous().view(torch.uint8).numpy().view(np.int8)


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """Exact fp8 e4m3 -> fp32 for a tensor on any device."""
    if on_device(q):
        return q.float()
    return _FP8_TABLE[q.view(torch.uint8).int()]


def expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] block scales -> [rows, cols] (partial edge blocks cut off)."""
    return scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[i, j] = fp8(q[i, j]) * scale[i // 128, j // 128] (the scale is multiplied despite its name)."""
    rows, cols = q.shape
    if not on_device(q) and q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32:
        from cpu_kernels.dequant import dequantize_into  # one fused pass (the path below moves ~30 B/element)

        w = torch.empty(rows, cols)
        dequantize_into(codes(q), scale.contiguous().numpy(), w.numpy())
        return w if dtype == torch.float32 else w.to(dtype)
    w = fp8_to_float(q)
    w.mul_(expand_scale(scale.float(), rows, cols))
    return w if dtype == torch.float32 else w.to(dtype)


def fp8_matmul_cpu(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """x [T, K] fp32 @ W^T by the Numba kernel that reads the fp8 codes directly (decode-sized T)."""
    from cpu_kernels.linear import fp8_linear

    xn = x.detach().float().contiguous().numpy()
    out = np.empty((x.shape[0], w.q.shape[0]), np.float32)
    fp8_linear(xn, codes(w.q), w.scale.float().contiguous().numpy(), out)
    return torch.from_numpy(out)


def bf16_matmul_cpu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] fp32 @ W^T for a bf16 W, converting each weight on the fly (exact, fp32 accumulation)."""
    from cpu_kernels.linear import bf16_linear

    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    bf16_linear(x.detach().float().contiguous().numpy(), w.contiguous().view(torch.int16).numpy(), out)
    return torch.from_numpy(out)


def quantize(w: torch.Tensor) -> Fp8Weight:
    """Block-quantize a float matrix as DeepSeek's tools do: per 128x128 block, scale = amax / 448."""
    rows, cols = w.shape
    pr, pc = -(-rows // FP8_BLOCK) * FP8_BLOCK, -(-cols // FP8_BLOCK) * FP8_BLOCK
    padded = w.new_zeros(pr, pc, dtype=torch.float32)  # on w's device: requantizing at load runs on the GPU
    padded[:rows, :cols] = w.float()
    blocks = padded.view(pr // FP8_BLOCK, FP8_BLOCK, pc // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(q.view(pr, pc)[:rows, :cols].contiguous(), scale.contiguous())
