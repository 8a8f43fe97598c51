"""The stand-in GPU (hybrid/device.py) refuses what CUDA refuses and delays what CUDA delays, so the device="cuda"
path that CI runs on it behaves as it would on a GPU. These tests pin the stand-in itself; on a CUDA machine the
GPU tests run on the real device and these are skipped."""

import gc

import numpy as np
import pytest
import torch

from hybrid import device
from hybrid.device import DeviceTensor, StandinDevice, on_device, plain

pytestmark = pytest.mark.skipif(not device.standin_enabled(), reason="the stand-in's own behaviour")


@pytest.fixture
def dev():
    return StandinDevice.instance()


def test_device_tensors_stay_on_the_device_and_copy_when_they_leave(dev):
    a = dev.to(torch.arange(12.0).view(3, 4))
    assert on_device(a) and a.device == device.STANDIN_TORCH_DEVICE and not on_device(torch.ones(2))
    for t in (a + 1, a.float(), a.to(torch.bfloat16), torch.zeros_like(a), a.new_zeros(2), torch.cat([a, a]), a.T,
              a[1:], a.topk(2).values, a.to(a)):  # fmt: skip
        assert isinstance(t, DeviceTensor), t
    host = a.cpu()
    assert type(host) is torch.Tensor and torch.equal(host, plain(a))
    a.add_(100)  # a later device write does not reach the host copy (as with a real device-to-host copy)
    assert float(host[0, 0]) == 0 and type(a.to("cpu")) is torch.Tensor
    src = torch.ones(3)
    b = dev.to(src)
    src.fill_(5)  # nor does a later host write reach the device copy
    assert float(b.sum().item()) == 3


def test_mixing_host_and_device_tensors_is_refused_as_on_cuda(dev):
    a, host = dev.to(torch.ones(4, 3)), torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="mixes device tensors with a host tensor of shape \\(4, 3\\)"):
        a + host
    with pytest.raises(RuntimeError, match="mixes"):
        torch.cat([a, host])
    with pytest.raises(RuntimeError, match="mixes"):
        a.index_add_(0, torch.tensor([0, 1]), dev.to(torch.ones(2, 3)))  # CUDA needs the index on the device too
    with pytest.raises(TypeError, match="copy it to the host first"):
        a.numpy()
    with pytest.raises(RuntimeError, match="no CUDA device here"):
        host.to(a).to("cuda")
    # what CUDA does accept: 0-dim host tensors as scalars, host indices, copies both ways, item()
    assert isinstance(a * torch.tensor(2.0), DeviceTensor)
    assert isinstance(a[torch.tensor([0, 2])], DeviceTensor)
    a[torch.tensor([1])] = 7.0
    host.copy_(a)
    assert float(host[1, 0]) == 7 and a.sum().item() == float(host.sum())


def test_async_device_to_host_copies_land_only_after_a_synchronization(dev):
    src = dev.to(torch.full((5,), 3.0))
    dst = torch.zeros(5)
    dst.copy_(src, non_blocking=True)
    src.fill_(9.0)  # later device work: the copy already read its values, in stream order
    assert float(dst.sum()) == 0  # not visible yet, as on a GPU before the event completes
    event = dev.event()
    event.record()
    event.synchronize()
    assert torch.equal(dst, torch.full((5,), 3.0))

    first, second = torch.zeros(5), torch.zeros(5)
    first.copy_(src, non_blocking=True)
    dev.event().record()
    second.copy_(src, non_blocking=True)
    last = dev.event()
    last.record()
    last.synchronize()  # a later event's completion implies the earlier work on its stream is done too
    assert float(first.sum()) == float(second.sum()) == 45

    later = torch.zeros(5)
    later.copy_(src, non_blocking=True)
    dev.current_stream().synchronize()
    assert float(later.sum()) == 45
    blocking = torch.zeros(5)
    blocking.copy_(src)
    assert float(blocking.sum()) == 45


def test_events_must_be_recorded_before_anyone_waits_or_times_them(dev):
    ev = dev.event()
    for wait in (ev.synchronize, lambda: dev.current_stream().wait_event(ev), lambda: ev.elapsed_time(ev)):
        with pytest.raises(RuntimeError, match="never recorded"):
            wait()
    start, end = dev.event(timing=True), dev.event(timing=True)
    start.record()
    end.record(dev.stream())
    assert end.query() and start.elapsed_time(end) >= 0
    side = dev.stream()
    with dev.use_stream(side):
        assert dev.current_stream() is side
    assert dev.current_stream() is not side


def test_registered_host_memory_is_known_as_pinned_until_it_is_freed(dev):
    a = dev.register_host(np.zeros((4, 1024), np.int8))
    assert dev.is_pinned(a) and dev.is_pinned(a[2]) and not dev.is_pinned(np.zeros(8))
    staging = dev.pinned_empty((3, 5), torch.float32)
    assert dev.is_pinned(staging)
    address = a.ctypes.data
    del a
    gc.collect()
    assert address not in dev._registered


def test_device_memory_is_uninitialised_like_a_gpu_allocation(dev):
    assert torch.isnan(plain(dev.empty((3,), torch.float32))).all() and (plain(dev.empty((2,), torch.int8)) == -7).all()
    assert float(dev.zeros((2, 2), torch.bfloat16).sum()) == 0
    free, total = dev.mem_get_info()
    assert 0 < free <= total


def test_without_the_stand_in_and_without_cuda_the_gpu_is_refused(monkeypatch):
    monkeypatch.setenv(device.STANDIN_ENV, "0")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA device.*HYBRID_GPU_STANDIN=1"):
        device.get()
