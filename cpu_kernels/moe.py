"""Routed experts of one layer on the CPU: the weight container, input checks, the float64 reference, dispatch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .decode import moe_decode
from .fp8_simd import SIMD, moe_decode_simd
from .dequant import dequantize_into
from .linear import bf16_linear, fp8_linear
from .prefill import moe_prefill

DECODE_MAX_TOKENS = 4  # up to here the fused decode kernel; beyond, the grouped GEMM


FIELDS = ("gate", "gate_s", "up", "up_s", "down", "down_s")  # an ExpertStack's arrays, in order


@dataclass
class ExpertStack:
    """One layer's routed experts, stacked: fp8 codes as int8 and fp32 `weight_scale_inv` blocks.

    gate, up: [E, I, H]; down: [E, H, I]; *_s: [E, ceil(rows/128), ceil(cols/128)].
    """

    gate: np.ndarray
    gate_s: np.ndarray
    up: np.ndarray
    up_s: np.ndarray
    down: np.ndarray
    down_s: np.ndarray

    def __post_init__(self):
        E, inter, hidden = self.gate.shape
        shapes = {"gate": (E, inter, hidden), "up": (E, inter, hidden), "down": (E, hidden, inter)}
        for name, shape in shapes.items():
            q, s = getattr(self, name), getattr(self, name + "_s")
            want_s = (E, -(-shape[1] // 128), -(-shape[2] // 128))
            if q.dtype != np.int8 or q.shape != shape or not q.flags.c_contiguous:
                raise ValueError(f"{name}: expected C-contiguous int8 {shape}, got {q.dtype} {q.shape}")
            if s.dtype != np.float32 or s.shape != want_s or not s.flags.c_contiguous:
                raise ValueError(f"{name}_s: expected C-contiguous float32 {want_s}, got {s.dtype} {s.shape}")

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.gate, self.gate_s, self.up, self.up_s, self.down, self.down_s))

    def expert_bytes(self) -> int:
        return self.nbytes // self.num_experts


def check_inputs(x, ids, weights, stack: ExpertStack, out) -> None:
    """Dtype, contiguity and shape checks before any kernel launch (a bad index would read out of bounds)."""
    T = x.shape[0]
    for name, a, dtype, shape in (("x", x, np.float32, (T, stack.hidden)), ("ids", ids, np.int64, ids.shape),
                                  ("weights", weights, np.float32, ids.shape), ("out", out, np.float32, x.shape)):
        if a.dtype != dtype or a.ndim != len(shape) or a.shape != shape or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected C-contiguous {np.dtype(dtype).name} {shape}, got {a.dtype} {a.shape}")
    if ids.ndim != 2 or ids.shape[0] != T:
        raise ValueError(f"ids: expected [{T}, k], got {ids.shape}")
    if ids.size and (ids.min() < -1 or ids.max() >= stack.num_experts):
        raise ValueError(f"ids: expert index out of range [0, {stack.num_experts}) (or -1: skip)")


def routed_moe(x, ids, weights, stack: ExpertStack, out, fast: bool = False) -> np.ndarray:
    """out[t] = sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t]; out is overwritten and returned.

    An id of -1 skips that assignment (its expert is computed elsewhere, e.g. on the GPU or in another group).
    fast: decode with activations rounded to bf16 (fp8_simd.py; without AVX-512 BF16 it decodes exactly).
    """
    check_inputs(x, ids, weights, stack, out)
    if x.shape[0] == 0:
        return out
    arrays = (stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down, stack.down_s, out)
    if x.shape[0] > DECODE_MAX_TOKENS:
        moe_prefill(x, ids, weights, *arrays)
    elif SIMD:
        moe_decode_simd(x, ids, weights, *arrays, fast)
    else:
        moe_decode(x, ids, weights, *arrays)
    return out


def dequantize_np(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float64 weights from int8 e4m3 codes and block scales (numpy, exact: every e4m3 value is a float64)."""
    rows, cols = q.shape
    scale = np.repeat(np.repeat(s.astype(np.float64), 128, 0)[:rows], 128, 1)[:, :cols]
    return _E4M3_TABLE[q.view(np.uint8)] * scale


def _e4m3_table() -> np.ndarray:
    """The 256 e4m3 values from the format's definition (bias 7, no infinities, 0x7F/0xFF NaN)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    mag[(codes & 0x7F) == 0x7F] = np.nan
    return sign * mag


_E4M3_TABLE = _e4m3_table()


def reference_moe(x, ids, weights, stack, dequantize=None) -> np.ndarray:
    """The plain float64 reference: each used expert dequantized once and applied to all of its tokens.
    dequantize(codes, scales) -> float64 weights: the stack's format (default: fp8 with 128x128 blocks)."""
    dequantize = dequantize or dequantize_np
    out = np.zeros(x.shape, np.float64)
    x64 = x.astype(np.float64)
    for e in np.unique(ids[ids >= 0]):
        t, k = np.nonzero(ids == e)
        g = x64[t] @ dequantize(stack.gate[e], stack.gate_s[e]).T
        u = x64[t] @ dequantize(stack.up[e], stack.up_s[e]).T
        y = (g / (1 + np.exp(-g)) * u) @ dequantize(stack.down[e], stack.down_s[e]).T
        np.add.at(out, t, weights[t, k][:, None] * y)
    return out


def warmup(hidden: int = 256, inter: int = 128) -> None:
    """Compile (or load from Numba's on-disk cache) both kernels once, so no user request waits on the JIT."""
    rng = np.random.default_rng(0)
    E = 4

    def codes(*shape):
        return (rng.integers(0, 0x70, size=shape, dtype=np.uint8)).view(np.int8)

    def scales(*shape):
        return np.ones(shape, np.float32)

    nb_h, nb_i = -(-hidden // 128), -(-inter // 128)
    stack = ExpertStack(codes(E, inter, hidden), scales(E, nb_i, nb_h), codes(E, inter, hidden), scales(E, nb_i, nb_h),
                        codes(E, hidden, inter), scales(E, nb_h, nb_i))  # fmt: skip
    dequantize_into(stack.gate[0], stack.gate_s[0], np.empty(stack.gate.shape[1:], np.float32))
    fp8_linear(np.ones((1, hidden), np.float32), stack.gate[0], stack.gate_s[0], np.empty((1, inter), np.float32))
    bf16_linear(np.ones((1, 8), np.float32), np.ones((4, 8), np.int16), np.empty((1, 4), np.float32))
    for T, fast in ((1, False), (1, True), (DECODE_MAX_TOKENS + 1, False)):
        x = rng.standard_normal((T, hidden)).astype(np.float32)
        ids = np.tile(np.arange(2, dtype=np.int64), (T, 1))
        routed_moe(x, ids, np.ones((T, 2), np.float32), stack, np.empty_like(x), fast)
