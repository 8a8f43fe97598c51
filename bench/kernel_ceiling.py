"""Single-thread compute ceiling of the decode kernels: one phase-1 work item (gate and up, 64 rows of K2 width,
0.9 MB fp8 / 0.5 MB int4, L2-resident) repeated on one core, so memory cannot be the limit. Compared with the
machine's per-core share of DRAM bandwidth it says whether decode can be memory-bound on this CPU.
`perf stat` instructions per weight where the kernel lets perf count them (not inside most VMs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
from numba import njit

from cpu_kernels import fp8, fp8_simd, int4_fast, int4_kernels, int4_simd

ROWS = 64  # one decode work item


@njit
def _fp8_generic(G, SG, U, SU, x, reps):
    g, u = np.empty(ROWS, np.float32), np.empty(ROWS, np.float32)
    xg, xu = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
    for _ in range(reps):
        fp8.gemv_rows2(G, SG, U, SU, 0, ROWS, x, g, u, xg, xu)
    return g.sum() + u.sum()


@njit
def _fp8_simd(G, SG, U, SU, x, reps, fast):
    g, u = np.empty(ROWS, np.float32), np.empty(ROWS, np.float32)
    kf = x.shape[0] // fp8_simd.CX * fp8_simd.CX
    xa, xg, xu = np.empty(kf, np.float32), np.empty(kf, np.float32), np.empty(kf, np.float32)
    fp8_simd.arrange(x, xa, 0, kf, fast)
    for _ in range(reps):
        fp8_simd.prepare(xa, SG[0], xg, fast)
        fp8_simd.prepare(xa, SU[0], xu, fast)
        fp8_simd.gemv(G, SG[0], 0, ROWS, xg, x, g, fast)
        fp8_simd.gemv(U, SU[0], 0, ROWS, xu, x, u, fast)
    return g.sum() + u.sum()


@njit
def _int4_generic(G, SG, U, SU, x, reps):
    g, u = np.empty(ROWS, np.float32), np.empty(ROWS, np.float32)
    xs = np.empty(x.shape[0], np.float32)
    int4_kernels.split(x, xs)
    SF, SF2 = np.empty((8, SG.shape[1]), np.float32), np.empty((8, SG.shape[1]), np.float32)
    for _ in range(reps):
        int4_kernels.gemv_rows2(G, SG, U, SU, 0, ROWS, xs, g, u, SF, SF2)
    return g.sum() + u.sum()


@njit
def _int4_simd(G, SG, U, SU, x, reps):
    g, u = np.empty(ROWS, np.float32), np.empty(ROWS, np.float32)
    XP = np.empty(x.shape[0] // 128 * int4_simd.CX, np.float32)
    int4_simd.arrange(x, XP, 0, x.shape[0] // 128 * 4)
    for _ in range(reps):
        int4_simd.gemv_simd2(G, SG, U, SU, 0, ROWS, XP, x, g, u)
    return g.sum() + u.sum()


@njit
def _int4_fast(G, SG, U, SU, x, reps):
    g, u = np.empty(ROWS, np.float32), np.empty(ROWS, np.float32)
    Q = np.empty(x.shape[0] // 128 * 256, np.int8)
    int4_fast.quantize(x, Q)  # once per token, as in the kernel
    for _ in range(reps):
        int4_fast.gemv_fast(G, SG, 0, ROWS, Q, x, g)
        int4_fast.gemv_fast(U, SU, 0, ROWS, Q, x, u)
    return g.sum() + u.sum()


def _instructions(run) -> float | None:
    """Instructions retired by this process while run() runs, from `perf stat -p`; None where perf cannot count."""
    try:
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "instructions", "-p", str(os.getpid())],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    except OSError:
        return None
    time.sleep(0.3)
    run()
    perf.send_signal(signal.SIGINT)
    out = perf.communicate(timeout=10)[1]
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] == "instructions":
            return float(fields[0]) if fields[0].replace(".", "").isdigit() else None
    return None


EXACT = ("table_fma", "avx2_place", "avx512", "avx2", "generic")  # the exact kernels, the one decode uses first


def ceilings(stack, fmt: str, seconds: float = 1.0) -> dict:
    """{kernel name: {"gbs": single-thread GB/s of weight bytes, "instructions_per_weight": ... or None}}."""
    G, SG, U, SU = stack.gate[0], stack.gate_s[0], stack.up[0], stack.up_s[0]
    x = np.random.default_rng(1).standard_normal(stack.hidden).astype(np.float32)
    if fmt == "fp8":
        kernels = {"generic": lambda n: _fp8_generic(G, SG, U, SU, x, n)}
        if fp8_simd.SIMD:  # the exact SIMD kernel: AVX-512 tables, or AVX2 placement
            name = "table_fma" if fp8_simd.ISA == "avx512" else "avx2_place"
            kernels[name] = lambda n: _fp8_simd(G, SG, U, SU, x, n, False)
        if fp8_simd.FAST:
            kernels["bf16dot_fast"] = lambda n: _fp8_simd(G, SG, U, SU, x, n, True)
        weight_bytes = 2 * ROWS * G.shape[1]
    else:
        kernels = {"generic": lambda n: _int4_generic(G, SG, U, SU, x, n)}
        if int4_simd.SIMD:
            kernels[int4_simd.ISA] = lambda n: _int4_simd(G, SG, U, SU, x, n)
        if int4_fast.FAST:
            kernels["vnni_fast" if int4_fast.VNNI else "avx2_fast"] = lambda n: _int4_fast(G, SG, U, SU, x, n)
        weight_bytes = 2 * ROWS * (G.shape[1] + 2 * SG.shape[1])  # packed nibbles + bf16 scales
    weights = 2 * ROWS * stack.hidden
    out = {}
    for name, run in kernels.items():
        run(1)
        t0 = time.perf_counter()
        run(10)
        reps = max(10, int(seconds / max(1e-6, (time.perf_counter() - t0) / 10)))
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            run(reps // 3)
            best = max(best, (reps // 3) * weight_bytes / (time.perf_counter() - t0) / 1e9)
        ins = _instructions(lambda: run(reps // 3))
        out[name] = {"gbs": round(best, 2),
                     "instructions_per_weight": None if ins is None else round(ins / ((reps // 3) * weights), 2)}
    return out
