"""Routed experts computed on the CPU by the Numba fp8 kernels (cpu_kernels), one stacked copy per layer."""

from __future__ import annotations

import numpy as np
import torch

from cpu_kernels import ExpertStack, routed_moe

from .checkpoint import Checkpoint
from .model import MLP


def _codes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy().view(np.int8)


def stack_experts(experts: list[MLP], ckpt: Checkpoint | None = None, names: list[str] | None = None) -> ExpertStack:
    """Copy a layer's experts into contiguous [E, rows, cols] arrays (the kernels' layout).

    With `ckpt` and the experts' tensor `names`, the file pages just copied are released, so the weights live
    in RAM once: in the stack, not also in the page cache.
    """
    first = experts[0]
    arrays = {}
    for part in ("gate", "up", "down"):
        q0, s0 = getattr(first, part).q, getattr(first, part).scale
        q = np.empty((len(experts), *q0.shape), np.int8)
        s = np.empty((len(experts), *s0.shape), np.float32)
        for e, mlp in enumerate(experts):
            w = getattr(mlp, part)
            q[e], s[e] = _codes(w.q), w.scale.numpy()
        arrays[part], arrays[part + "_s"] = q, s
    if ckpt is not None and names:
        for name in names:
            ckpt.release(name)
    return ExpertStack(**arrays)


class CpuExperts:
    """RoutedExperts backend: x [T, H] fp32, ids [T, k], weights [T, k] -> [T, H] via the fused kernels."""

    def __init__(self, stack: ExpertStack):
        self.stack = stack

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xn = np.ascontiguousarray(x.detach().float().numpy())
        out = np.empty_like(xn)
        routed_moe(xn, np.ascontiguousarray(idx.numpy(), dtype=np.int64),
                   np.ascontiguousarray(w.detach().float().numpy()), self.stack, out)  # fmt: skip
        return torch.from_numpy(out)
