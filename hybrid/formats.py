"""Weight formats, each described once: the checkpoint tensors of one linear (names, shapes, dtypes: for the schema,
the synthetic writer and the planner's bytes), the weight object the model computes with, its dequantization, and
the host arrays the CPU expert kernels read.

- fp8: K2-Instruct. `weight` F8_E4M3 [N, K] + `weight_scale_inv` F32 [ceil(N/128), ceil(K/128)].
- int4: K2-Thinking / K2.5+ routed experts (compressed-tensors pack-quantized, group 32, symmetric).
  `weight_packed` I32 [N, K/8] + `weight_scale` BF16 [N, K/32] + `weight_shape` I32/I64 [2].
- bf16: everything else in the INT4 checkpoints. `weight` BF16 [N, K].

The kernels follow the weight's type: `model.linear` (CPU Numba / GPU Triton per format), and `cpu_kernels.routed_moe`
per expert-stack type (ExpertStack for fp8, Int4ExpertStack for INT4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpu_kernels import ExpertStack
from cpu_kernels.int4 import Int4ExpertStack, bf16_to_float

from .config import FP8_BLOCK, INT4_GROUP
from .fp8 import Fp8Weight, codes

FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]  # accepted safetensors dtypes; the first is what the real checkpoint uses
    kind: str = ""  # "fp8" codes, "int4" packed words, "int4_shape" (holds the weight's [N, K]), or "" (plain)

    @property
    def fp8(self) -> bool:
        return self.kind == "fp8"


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))


@dataclass
class Int4Weight:
    """A linear weight as K2-Thinking stores it: int32 `weight_packed` [N, K/8] and bf16 `weight_scale` [N, K/32]."""

    packed: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.packed, self.scale, dtype)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[n, k] = (nibble k of row n - 8) * scale[n, k // 32], exact in fp32, with torch ops on any device.

    Byte j of a row (little-endian words) holds element 2j in its low nibble and 2j+1 in its high one.
    """
    n = packed.shape[0]
    b = packed.contiguous().view(torch.uint8)
    q = torch.stack([b & 0xF, b >> 4], dim=-1).view(n, -1).to(torch.int16) - 8
    w = q.float() * scale.float().repeat_interleave(INT4_GROUP, dim=-1)
    return w if dtype == torch.float32 else w.to(dtype)


class Fp8Format:
    name = "fp8"
    suffixes = ("weight", "weight_scale_inv")  # the stacked pair: codes, scales
    tensors = suffixes  # every checkpoint tensor of one linear
    stack_type = ExpertStack

    def specs(self, shape: tuple[int, int]) -> dict[str, Spec]:
        return {"weight": Spec(shape, ("F8_E4M3",), "fp8"), "weight_scale_inv": Spec(scale_shape(shape), ("F32",))}

    def build(self, tensors: dict[str, torch.Tensor]) -> Fp8Weight:
        return Fp8Weight(tensors["weight"], tensors["weight_scale_inv"])

    def host_arrays(self, w: Fp8Weight) -> tuple[np.ndarray, np.ndarray]:
        """The (codes, scales) arrays one expert contributes to a stack."""
        return codes(w.q), w.scale.numpy()

    def scales(self, s: np.ndarray) -> np.ndarray:
        return s

    def slot_weight(self, q: torch.Tensor, s: torch.Tensor) -> Fp8Weight:
        """The weight over one expert's stacked arrays (as `as_torch` gives them, on any device)."""
        return Fp8Weight(q.view(torch.float8_e4m3fn), s)


class Int4Format:
    name = "int4"
    suffixes = ("weight_packed", "weight_scale")
    tensors = (*suffixes, "weight_shape")  # the shape is checked by schema.validate, then not needed
    stack_type = Int4ExpertStack

    def specs(self, shape: tuple[int, int]) -> dict[str, Spec]:
        n, k = shape
        if k % INT4_GROUP:
            raise ValueError(f"an INT4 linear needs in_features divisible by {INT4_GROUP}, got {shape}")
        return {"weight_packed": Spec((n, k // 8), ("I32",), "int4"),
                "weight_scale": Spec((n, k // INT4_GROUP), ("BF16",)),
                "weight_shape": Spec((2,), ("I32", "I64"), "int4_shape")}  # fmt: skip

    def build(self, tensors: dict[str, torch.Tensor]) -> Int4Weight:
        return Int4Weight(tensors["weight_packed"], tensors["weight_scale"])

    def host_arrays(self, w: Int4Weight) -> tuple[np.ndarray, np.ndarray]:
        """(bytes [N, K/2], bf16 bits [N, K/32]): the little-endian byte view the kernels read."""
        packed = w.packed.contiguous().numpy().view("<u4").view(np.uint8)
        return packed, w.scale.contiguous().view(torch.int16).numpy().view(np.uint16)

    def scales(self, s: np.ndarray) -> np.ndarray:
        return bf16_to_float(s)

    def slot_weight(self, q: torch.Tensor, s: torch.Tensor) -> Int4Weight:
        return Int4Weight(q.view(torch.int32), s.view(torch.bfloat16))


class Bf16Format:
    name = "bf16"
    suffixes = tensors = ("weight",)
    stack_type = None  # routed experts are never bf16 in a published K2 checkpoint

    def specs(self, shape: tuple[int, int]) -> dict[str, Spec]:
        return {"weight": Spec(shape, ("BF16",))}

    def build(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"]


FORMATS = {f.name: f for f in (Fp8Format(), Int4Format(), Bf16Format())}


def as_torch(a: np.ndarray) -> torch.Tensor:
    """A stack array as a zero-copy torch tensor (bf16 bits as int16: torch has few uint16 ops)."""
    return torch.from_numpy(a.view(np.int16) if a.dtype == np.uint16 else a)


def of_weight(w) -> Fp8Format | Int4Format | Bf16Format:
    """The format of a weight object."""
    return FORMATS["fp8" if isinstance(w, Fp8Weight) else "int4" if isinstance(w, Int4Weight) else "bf16"]


def of_stack(stack) -> Fp8Format | Int4Format:
    """The format whose expert stacks look like `stack`."""
    return next(f for f in FORMATS.values() if f.stack_type is not None and isinstance(stack, f.stack_type))
