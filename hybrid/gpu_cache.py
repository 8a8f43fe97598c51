"""Hot-expert cache: the most-used experts of a MoE layer resident in the VRAM the plan leaves free, computed on the
GPU while the CPU kernels compute the rest (their assignments are passed to the CPU as id -1, "skip").

Admission, per layer: experts carry a use score decayed by DECAY per step (as in the RAM tiers); after a step the
best-scored expert outside the cache replaces the worst-scored one inside when it scores HYSTERESIS times higher.
Swaps draw on a SwapBudget shared by all layers (the engine allows about two per token): at K2 width one swap
moves 44 MB over PCIe (~1 ms), so one per layer and step would cost ~50 ms per token.
"""

from __future__ import annotations

import numpy as np
import torch

from cpu_kernels import FIELDS, ExpertStack

from .formats import as_torch, of_stack
from .model import MLP
from .profile import PROFILE

DECAY = 0.95
HYSTERESIS = 1.5


def device_slots(template: ExpertStack, slots: int, device) -> dict[str, torch.Tensor]:
    """Empty arrays for `slots` experts on `device` (a `hybrid.device` Device), laid out like the stack `template`
    (fp8: int8 codes and fp32 scales; INT4: packed bytes and bf16 scale bits)."""
    return {f: device.empty((slots, *getattr(template, f).shape[1:]), as_torch(getattr(template, f)[:0]).dtype)
            for f in FIELDS}  # fmt: skip


def slot_mlp(arrays: dict[str, torch.Tensor], slot: int, fmt) -> MLP:
    """The MLP whose weights are slot `slot` of device arrays laid out like a stack of format `fmt`."""
    return MLP(*(fmt.slot_weight(arrays[p][slot], arrays[p + "_s"][slot]) for p in ("gate", "up", "down")))


def apply_experts(x: torch.Tensor, ids: np.ndarray, w: torch.Tensor, mlp_of) -> torch.Tensor:
    """sum over assignments (t, k) with ids[t, k] >= 0 of w[t, k] * mlp_of(ids[t, k])(x[t]), on x's device."""
    out = torch.zeros_like(x)
    for e in np.unique(ids[ids >= 0]):
        t, k = np.nonzero(ids == e)
        rows, slots = x.new_tensor(t, dtype=torch.long), x.new_tensor(k, dtype=torch.long)  # on x's device
        out.index_add_(0, rows, mlp_of(int(e))(x[rows]) * w[rows, slots, None])
    return out


class SwapBudget:
    """A token bucket shared by the layers' caches: each layer step adds `per_step`, a swap takes 1."""

    def __init__(self, per_step: float):
        self.per_step, self.level = per_step, 0.0

    def take(self) -> bool:
        self.level = min(1.0, self.level + self.per_step)
        if self.level < 1.0 - 1e-9:  # sums of per_step fall a rounding short of whole numbers
            return False
        self.level = 0.0
        return True


class GpuExpertCache:
    def __init__(self, template: ExpertStack, n_experts: int, slots: int, device, budget: SwapBudget | None = None):
        """device: a `hybrid.device` Device; budget: limits swaps across layers (None: one per layer and step)."""
        self.device, self.slots, self.budget = device, slots, budget
        self.arrays = device_slots(template, slots, self.device)
        self.format = of_stack(template)
        self.slot_of = np.full(n_experts, -1, np.int64)
        self.expert_in = np.full(slots, -1, np.int64)
        self.score = np.zeros(n_experts)
        self.assignments = self.on_gpu = self.swaps = 0

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def split(self, ids: np.ndarray) -> np.ndarray:
        """True where the assignment's expert is resident here (those are computed on the GPU)."""
        return (ids >= 0) & (self.slot_of[np.maximum(ids, 0)] >= 0)

    def compute(self, x: torch.Tensor, ids: np.ndarray, w: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
        with PROFILE("experts (GPU cache)"):
            return apply_experts(x, np.where(mask, ids, -1), w,
                                 lambda e: slot_mlp(self.arrays, self.slot_of[e], self.format))

    def update(self, ids: np.ndarray, host_arrays) -> None:
        """Score the step's routing and admit at most one expert. host_arrays(e) -> {field: numpy slot} or None
        when e is not in host RAM right now (a disk-tier miss cannot be admitted)."""
        used = ids[ids >= 0]
        self.assignments += used.size
        self.on_gpu += int(self.split(ids).sum())
        self.score *= DECAY
        np.add.at(self.score, used, 1.0)
        outside = np.flatnonzero(self.slot_of < 0)
        if not outside.size:
            return
        best = int(outside[np.argmax(self.score[outside])])
        if self.score[best] <= 0:
            return
        free = np.flatnonzero(self.expert_in < 0)
        if free.size:
            slot = int(free[0])
        else:
            slot = int(np.argmin(self.score[self.expert_in]))
            if self.score[best] < HYSTERESIS * self.score[self.expert_in[slot]]:
                return
        source = host_arrays(best)
        if source is None or (self.budget is not None and not self.budget.take()):
            return
        for f in FIELDS:  # synchronous: a disk-tier slot may be refilled by an I/O thread right after
            self.arrays[f][slot].copy_(as_torch(source[f]))
        old = self.expert_in[slot]
        if old >= 0:
            self.slot_of[old] = -1
        self.expert_in[slot], self.slot_of[best] = best, slot
        self.swaps += 1

    @property
    def hit_rate(self) -> float:
        """Share of routed assignments computed from the cache."""
        return self.on_gpu / self.assignments if self.assignments else 0.0
