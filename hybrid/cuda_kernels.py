"""The CUDA kernels in cuda/, JIT-built through torch's extension loader on first use and cached by torch (in
~/.cache/torch_extensions). Before first use each kernel is checked against the torch reference on random data;
a kernel that cannot be built (no compiler, no CUDA) or that disagrees is not used: torch's path runs instead,
with one warning saying why.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

SOURCES = Path(__file__).resolve().parents[1] / "cuda"
CHECK_TOL = 1e-4  # max |kernel - reference| / max |reference| on the self-check (fp32 sums in another order)
_state: dict = {}


def _build():
    from torch.utils.cpp_extension import load

    return load(name="hybrid_cuda", sources=[str(SOURCES / "bindings.cpp"), str(SOURCES / "fp8_linear.cu")],
                extra_cuda_cflags=["-O3"], verbose=False)  # fmt: skip


def _self_check(module) -> float:
    from .fp8 import dequantize, quantize

    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(300, 1024, generator=g) * 0.05)  # a partial row block and 8 column blocks
    x = torch.randn(3, 1024, generator=g)
    ref = x @ dequantize(w.q, w.scale).T
    y = module.fp8_linear(x.cuda(), w.q.cuda(), w.scale.cuda()).cpu()
    return float((y - ref).abs().max() / ref.abs().max())


def kernels():
    """The built and checked extension module, or None (no CUDA, no compiler, or a failed check)."""
    if "module" not in _state:
        _state["module"] = None
        if torch.cuda.is_available():
            try:
                module = _build()
                err = _self_check(module)
                if err <= CHECK_TOL:
                    _state["module"] = module
                else:
                    warnings.warn(f"hybrid CUDA fp8_linear disagrees with torch (relative error {err:.1e}): not used")
            except Exception as e:  # a missing nvcc or headers: run on torch's kernels
                warnings.warn(f"hybrid CUDA kernels unavailable, using torch's ({type(e).__name__}: {e})")
    return _state["module"]


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """x [M<=16, K] fp32 @ (q fp8 * block scales)^T on the GPU, or None where the kernel does not apply."""
    module = kernels()
    if module is None or not 1 <= x.shape[0] <= 16 or x.dtype != torch.float32:
        return None
    return module.fp8_linear(x, q, scale, out)  # None (an undefined tensor) where the shape is not covered
