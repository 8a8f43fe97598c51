"""Routed experts computed on the CPU by the Numba fp8 kernels (cpu_kernels): stacked weights and the worker.

The worker is one thread that runs every layer's expert kernels, so the thread driving the GPU can queue the
shared expert while the CPU works. It also keeps Numba's parallel launches on a single thread (its default
'workqueue' threading layer aborts when two threads launch parallel kernels at once).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cpu_kernels import ExpertStack, routed_moe

from .formats import of_weight
from .loader import TensorSource
from .model import MLP
from .profile import PROFILE


def stack_experts(experts: list[MLP], source: TensorSource | None = None, names: list[str] | None = None,
                  register: Callable[[np.ndarray], np.ndarray] | None = None):  # fmt: skip
    """Copy a layer's experts into contiguous [E, rows, cols] arrays (the kernels' layout): an ExpertStack for fp8
    experts, an Int4ExpertStack for INT4 ones.

    register: page-lock the arrays in place (`Device.register_host`), so the GPU can read the experts by DMA
    (long-prefill streaming, hot-expert cache admissions).
    With a checkpoint `source` and the experts' tensor `names`, the file pages just copied are released, so the
    weights live in RAM once: in the stack, not also in the page cache.
    """
    form = of_weight(experts[0].gate)
    arrays = {}
    for part in ("gate", "up", "down"):
        q0, s0 = form.host_arrays(getattr(experts[0], part))
        q = np.empty((len(experts), *q0.shape), q0.dtype)
        s = np.empty((len(experts), *s0.shape), s0.dtype)
        for e, mlp in enumerate(experts):
            q[e], s[e] = form.host_arrays(getattr(mlp, part))
        arrays[part], arrays[part + "_s"] = (register(q), register(s)) if register else (q, s)
    if source is not None and names:
        for name in names:
            source.release(name)
    return form.stack_type(**arrays)


def expert_flops(stack: ExpertStack, assignments: int) -> float:
    """Multiply-adds x2 of `assignments` (token, expert) pairs through gate, up and down."""
    return 2.0 * 3 * stack.gate.shape[1] * stack.hidden * assignments


@dataclass
class _Job:
    stack: ExpertStack
    tokens: int
    ready: object | None  # a device event: the device-to-host copies of the inputs are done
    done: threading.Event
    error: BaseException | None = None
    seconds: float = 0.0


class Pending:
    """A submitted expert computation; result() blocks until the worker is done, then returns [T, H] on device."""

    def __init__(self, worker: "ExpertWorker", job: _Job, out: torch.Tensor):
        self._worker, self._job, self._out = worker, job, out

    def result(self) -> torch.Tensor:
        self._job.done.wait()
        if self._worker._current is not self._job:
            raise RuntimeError("this expert result was superseded by a later submit (its buffers were reused)")
        if self._job.error is not None:
            raise RuntimeError("routed-expert worker failed") from self._job.error
        if self._worker.device is None:
            return self._out.clone()  # the staging buffer is reused by the next job
        return self._worker.device.to(self._out, non_blocking=True)


class ExpertWorker:
    """The CPU side of the hybrid step: one thread, pinned staging buffers, one job in flight.

    On CUDA the inputs go down with async copies on the current stream and an event; the worker waits for that
    event only, and the result comes back with an async copy queued on the same stream. Reusing the staging
    buffers is safe because the stream is in order: the next job's inputs are queued after this job's output
    copy, and the worker waits for them before writing the output buffer again.
    """

    def __init__(self, hidden: int, top_k: int, device=None, max_tokens: int = 64, threaded: bool | None = None,
                 fast: bool = False):
        """device: the engine's GPU (a `hybrid.device` Device), or None when everything is on the CPU.
        threaded (default: only with a GPU) runs jobs on the worker thread. With everything on the CPU there is
        nothing to overlap: the shared expert and the routed experts would only fight over the same cores.
        fast: decode with the kernels' quantized-activation mode (cpu_kernels.routed_moe)."""
        self.device = device
        self.fast = fast
        self.threaded = device is not None if threaded is None else threaded
        self.hidden, self.top_k = hidden, top_k
        self._current: _Job | None = None  # the latest job; its staging buffers are in use
        self.cpu_seconds = 0.0  # kernel time, for the expert-path policy and the benchmarks
        self.cpu_flops = 0.0
        self._allocate(max_tokens)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        if self.threaded:
            self._thread = threading.Thread(target=self._run, name="hybrid-expert-worker", daemon=True)
            self._thread.start()

    def _allocate(self, tokens: int) -> None:
        empty = torch.empty if self.device is None else self.device.pinned_empty
        self.capacity = tokens
        self._x = empty((tokens, self.hidden), dtype=torch.float32)
        self._idx = empty((tokens, self.top_k), dtype=torch.int64)
        self._w = empty((tokens, self.top_k), dtype=torch.float32)
        self._out = empty((tokens, self.hidden), dtype=torch.float32)

    def submit(self, stack: ExpertStack, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> Pending:
        """Start a job. A previous job whose result() was never collected (its step was interrupted, by Ctrl-C
        or an error elsewhere) is let finish first, then superseded: its buffers are reused."""
        if self._current is not None:
            self._current.done.wait()
        T = x.shape[0]
        if T > self.capacity:
            if self.device is not None:
                self.device.current_stream().synchronize()  # old buffers may still be in flight
            self._allocate(max(T, 2 * self.capacity))
        with PROFILE("expert copies"):
            self._x[:T].copy_(x.detach(), non_blocking=True)
            self._idx[:T].copy_(idx, non_blocking=True)
            self._w[:T].copy_(w.detach(), non_blocking=True)
            ready = None
            if self.device is not None:
                ready = self.device.event()
                ready.record(self.device.current_stream())
        job = _Job(stack, T, ready, threading.Event())
        self._current = job
        if self.threaded:
            self._jobs.put(job)
        else:
            self._execute(job)  # a Ctrl-C here propagates; the job is marked done on the way out
        return Pending(self, job, self._out[:T])

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        try:
            if job.ready is not None:
                job.ready.synchronize()
            t0 = time.perf_counter()
            T = job.tokens
            routed_moe(self._x[:T].numpy(), self._idx[:T].numpy(), self._w[:T].numpy(), job.stack,
                       self._out[:T].numpy(), self.fast)  # fmt: skip
            job.seconds = time.perf_counter() - t0
            self.cpu_seconds += job.seconds
            self.cpu_flops += expert_flops(job.stack, T * self.top_k)
            PROFILE.add("experts (CPU)", job.seconds)
        except Exception as e:  # handed to the caller by Pending.result()
            job.error = e
        finally:
            job.done.set()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)
