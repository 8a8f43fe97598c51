"""Routed experts on the compute device, for long prefill: each used expert's fp8 weights are streamed from the
pinned host stack over PCIe, double-buffered, while the previous expert computes. Also the per-chunk choice
between this path and the CPU kernels, and the per-layer backend that applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpu_kernels import FIELDS, ExpertStack

from .cpu_experts import ExpertWorker, expert_flops
from .formats import as_torch, of_stack
from .gpu_cache import GpuExpertCache, device_slots, slot_mlp
from .profile import PROFILE
from .tiers import LayerTier, remap, tier_groups, to_numpy_ids

MIN_STREAM_TOKENS = 64  # below this the CPU always wins (and deciding would cost a device sync per layer)


class StreamedExperts:
    """RoutedExperts backend computing on the GPU `device` (a `hybrid.device` Device) with weights copied in per
    used expert. staging: two device slots (`device_slots(stack, 2, device)`), which all layers can share."""

    def __init__(self, stack: ExpertStack, device, staging: dict | None = None):
        self.stack, self.device = stack, device
        self.host = {f: as_torch(getattr(stack, f)) for f in FIELDS}
        self.format = of_stack(stack)
        self.staging = staging or device_slots(stack, 2, device)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dev, k = self.device, idx.shape[1]
        flat = idx.reshape(-1).cpu().numpy()
        order = np.argsort(flat, kind="stable")  # (token, slot) pairs grouped by expert
        used, counts = np.unique(flat, return_counts=True)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        order_t = dev.to(torch.from_numpy(order))
        rows_all, slot_all = order_t // k, order_t % k
        out = torch.zeros_like(x)
        copy_stream, compute = dev.stream(), dev.current_stream()
        loaded, freed = [None] * len(used), [None, None]

        def start_load(i: int) -> None:
            with dev.use_stream(copy_stream):
                if freed[i % 2] is not None:
                    copy_stream.wait_event(freed[i % 2])  # the expert that used this slot has finished
                for f in FIELDS:
                    self.staging[f][i % 2].copy_(self.host[f][int(used[i])], non_blocking=True)
                loaded[i] = dev.event()
                loaded[i].record(copy_stream)

        with PROFILE("experts (device)"):
            if len(used):
                start_load(0)
            for i, e in enumerate(used):
                compute.wait_event(loaded[i])
                if i + 1 < len(used):
                    start_load(i + 1)  # overlaps with this expert's compute
                mlp = slot_mlp(self.staging, i % 2, self.format)
                rows, slots = rows_all[bounds[i]:bounds[i + 1]], slot_all[bounds[i]:bounds[i + 1]]
                out.index_add_(0, rows, mlp(x[rows]) * w[rows, slots, None])
                freed[i % 2] = dev.event()
                freed[i % 2].record(compute)
        return out


@dataclass
class ExpertRates:
    """Rates the long-prefill choice is made from, measured once when the engine loads."""

    cpu_flops_per_s: float
    pcie_bytes_per_s: float


def stream_is_faster(tokens: int, top_k: int, distinct: int, stack: ExpertStack, rates: ExpertRates) -> bool:
    """GPU time ~ bytes of the distinct experts over PCIe (its compute hides behind the copies);
    CPU time ~ the chunk's expert FLOPs at the measured CPU rate."""
    cpu_s = expert_flops(stack, tokens * top_k) / rates.cpu_flops_per_s
    gpu_s = distinct * stack.expert_bytes() / rates.pcie_bytes_per_s
    return gpu_s < cpu_s


class _Done:
    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


class _Sum:
    def __init__(self, pending, extra: torch.Tensor):
        self.pending, self.extra = pending, extra

    def result(self) -> torch.Tensor:
        return self.pending.result() + self.extra


