"""Numba-JIT kernels for the routed experts: fp8 e4m3 weights, 128x128 fp32 block scales, fp32 accumulation.

    from cpu_kernels import ExpertStack, routed_moe
    routed_moe(x, ids, weights, stack, out)   # out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])

Small token counts take the fused decode kernel (decode.py), larger ones the grouped GEMM (prefill.py).
"""

from ._numba_setup import configure as _configure

_configure()

from .moe import FIELDS, ExpertStack, reference_moe, routed_moe, warmup  # noqa: E402

__all__ = ["FIELDS", "ExpertStack", "routed_moe", "reference_moe", "warmup"]
