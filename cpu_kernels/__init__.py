"""Numba-JIT kernels for the routed experts, fp32 accumulation: fp8 e4m3 weights with 128x128 fp32 block scales
(K2-Instruct), or INT4 with bf16 group-32 scales (K2-Thinking, K2.5+).

    from cpu_kernels import ExpertStack, routed_moe
    routed_moe(x, ids, weights, stack, out)   # out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])

The stack's type picks the format (ExpertStack: fp8, moe.py; Int4ExpertStack: int4.py). Small token counts take
the fused decode kernels, larger ones the grouped GEMMs.
"""

from ._numba_setup import configure as _configure

_configure()

from . import moe as _fp8  # noqa: E402
from .int4 import Int4ExpertStack, routed_moe_int4, warmup_int4  # noqa: E402
from .moe import FIELDS, ExpertStack, reference_moe  # noqa: E402

__all__ = ["FIELDS", "ExpertStack", "Int4ExpertStack", "routed_moe", "reference_moe", "warmup"]


def routed_moe(x, ids, weights, stack, out, fast: bool = False):
    """out[t] = sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t] (id -1: skipped); returns out.
    fast: the decode kernels may round activations (bf16 for fp8, int8 per group for INT4): see the README."""
    if isinstance(stack, Int4ExpertStack):
        return routed_moe_int4(x, ids, weights, stack, out, fast)
    return _fp8.routed_moe(x, ids, weights, stack, out, fast)


def warmup(fast: bool = False) -> None:
    """Compile (or load from Numba's disk cache) every kernel once, so no request waits on the JIT (fast: the
    fast-mode decode kernels too)."""
    _fp8.warmup()
    warmup_int4(fast=fast)
