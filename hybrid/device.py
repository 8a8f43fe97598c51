"""Everything CUDA-specific in one place: the device's tensors, streams, events, host-memory registration and
memory query. Two implementations of one interface:

- `CudaDevice`: the real GPU.
- `StandinDevice` (HYBRID_GPU_STANDIN=1): the whole device="cuda" path on the CPU, for tests and development,
  never for serving. Its tensors are CPU tensors of class `DeviceTensor`, which refuses what CUDA refuses (an op
  mixing device and host tensors, .numpy() of a device tensor, a hard-coded "cuda"); its events must be recorded
  before anyone waits on them (CUDA silently waits for nothing); and its non-blocking device-to-host copies
  land only when an event recorded after them, or the stream, is synchronized, as on a GPU. Triton kernels run
  through Triton's interpreter.

Only `CudaDevice` is left unexecuted by CI (no GPU there); everything else runs on the stand-in.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from contextlib import contextmanager

import numpy as np
import torch
from torch.overrides import get_default_nowrap_functions

STANDIN_ENV = "HYBRID_GPU_STANDIN"
STANDIN_MEM_ENV = "HYBRID_GPU_STANDIN_MEM"
STANDIN_TORCH_DEVICE = torch.device("cpu", 0)  # what a stand-in tensor's .device says: never plain host "cpu"


def standin_enabled() -> bool:
    return os.environ.get(STANDIN_ENV, "") == "1"


def get(index: int | None = None) -> "CudaDevice | StandinDevice":
    """The GPU to compute on: the stand-in when HYBRID_GPU_STANDIN=1, else CUDA device `index` (default current)."""
    if standin_enabled():
        return StandinDevice.instance()
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); use "
                         f"device='cpu' (or {STANDIN_ENV}=1 to run the GPU path on the CPU for testing)")  # fmt: skip
    return _cuda(torch.cuda.current_device() if index is None else index)  # pragma: no cover


@functools.cache
def _cuda(index: int) -> "CudaDevice":  # pragma: no cover
    return CudaDevice(index)


def of(t: torch.Tensor) -> "CudaDevice | StandinDevice":
    """The device a kernel's operands live on: their CUDA device, else the stand-in (Triton's interpreter)."""
    return _cuda(t.device.index) if t.is_cuda else StandinDevice.instance()


def on_device(t: torch.Tensor) -> bool:
    """True for a tensor that lives on the GPU (or on the stand-in)."""
    return t.is_cuda or isinstance(t, DeviceTensor)


def plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor as torch sees it (a stand-in tensor unwrapped, no copy): for kernel launches."""
    return t.as_subclass(torch.Tensor) if isinstance(t, DeviceTensor) else t


class CudaDevice:  # pragma: no cover  (the one piece CI cannot run: it needs a GPU)
    is_standin = False

    def __init__(self, index: int):
        self.torch_device = torch.device("cuda", index)
        self.name = torch.cuda.get_device_name(index)

    def to(self, t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return t.to(self.torch_device, non_blocking=non_blocking)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.torch_device)

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.torch_device)

    def capability(self) -> tuple[int, int]:
        return torch.cuda.get_device_capability(self.torch_device)

    @functools.cache
    def sm_count(self) -> int:
        return torch.cuda.get_device_properties(self.torch_device).multi_processor_count

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch_device)

    def stream(self):
        return torch.cuda.Stream(self.torch_device)

    def current_stream(self):
        return torch.cuda.current_stream(self.torch_device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def register_host(self, array: np.ndarray) -> np.ndarray:
        """Page-lock an existing host array in place (cudaHostRegister); unregistered when the array dies.

        Not torch's pin_memory=True: its caching host allocator rounds each block up to a power of two, so one
        layer's 5.6 GB gate stack would take 8 GB. Registering the exact range costs nothing extra."""
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(array.ctypes.data, array.nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {array.nbytes / 2**30:.2f} GiB failed (error {int(err)}): "
                               "is the locked-memory limit (ulimit -l) too low?")  # fmt: skip
        weakref.finalize(array, cudart.cudaHostUnregister, array.ctypes.data)
        return array

    def is_pinned(self, array: np.ndarray | torch.Tensor) -> bool:
        t = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        return t.is_pinned()

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)


# ---- the stand-in ----


