"""Numba-JIT fp8 kernels for the routed experts (filled in by the CPU-kernel work)."""
