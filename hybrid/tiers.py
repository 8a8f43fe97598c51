"""Expert tiers for host RAM smaller than the routed experts: per MoE layer a fixed number of RAM slots, the rest
read on demand from the checkpoint's own safetensors files (no second copy of the model on disk).

Policy, per layer (every layer gets the same number of slots): each expert has a use score that decays by
DECAY per step and grows by its number of assignments, so it tracks both how often and how recently the layer's
tokens chose it. A miss (or a prefetch) takes a free slot, else evicts the lowest-scored expert that the current
step does not need and that is not being read. Reads go through the page cache once and are dropped from it
right after (posix_fadvise DONTNEED), so RAM holds each resident expert once, in its slot.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cpu_kernels import FIELDS, ExpertStack

from .checkpoint import CheckpointError, TensorInfo
from .formats import of_stack
from .loader import mlp_tensor_names

DECAY = 0.95  # per step: an expert unused for ~14 steps has lost half its score


class ExpertReadError(CheckpointError):
    """An expert could not be read back from its shard (vanished, truncated or corrupted file)."""


def expert_tensor_names(layer: int, expert: int, fmt: str = "fp8") -> list[tuple[str, str]]:
    """(stack field, checkpoint tensor name) for the six stacked tensors of one expert in format `fmt`."""
    return list(zip(FIELDS, mlp_tensor_names(f"model.layers.{layer}.mlp.experts.{expert}", fmt)))


def read_tensor_into(info: TensorInfo, dst: np.ndarray) -> None:
    """pread one tensor's bytes into dst, then drop them from the page cache. Opens the file each time, so a
    shard that vanished is reported rather than read from a stale descriptor."""
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as e:
        raise ExpertReadError(f"{info.file}: cannot open shard to read '{info.name}' ({e.strerror})") from None
    try:
        n = os.preadv(fd, [memoryview(dst).cast("B")], info.start)
        os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise ExpertReadError(f"{info.file}: reading '{info.name}' failed ({e.strerror})") from None
    finally:
        os.close(fd)
    if n != info.nbytes:
        raise ExpertReadError(f"{info.file}: tensor '{info.name}' gave {n} of {info.nbytes} bytes at offset "
                              f"{info.start} (truncated shard?)")  # fmt: skip


@dataclass
class TierStats:
    steps: int = 0
    hits: int = 0  # needed experts already in RAM
    prefetched_hits: int = 0  # ...of which a prefetch brought in
    waits: int = 0  # needed experts still being prefetched (the step waited for the read)
    misses: int = 0  # needed experts read on demand
    bytes_read: int = 0
    predicted: int = 0  # prefetcher: experts predicted for this layer
    predicted_used: int = 0  # ...that the layer then used
    used_when_predicted: int = 0  # experts used in steps that had a prediction
    cancelled: int = 0  # prefetches dropped before they started (the step did not need them)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.waits + self.misses
        return (self.hits + self.waits) / total if total else 1.0

    @property
    def precision(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.predicted_used / self.used_when_predicted if self.used_when_predicted else 0.0


class IoPools:
    """Reader threads shared by all layers: on-demand reads never queue behind prefetches."""

    def __init__(self, prefetch_threads: int = 2, demand_threads: int = 4):
        self.prefetch = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="hybrid-prefetch")
        self.demand = ThreadPoolExecutor(demand_threads, thread_name_prefix="hybrid-read")


class LayerTier:
    """The RAM slots of one MoE layer and which expert each holds."""

    def __init__(self, layer: int, n_experts: int, slots: int, template: ExpertStack, infos: dict[str, TensorInfo],
                 io: IoPools, register=None):  # fmt: skip
        """template: a 1-expert stack giving shapes; infos: checkpoint tensor name -> where it lies in its shard;
        register: page-locks the slots in place (`Device.register_host`) when a GPU reads them by DMA."""
        self.layer, self.n_experts, self.slots, self.io, self.infos = layer, n_experts, slots, io, infos
        self.format = of_stack(template)
        arrays = {}
        for f in FIELDS:
            a = np.empty((slots, *getattr(template, f).shape[1:]), getattr(template, f).dtype)
            arrays[f] = register(a) if register else a
        self.stack = type(template)(**arrays)
        self.slot_of = np.full(n_experts, -1, np.int64)
        self.expert_in = np.full(slots, -1, np.int64)
        self.score = np.zeros(n_experts)
        self.pending: dict[int, Future] = {}  # expert -> its read in flight (its slot is already assigned)
        self.from_prefetch: set[int] = set()
        self.last_prediction: set[int] | None = None  # set by the prefetcher, scored by the next step
        self.stats = TierStats()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.stack.nbytes

    def _read(self, expert: int, slot: int) -> None:
        names = dict(expert_tensor_names(self.layer, expert, self.format.name))
        for f, name in names.items():
            read_tensor_into(self.infos[name], getattr(self.stack, f)[slot])
        for f in ("gate_s", "up_s", "down_s"):
            s = self.format.scales(getattr(self.stack, f)[slot])
            if not (np.isfinite(s).all() and (s > 0).all()):
                info = self.infos[names[f]]
                raise ExpertReadError(f"{info.file}: tensor '{info.name}' holds non-finite or non-positive scales "
                                      "(corrupted shard?)")  # fmt: skip
        self.stats.add(bytes_read=self.stack.expert_bytes())

    def _victim(self, protect: set[int]) -> int | None:
        free = np.flatnonzero(self.expert_in < 0)
        if free.size:
            return int(free[0])
        best, best_score = None, np.inf
        for slot, e in enumerate(self.expert_in):
            if e not in protect and e not in self.pending and self.score[e] < best_score:
                best, best_score = slot, self.score[e]
        return best

    def _assign(self, expert: int, slot: int) -> None:
        old = self.expert_in[slot]
        if old >= 0:
            self.slot_of[old] = -1
            self.from_prefetch.discard(int(old))
        self.expert_in[slot], self.slot_of[expert] = expert, slot

    def _start_read(self, expert: int, slot: int, demand: bool = False) -> Future:
        def run():
            try:
                self._read(expert, slot)
            except BaseException:
                with self._lock:  # leave the slot empty, not half-written and marked resident
                    self.slot_of[expert], self.expert_in[slot] = -1, -1
                raise
            finally:
                with self._lock:
                    self.pending.pop(expert, None)

        self._assign(expert, slot)
        fut = (self.io.demand if demand else self.io.prefetch).submit(run)
        self.pending[expert] = fut
        return fut

    def prefetch(self, experts: list[int], protect: set[int] = frozenset()) -> None:
        """Start reads of predicted experts that are not in RAM, best first, while slots can be freed."""
        with self._lock:
            keep = set(experts) | set(protect)
            for e in experts:
                if self.slot_of[e] >= 0 or e in self.pending:
                    continue
                slot = self._victim(keep)
                if slot is None:
                    return
                self._start_read(e, slot)
                self.from_prefetch.add(e)

    def ensure(self, needed: list[int]) -> None:
        """Make the `needed` experts (at most `slots` of them) resident; on return slot_of maps them."""
        if len(needed) > self.slots:
            raise ValueError(f"layer {self.layer}: {len(needed)} experts needed at once but only {self.slots} slots")
        need = set(needed)
        waits, hits, from_prefetch, late, misses = [], 0, 0, 0, 0
        with self._lock:
            for e, fut in list(self.pending.items()):  # mispredicted reads that have not started: drop them
                if e not in need and fut.cancel():
                    slot = self.slot_of[e]
                    self.slot_of[e], self.expert_in[slot] = -1, -1
                    del self.pending[e]
                    self.stats.add(cancelled=1)
            todo = []
            for e in needed:
                if e in self.pending:  # a prefetch still reading it
                    waits.append(self.pending[e])
                    late += 1
                elif self.slot_of[e] >= 0:
                    hits += 1
                    from_prefetch += e in self.from_prefetch
                else:
                    todo.append(e)
        while todo:
            with self._lock:
                while todo and (slot := self._victim(need)) is not None:
                    waits.append(self._start_read(todo.pop(), slot, demand=True))
                    misses += 1
                busy = list(self.pending.values())
            if todo:  # every other slot is being filled by a prefetch: let those reads land, then evict
                for fut in busy:
                    fut.exception()
        self.stats.add(hits=hits, prefetched_hits=from_prefetch, waits=late, misses=misses)
        for fut in waits:
            fut.result()  # an ExpertReadError surfaces here, in the step that needed the expert
        with self._lock:
            self.from_prefetch.difference_update(needed)

    def note_use(self, idx: np.ndarray) -> np.ndarray:
        """Count a step's routing into the eviction scores (and the prefetcher's hit counts); its distinct experts.

        The decay is applied here, once per step: a long prefill chunk calls ensure() once per group of slots."""
        with self._lock:
            self.score *= DECAY
            np.add.at(self.score, idx[idx >= 0], 1.0)
        needed = np.unique(idx[idx >= 0])
        if self.last_prediction is not None:
            used = set(needed.tolist())
            self.stats.add(predicted=len(self.last_prediction), predicted_used=len(used & self.last_prediction),
                           used_when_predicted=len(used))  # fmt: skip
            self.last_prediction = None
        self.stats.add(steps=1)
        return needed


def tier_groups(needed: np.ndarray, slots: int) -> list[np.ndarray]:
    """Split a step's distinct experts into groups that fit the slots (one group unless a long prefill chunk
    touches more experts than the layer has slots)."""
    return [needed[i : i + slots] for i in range(0, len(needed), slots)] or [needed]


def remap(idx: np.ndarray, slot_of: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Expert ids -> slot ids for the assignments in `group`, -1 (skip) for the others."""
    in_group = np.isin(idx, group)
    return np.where(in_group, slot_of[np.maximum(idx, 0)], -1).astype(np.int64)


def to_numpy_ids(idx: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(idx.cpu().numpy(), dtype=np.int64)


def disk_read_bandwidth(files: list, limit: int = 2 << 30, block: int = 16 << 20, threads: int = 4) -> float:
    """Cold read GB/s of (up to `limit` bytes of) these files in `block` pieces by `threads` readers, as the tiers
    read: their pages are dropped from the page cache before and after, so the number is the disk's, not RAM's."""
    pieces, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        for offset in range(0, size, block):
            if total >= limit:
                break
            pieces.append((path, offset, min(block, size - offset)))
            total += pieces[-1][2]
    for path in files:
        drop_cached(path)

    def read(piece) -> int:
        path, offset, n = piece
        buf = np.empty(n, np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [memoryview(buf)], offset)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(read, pieces))
    seconds = time.perf_counter() - t0
    for path in files:
        drop_cached(path)
    return got / seconds / 1e9 if seconds else 0.0


def drop_cached(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
