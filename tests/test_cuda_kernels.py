"""cuda/: the sources compile for every target architecture (wherever nvcc is), and on a GPU the kernels match the
torch reference over Kimi-K2's shapes."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hybrid.fp8 import dequantize, quantize

SOURCES = Path(__file__).resolve().parents[1] / "cuda"
NVCC = shutil.which("nvcc")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# (out, in) of K2's decode linears: q_a, q_b, kv_a, kv_b, o, shared/dense gate-up, down
K2_SHAPES = [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 8192), (2048, 7168), (7168, 2048)]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])  # Ampere (no fp8 hardware), Ada, Hopper
def test_kernel_sources_compile(arch, tmp_path):
    r = subprocess.run([NVCC, f"-arch={arch}", "-O3", "-c", str(SOURCES / "fp8_linear.cu"), "-o",
                        str(tmp_path / "k.o")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr


@cuda
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("shape", K2_SHAPES)
def test_fp8_linear_matches_torch_on_k2_shapes(shape, M):
    from hybrid.cuda_kernels import fp8_linear, kernels

    assert kernels() is not None, "the CUDA kernels did not build or failed their self-check"
    g = torch.Generator().manual_seed(M)
    w = quantize(torch.randn(shape, generator=g) / shape[1] ** 0.5)
    x = torch.randn(M, shape[1], generator=g)
    ref = x.double() @ dequantize(w.q, w.scale).double().T
    out = torch.full((M, shape[0]), float("nan"), device="cuda")  # poisoned: every element must be written
    y = fp8_linear(x.cuda(), w.q.cuda(), w.scale.cuda(), out)
    assert y is not None and y.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    assert float((out.cpu().double() - ref).abs().max() / ref.abs().max()) <= 1e-5


@cuda
def test_fp8_linear_declines_what_it_does_not_cover():
    from hybrid.cuda_kernels import fp8_linear

    w = quantize(torch.randn(64, 200))  # 200 columns: not a multiple of 16
    assert fp8_linear(torch.randn(1, 200).cuda(), w.q.cuda(), w.scale.cuda()) is None
    w = quantize(torch.randn(64, 256))
    assert fp8_linear(torch.randn(17, 256).cuda(), w.q.cuda(), w.scale.cuda()) is None  # more than 16 tokens
