"""Let LLVM use 512-bit vectors where the CPU has AVX-512.

LLVM tunes Intel server cores with `prefer-256-bit`, so Numba loops compile to ymm code and the fp8 kernels
leave about 10% of their throughput unused. Numba reads NUMBA_CPU_FEATURES when it builds its first target
machine, so this must run before anything is compiled. HYBRID_PREFER_512=0 keeps LLVM's default.
"""

from __future__ import annotations

import os


def configure() -> None:
    if os.environ.get("HYBRID_PREFER_512", "1") == "0" or "NUMBA_CPU_FEATURES" in os.environ:
        return
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features:
        return
    os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"
    import numba.core.config as config

    config.CPU_FEATURES = os.environ["NUMBA_CPU_FEATURES"]