class StandinEvent:
    def __init__(self, timing: bool = False):
        self.recorded_at: float | None = None
        self._landing: list = []  # deferred device-to-host copies that this event's completion makes visible
        self._after: StandinEvent | None = None  # the stream's previous event: completes before this one

    def record(self, stream: "StandinStream | None" = None) -> None:
        stream = stream or StandinDevice.instance().current_stream()
        self.recorded_at = time.perf_counter()
        self._landing.extend(stream.take_pending())
        self._after, stream.last_event = stream.last_event, self

    def _check(self, what: str) -> None:
        if self.recorded_at is None:
            raise RuntimeError(f"stand-in GPU: {what} an event that was never recorded (CUDA would silently not wait)")

    def synchronize(self) -> None:
        self._check("synchronize on")
        event = self
        while event is not None:  # this event and the earlier ones on its stream, whose work came first
            _land(event._landing)
            earlier, event._after = event._after, None
            event = earlier

    def query(self) -> bool:
        return self.recorded_at is not None

    def elapsed_time(self, end: "StandinEvent") -> float:
        self._check("time")
        end._check("time")
        return (end.recorded_at - self.recorded_at) * 1e3


class StandinStream:
    def __init__(self):
        self._pending: list = []
        self._lock = threading.Lock()
        self.last_event: StandinEvent | None = None

    def defer(self, land) -> None:
        with self._lock:
            self._pending.append(land)

    def take_pending(self) -> list:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def wait_event(self, event: StandinEvent) -> None:
        event._check("wait on")  # the stand-in's device work runs in order already; only the check matters

    def synchronize(self) -> None:
        if self.last_event is not None:
            self.last_event.synchronize()
        _land(self.take_pending())


def _land(copies: list) -> None:
    while copies:
        copies.pop(0)()


class StandinDevice:
    """The GPU played by the CPU. One per process (like a GPU, it is shared by every engine)."""

    is_standin = True
    name = "stand-in GPU (the CPU; HYBRID_GPU_STANDIN=1)"
    torch_device = STANDIN_TORCH_DEVICE
    _instance: "StandinDevice | None" = None

    def __init__(self):
        from .placement import parse_bytes

        self.total = parse_bytes(os.environ.get(STANDIN_MEM_ENV) or "8GiB")
        self._default = StandinStream()
        self._streams: list[StandinStream] = [self._default]
        self._local = threading.local()
        self._registered: dict[int, int] = {}  # start address -> bytes of registered ("pinned") host ranges
        self._lock = threading.Lock()

    @classmethod
    def instance(cls) -> "StandinDevice":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def to(self, t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if isinstance(t, DeviceTensor):
            return t
        return t.detach().clone().as_subclass(DeviceTensor)  # a copy: later host writes must not show through

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        # filled with NaN or a sentinel, as uninitialised device memory may hold anything
        t = torch.empty(shape, dtype=dtype)
        t.fill_(float("nan") if dtype.is_floating_point else -7)
        return t.as_subclass(DeviceTensor)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype).as_subclass(DeviceTensor)

    def mem_get_info(self) -> tuple[int, int]:
        return self.total, self.total

    # it plays an H100: Triton's interpreter runs the grids and the fp8 conversion path the kernels pick there
    compute_capability = (9, 0)

    def capability(self) -> tuple[int, int]:
        return self.compute_capability

    def sm_count(self) -> int:
        return 132

    def max_memory_allocated(self) -> int:
        return 0

    def stream(self) -> StandinStream:
        s = StandinStream()
        self._streams.append(s)
        return s

    def current_stream(self) -> StandinStream:
        return getattr(self._local, "stream", None) or self._default

    @contextmanager
    def use_stream(self, stream: StandinStream):
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield stream
        finally:
            self._local.stream = before

    def event(self, timing: bool = False) -> StandinEvent:
        return StandinEvent(timing)

    def synchronize(self) -> None:
        for s in self._streams:
            s.synchronize()

    def register_host(self, array: np.ndarray) -> np.ndarray:
        self._register(array, array.ctypes.data, array.nbytes)
        return array

    def _register(self, owner, address: int, nbytes: int) -> None:
        with self._lock:
            self._registered[address] = nbytes
        weakref.finalize(owner, self._unregister, address)

    def _unregister(self, address: int) -> None:
        with self._lock:
            self._registered.pop(address, None)

    def is_pinned(self, array: np.ndarray | torch.Tensor) -> bool:
        start = array.ctypes.data if isinstance(array, np.ndarray) else array.data_ptr()
        nbytes = array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size()
        with self._lock:
            return any(a <= start and start + nbytes <= a + n for a, n in self._registered.items())

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        self._register(t, t.data_ptr(), t.numel() * t.element_size())
        return t


