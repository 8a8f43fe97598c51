"""Native-INT4 routed experts (Kimi-K2-Thinking / K2.5+ `pack-quantized`, group 32, bf16 scales) on the CPU.

    stack = Int4ExpertStack.from_packed(gate=(packed, scale), up=(...), down=(...))   # zero-copy views
    routed_moe_int4(x, ids, weights, stack, out)

Format (KIMI_K2.md 8.4): `weight_packed` int32 [N, K/8], element k in bits 4*(k%8)..+3 of word k//8 (read as
uint32), offset binary q = nibble - 8 in -8..7; `weight_scale` bf16 [N, K/32]; W[n, k] = q * scale[n, k//32].
The kernels read the little-endian byte view [N, K/2] (byte j: element 2j low nibble, 2j+1 high nibble).
Kernels: cpu_kernels/int4_kernels.py. The fp8 path (moe.py) is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .int4_fast import FAST, moe_decode_int4_fast
from .int4_simd import moe_decode_int4, moe_prefill_int4
from .moe import DECODE_MAX_TOKENS, FIELDS, check_inputs, reference_moe

GROUP = 32


def _bytes(packed) -> np.ndarray:
    """int32 [..., N, K/8] (numpy or torch) -> its zero-copy little-endian uint8 view [..., N, K/2]."""
    if hasattr(packed, "numpy"):  # a torch tensor
        packed = packed.numpy()
    if packed.dtype not in (np.int32, np.uint32) or not packed.flags.c_contiguous:
        raise ValueError(f"weight_packed: expected C-contiguous int32, got {packed.dtype} {packed.shape}")
    return packed.view("<u4").view(np.uint8) if np.little_endian else packed.astype("<u4").view(np.uint8)


def _bf16_bits(scale) -> np.ndarray:
    """bf16 scales (torch bfloat16, or numpy uint16/int16 bit patterns) -> numpy uint16 bits (zero-copy)."""
    if hasattr(scale, "numpy"):
        import torch

        if scale.dtype != torch.bfloat16:
            raise ValueError(f"weight_scale: expected bfloat16, got {scale.dtype}")
        scale = scale.view(torch.int16).numpy()
    if scale.dtype not in (np.uint16, np.int16):
        raise ValueError(f"weight_scale: expected bf16 bits (uint16), got {scale.dtype}")
    return scale.view(np.uint16)


@dataclass
class Int4ExpertStack:
    """One layer's routed INT4 experts, stacked.

    gate, up: uint8 [E, I, H/2]; down: uint8 [E, H, I/2] (byte views of weight_packed);
    *_s: uint16 bf16 bits [E, rows, cols/32] (weight_scale).
    """

    gate: np.ndarray
    gate_s: np.ndarray
    up: np.ndarray
    up_s: np.ndarray
    down: np.ndarray
    down_s: np.ndarray

    def __post_init__(self):
        if self.gate.ndim != 3:
            raise ValueError(f"gate: expected uint8 [E, I, H/2], got {self.gate.dtype} {self.gate.shape}")
        E, inter, half = self.gate.shape
        hidden = 2 * half
        if hidden % GROUP or inter % GROUP or hidden == 0 or inter == 0:
            raise ValueError(f"hidden {hidden} and intermediate {inter} must be positive multiples of {GROUP}")
        shapes = {"gate": (E, inter, hidden), "up": (E, inter, hidden), "down": (E, hidden, inter)}
        for name, (e, rows, cols) in shapes.items():
            q, s = getattr(self, name), getattr(self, name + "_s")
            want_q, want_s = (e, rows, cols // 2), (e, rows, cols // GROUP)
            if q.dtype != np.uint8 or q.shape != want_q or not q.flags.c_contiguous:
                raise ValueError(f"{name}: expected C-contiguous uint8 {want_q}, got {q.dtype} {q.shape}")
            if s.dtype != np.uint16 or s.shape != want_s or not s.flags.c_contiguous:
                raise ValueError(f"{name}_s: expected C-contiguous uint16 bf16 {want_s}, got {s.dtype} {s.shape}")

    @classmethod
    def from_packed(cls, gate, up, down) -> "Int4ExpertStack":
        """From (weight_packed int32 [E, N, K/8], weight_scale bf16 [E, N, K/32]) pairs; no copies."""
        arrays = {}
        for name, (packed, scale) in (("gate", gate), ("up", up), ("down", down)):
            arrays[name], arrays[name + "_s"] = _bytes(packed), _bf16_bits(scale)
        return cls(**arrays)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden(self) -> int:
        return 2 * self.gate.shape[2]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS)

    def expert_bytes(self) -> int:
        return self.nbytes // self.num_experts


def routed_moe_int4(x, ids, weights, stack: Int4ExpertStack, out, fast: bool = False) -> np.ndarray:
    """out[t] = sum_k weights[t, k] * SwiGLU expert ids[t, k] applied to x[t]; out is overwritten and returned.

    An id of -1 skips that assignment. Up to DECODE_MAX_TOKENS tokens: the fused decode kernel; beyond: grouped.
    """
    check_inputs(x, ids, weights, stack, out)
    if x.shape[0] == 0:
        return out
    if x.shape[0] > DECODE_MAX_TOKENS:
        kernel = moe_prefill_int4
    else:
        kernel = moe_decode_int4_fast if fast and FAST else moe_decode_int4
    kernel(x, ids, weights, stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down, stack.down_s, out)
    return out


def warmup_int4(hidden: int = 64, inter: int = 32, fast: bool = False) -> None:
    """Compile (or load from Numba's disk cache) the decode and prefill INT4 kernels once (fast: its decode too)."""
    rng = np.random.default_rng(0)
    E = 2

    def part(rows, cols):
        return (rng.integers(0, 256, (E, rows, cols // 2), dtype=np.uint8),
                np.full((E, rows, cols // GROUP), 0x3F80, np.uint16))  # bf16 1.0  # fmt: skip

    (g, gs), (u, us), (d, ds) = part(inter, hidden), part(inter, hidden), part(hidden, inter)
    stack = Int4ExpertStack(g, gs, u, us, d, ds)
    for T, fast_decode in ((1, False), (1, fast), (DECODE_MAX_TOKENS + 1, False)):
        x = rng.standard_normal((T, hidden)).astype(np.float32)
        ids = np.tile(np.arange(E, dtype=np.int64), (T, 1))
        routed_moe_int4(x, ids, np.ones((T, E), np.float32), stack, np.empty_like(x), fast_decode)


# ---- plain references (numpy), for tests and validation --------------------------------------------------


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 codes [..., K] in -8..7 -> int32 words [..., K/8] (element k in bits 4*(k%8), offset binary)."""
    q = np.asarray(q)
    if q.shape[-1] % 8 or q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("pack_int4: expected codes in -8..7 and a last dimension that is a multiple of 8")
    u = (q.astype(np.int64) + 8).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    words = np.zeros(u.shape[:-1], np.uint64)
    for i in range(8):
        words |= u[..., i].astype(np.uint64) << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """int32 words [..., K/8] -> int8 codes [..., K] in -8..7 (words read as unsigned)."""
    w = np.asarray(packed).view(np.uint32).astype(np.uint64)
    u = (w[..., None] >> (np.uint64(4) * np.arange(8, dtype=np.uint64))) & np.uint64(0xF)
    return (u.astype(np.int16) - 8).astype(np.int8).reshape(*w.shape[:-1], w.shape[-1] * 8)


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize_int4(packed, scale) -> np.ndarray:
    """float32 weights [..., N, K] from weight_packed int32 [..., N, K/8] and bf16 scales [..., N, K/32]."""
    if hasattr(packed, "numpy"):
        packed = packed.numpy()
    s = bf16_to_float(_bf16_bits(scale))
    return unpack_int4(packed).astype(np.float32) * np.repeat(s, GROUP, axis=-1)


def _dequant64(q_bytes: np.ndarray, s_bits: np.ndarray) -> np.ndarray:
    """float64 weights from a stack's uint8 byte view [N, K/2] and uint16 scales [N, K/32]."""
    packed = np.ascontiguousarray(q_bytes).view("<u4").view(np.int32)
    return dequantize_int4(packed, s_bits).astype(np.float64)


def reference_moe_int4(x, ids, weights, stack: Int4ExpertStack) -> np.ndarray:
    """The plain float64 reference (moe.reference_moe with the INT4 dequantizer)."""
    return reference_moe(x, ids, weights, stack, _dequant64)