class HybridExperts:
    """One MoE layer's routed experts: the CPU worker by default; hot experts from a GPU cache when there is one;
    streamed to the GPU for long chunks when the measured rates say that is faster. `submit` returns at once
    with something whose result() is the output."""

    def __init__(self, stack: ExpertStack | None, worker: ExpertWorker, streamed: StreamedExperts | None = None,
                 rates: ExpertRates | None = None, tier: LayerTier | None = None,
                 gpu_cache: GpuExpertCache | None = None):  # fmt: skip
        """stack: all experts in RAM; or tier: some in RAM slots, the rest read from disk when needed."""
        self.stack, self.worker, self.streamed, self.rates, self.tier = stack, worker, streamed, rates, tier
        self.gpu_cache = gpu_cache
        self.last_path = "cpu"

    def _host_arrays(self, e: int) -> dict | None:
        """Expert e's arrays in host RAM (for admission to the GPU cache), or None when it is not there now."""
        if self.tier is None:
            return {f: getattr(self.stack, f)[e] for f in FIELDS}
        slot = self.tier.slot_of[e]
        return None if slot < 0 or e in self.tier.pending else {f: getattr(self.tier.stack, f)[slot] for f in FIELDS}

    def _submit_cpu(self, x: torch.Tensor, ids: np.ndarray, w: torch.Tensor):
        tier = self.tier
        if tier is None:
            return self.worker.submit(self.stack, x, torch.from_numpy(ids), w)
        needed = tier.note_use(ids)
        groups = tier_groups(needed, tier.slots)
        if len(groups) == 1:
            tier.ensure(needed.tolist())
            return self.worker.submit(tier.stack, x, torch.from_numpy(remap(ids, tier.slot_of, needed)), w)
        out = None  # a chunk touching more experts than the layer has slots: in rounds, each expert read once
        for group in groups:
            tier.ensure(group.tolist())
            part = self.worker.submit(tier.stack, x, torch.from_numpy(remap(ids, tier.slot_of, group)), w).result()
            out = part if out is None else out + part
        return _Done(out)

    def submit(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        T, k = idx.shape
        self.last_path = "cpu"
        if self.streamed is not None and self.rates is not None and T >= MIN_STREAM_TOKENS:
            distinct = int(torch.unique(idx).numel())
            if stream_is_faster(T, k, distinct, self.stack, self.rates):
                self.last_path = "device"
                return _Done(self.streamed(x, idx, w))
        if self.tier is None and self.gpu_cache is None:
            return self.worker.submit(self.stack, x, idx, w)  # ids stay on the device: no host sync here
        ids = to_numpy_ids(idx)
        if self.gpu_cache is None:
            return self._submit_cpu(x, ids, w)
        on_gpu = self.gpu_cache.split(ids)
        pending = self._submit_cpu(x, np.where(on_gpu, -1, ids), w)  # the CPU starts on the rest...
        hot = self.gpu_cache.compute(x, ids, w, on_gpu)  # ...while the GPU computes its cached experts
        self.gpu_cache.update(ids, self._host_arrays)
        return _Sum(pending, hot)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.submit(x, idx, w).result()


def measure_rates(stack: ExpertStack, worker: ExpertWorker, device, tokens: int = 128) -> ExpertRates:
    """PCIe: a pinned-to-device copy of a few experts' gate weights; CPU: one prefill-sized job on the worker."""
    src = torch.from_numpy(stack.gate[: min(stack.num_experts, 8)])
    dst = device.empty(src.shape, src.dtype)
    seconds = []
    for _ in range(2):  # the first copy also pays for lazy initialisation
        start, end = device.event(timing=True), device.event(timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        seconds.append(max(start.elapsed_time(end), 1e-6) / 1e3)
    k = worker.top_k
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(stack.num_experts, generator=g)[:k] for _ in range(tokens)])
    x = torch.randn(tokens, stack.hidden, generator=g)
    before = worker.cpu_seconds
    worker.submit(stack, device.to(x), device.to(idx), device.to(torch.full((tokens, k), 1.0 / k))).result()
    cpu_s = worker.cpu_seconds - before
    return ExpertRates(cpu_flops_per_s=expert_flops(stack, tokens * k) / cpu_s, pcie_bytes_per_s=src.nbytes / seconds[-1])