class DeviceTensor(torch.Tensor):
    """A CPU tensor playing one in GPU memory: ops on it give device tensors; mixing it with host tensors (other
    than 0-dim ones, which CUDA accepts as scalars) raises as CUDA would."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PASSTHROUGH:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func == _DEVICE_GETTER:
            return STANDIN_TORCH_DEVICE
        if func in (torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.tolist):
            raise TypeError("stand-in GPU: can't convert a device tensor to numpy or a list; copy it to the host "
                            "first (.cpu())")  # fmt: skip
        if func is torch.Tensor.cpu:
            return _to_host(args[0])
        if func is torch.Tensor.to:
            return _to(args, kwargs)
        if func is torch.Tensor.copy_:
            return _copy(args, kwargs)
        if func not in _MIXING_ALLOWED:
            _check_no_mixing(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in get_default_nowrap_functions():
            return out
        return _wrap(out)


_DEVICE_GETTER = torch.Tensor.device.__get__
_PASSTHROUGH = {getattr(torch.Tensor, p).__get__ for p in ("shape", "dtype", "ndim", "requires_grad", "is_cuda",
                                                           "grad_fn", "layout", "is_sparse")} | {
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.data_ptr,
    torch.Tensor.stride, torch.Tensor.is_contiguous, torch.Tensor.__len__, torch.Tensor.is_floating_point,
    torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.storage_offset, torch.Tensor.is_pinned}  # fmt: skip
# CUDA indexes a device tensor with host indices, and item()/bool() copy one value back
_MIXING_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.item, torch.Tensor.__bool__,
                   torch.Tensor.__int__, torch.Tensor.__float__}  # fmt: skip


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _check_no_mixing(func, args, kwargs) -> None:
    tensors = list(_tensors(args)) + list(_tensors(kwargs))
    host = next((t for t in tensors if not isinstance(t, DeviceTensor) and t.dim() > 0), None)
    if host is not None and any(isinstance(t, DeviceTensor) for t in tensors):
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        raise RuntimeError(f"stand-in GPU: {name} mixes device tensors with a host tensor of shape "
                           f"{tuple(host.shape)}; on CUDA this fails (tensors on different devices). Move it with "
                           "the Device (Device.to) or create it from a device tensor (new_zeros, zeros_like)")  # fmt: skip


def _wrap(out):
    if isinstance(out, DeviceTensor):
        return out
    if isinstance(out, torch.Tensor):
        return out.as_subclass(DeviceTensor)
    if isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out):
        return type(out)(_wrap(o) for o in out) if not hasattr(out, "_fields") else type(out)(*map(_wrap, out))
    return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor).clone()  # a copy, as from a GPU: later device writes stay there


def _target(device) -> str | None:
    """'device', 'host' or None (no device named) for a .to() target."""
    if device is None:
        return None
    d = torch.device(device)
    if d.type == "cuda":
        raise RuntimeError(f"stand-in GPU: .to({str(device)!r}): there is no CUDA device here; move tensors with "
                           "the Device (Device.to) rather than by naming 'cuda'")  # fmt: skip
    return "device" if d == STANDIN_TORCH_DEVICE else "host"


def _to(args, kwargs):
    src, rest = args[0], list(args[1:])
    other = next((a for a in rest if isinstance(a, torch.Tensor)), kwargs.get("other"))
    if other is not None:  # .to(tensor): that tensor's device and dtype
        where, dtype = ("device" if isinstance(other, DeviceTensor) else "host"), other.dtype
        non_blocking = bool(kwargs.get("non_blocking", rest[1] if len(rest) > 1 else False))
    else:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
        where = _target(device)
    here = "device" if isinstance(src, DeviceTensor) else "host"
    where = where or here
    with torch._C.DisableTorchFunctionSubclass():
        raw = src.as_subclass(torch.Tensor)
        out = raw.to(dtype) if dtype is not None else raw
        if where != here and out.data_ptr() == raw.data_ptr():
            out = out.clone()  # crossing devices always copies
    if where == "host":
        return out
    return src if out is raw and here == "device" else out.as_subclass(DeviceTensor)


def _copy(args, kwargs):
    dst, src = args[0], args[1]
    non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
    with torch._C.DisableTorchFunctionSubclass():
        raw_dst, raw_src = dst.as_subclass(torch.Tensor), src.as_subclass(torch.Tensor)
        if non_blocking and isinstance(src, DeviceTensor) and not isinstance(dst, DeviceTensor):
            # device -> host, async: the values are read now (stream order) but land only when the stream (or an
            # event recorded after this copy) is synchronized, as on a GPU
            snapshot = raw_src.clone()
            StandinDevice.instance().current_stream().defer(lambda: raw_dst.copy_(snapshot))
        else:
            raw_dst.copy_(raw_src)
    return dst
