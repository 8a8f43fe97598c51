"""The CUDA kernels in cuda/ on Kimi-K2's decode shapes: validated against torch first, then GB/s against a
device-to-device copy measured in the same run (the HBM roof), and against torch's dequantize-then-matmul.

    python bench/cuda_kernels.py          # needs a CUDA GPU; appends to bench/results/cuda_kernels.jsonl
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from hybrid.cuda_kernels import fp8_linear, kernels  # noqa: E402
from hybrid.fp8 import dequantize, quantize  # noqa: E402

SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512), "o": (7168, 8192),
          "gate/up": (2048, 7168), "down": (7168, 2048)}  # fmt: skip


def gpu_seconds(fn, repeats: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def main() -> None:
    if not torch.cuda.is_available() or kernels() is None:
        sys.exit("needs a CUDA GPU and the kernels in cuda/ (see the warning above)")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / gpu_seconds(lambda: dst.copy_(src), 20) / 1e9  # read + write
    info, stamp = machine(), time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{info['gpu']}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'linear':<9}{'M':>3}{'max rel err':>13}{'kernel GB/s':>13}{'of copy':>9}{'torch GB/s':>12}")
    for name, (n, k) in SHAPES.items():
        w = quantize(torch.randn(n, k) / k**0.5)
        q, s = w.q.cuda(), w.scale.cuda()
        nbytes = q.numel() + s.numel() * 4
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda")
            ref = x.double() @ dequantize(w.q, w.scale).double().cuda().T
            y = fp8_linear(x, q, s)
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            ours = nbytes / gpu_seconds(lambda: fp8_linear(x, q, s)) / 1e9
            theirs = nbytes / gpu_seconds(lambda: x @ dequantize(q, s).T) / 1e9
            print(f"{name:<9}{m:>3}{err:>13.1e}{ours:>13.0f}{ours / copy_gbs:>9.0%}{theirs:>12.0f}")
            append_result(RESULTS / "cuda_kernels.jsonl", {"time": stamp, **info, "linear": name, "shape": [n, k],
                          "tokens": m, "max_rel_err": err, "kernel_gbs": round(ours, 1), "copy_gbs": round(copy_gbs, 1),
                          "torch_dequant_gbs": round(theirs, 1)})  # fmt: skip


if __name__ == "__main__":
    main()
