"""The Triton kernels (cuda/*.py via hybrid.gpu_kernels) against float64 references: on a GPU when there is one,
else on CPU tensors through Triton's interpreter, with the block sizes the GPU uses. Outputs are poisoned with NaN
first, so an element a kernel forgets to write fails the test. Tolerance: max |ours - ref| / max |ref| <= 1e-4
(fp32 accumulation measures ~5e-7; tf32 without the 3-pass split would be ~1e-3); int4_linear and bf16_linear
<= 1e-5 (their weights are exact in tf32, so tf32x3 leaves only fp32 accumulation: ~2e-7 measured under the
interpreter)."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import relative_error as conftest_relative_error

from cpu_kernels.int4 import dequantize_int4, pack_int4
from hybrid import gpu_kernels as gk
from hybrid.fp8 import Fp8Weight, dequantize, quantize
from hybrid.model import absorb_query, absorb_value

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
HW_FP8_OK = DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
BOTH_PATHS = [pytest.param(True, marks=pytest.mark.skipif(not HW_FP8_OK, reason="fp8 cvt needs sm_89+")), False]
FINITE = [c for c in range(256) if c & 0x7F != 0x7F]  # the 254 finite e4m3 codes (0x7F, 0xFF are NaN)
# (out, in) of K2's decode linears: q_a, q_b, kv_a, kv_b, o, shared/dense gate-up, down
K2_SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512),
             "o": (7168, 8192), "gate_up": (2048, 7168), "down": (7168, 2048)}  # fmt: skip
# The interpreter costs ~1 ms per 64x128 weight tile: on CPU six shapes keep K2's input width (the K loop, the
# split-K choice) with fewer output rows; kv_a (576 rows, split-K over 7168 columns) stays whole.
INTERPRETER_ROWS = {"q_a": 384, "q_b": 1024, "kv_b": 2048, "o": 256, "gate_up": 256, "down": 512}
INT4_TOL = BF16_TOL = 1e-5


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return conftest_relative_error(ours.cpu(), ref.cpu())


def dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


@functools.cache
def k2_weight(name: str) -> Fp8Weight:
    n, k = K2_SHAPES[name]
    n = n if DEVICE == "cuda" else INTERPRETER_ROWS.get(name, n)
    return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / k**0.5)


@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("name", list(K2_SHAPES))
def test_fp8_linear_k2_shapes(name, M):
    """K2's decode linears; under the interpreter with the output rows of INTERPRETER_ROWS (full width in K)."""
    w = k2_weight(name)
    x = torch.randn(M, w.q.shape[1], generator=torch.Generator().manual_seed(M))
    out = torch.full((M, w.q.shape[0]), float("nan"), device=DEVICE)
    y = gk.fp8_linear(*dev(x, w.q, w.scale), out=out)
    assert y is out and torch.isfinite(out).all()
    assert relative_error(out, gk.fp8_linear_reference(x, w.q, w.scale, torch.float64)) <= TOL


def code_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite code over and over, and block scales with 3 significant bits: products exact in fp32."""
    g = torch.Generator().manual_seed(0)
    index = (torch.arange(n)[:, None] * 17 + torch.arange(k)[None, :]) % len(FINITE)  # each row and column: all
    q = torch.tensor(FINITE, dtype=torch.uint8)[index]
    grid = ((n + 127) // 128, (k + 127) // 128)
    scale = torch.randint(8, 16, grid, generator=g) / 8 * 2.0 ** torch.randint(-6, 6, grid, generator=g)
    return q.view(torch.float8_e4m3fn), scale.float()


@pytest.mark.parametrize("hw_fp8", BOTH_PATHS)
def test_every_finite_code_converts_exactly(hw_fp8):
    """One-hot activations pick single weights, so each code and scale must come out bit for bit."""
    n, k = 300, 300  # 3 x 3 scale blocks, the last ones partial
    q, scale = code_weight(n, k)
    w = dequantize(q, scale)
    cols = torch.arange(16) * 18 + 5  # 16 one-hot rows across all three column blocks
    assert set(q.view(torch.uint8)[:, cols].flatten().tolist()) == set(FINITE)
    x = torch.zeros(16, k)
    x[torch.arange(16), cols] = 1.0
    y = gk.fp8_linear(*dev(x, q, scale), hw_fp8=hw_fp8)
    assert torch.equal(y.cpu(), w[:, cols].T)
    # the transposed product: group g picks row g * 18 + 5 + g
    rows = torch.arange(16) * 19 + 5
    assert set(q.view(torch.uint8)[rows].flatten().tolist()) == set(FINITE)
    x = torch.eye(16)
    y = gk.fp8_linear_grouped_t(*dev(x, q, scale), row_stride=18, row_offset=5, hw_fp8=hw_fp8)
    assert torch.equal(y.cpu(), w[rows])


@pytest.mark.parametrize("hw_fp8", BOTH_PATHS)
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("n, k, split_k", [(300, 200, None), (5, 7, None), (130, 1000, 3)])
def test_fp8_linear_partial_blocks(n, k, split_k, M, hw_fp8):
    w = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
    x = torch.randn(M, k)
    out = torch.full((M, n), float("nan"), device=DEVICE)
    gk.fp8_linear(*dev(x, w.q, w.scale), out=out, hw_fp8=hw_fp8, split_k=split_k)
    assert torch.isfinite(out).all()
    assert relative_error(out, gk.fp8_linear_reference(x, w.q, w.scale, torch.float64)) <= TOL


@pytest.mark.parametrize("hw_fp8", BOTH_PATHS)
def test_grouped_forms_with_unaligned_groups(hw_fp8):
    """Group g's weight rows start at g * row_stride + row_offset, off the 128-row scale grid."""
    G, stride, offset, K = 5, 100, 37, 300
    w = quantize(torch.randn(G * stride, K, generator=torch.Generator().manual_seed(1)))
    W = dequantize(w.q, w.scale).double()
    x = torch.randn(G, 3, K)
    out = torch.full((G, 3, 50), float("nan"), device=DEVICE)
    gk.fp8_linear_grouped(*dev(x, w.q, w.scale), 50, stride, offset, out, hw_fp8=hw_fp8)
    ref = torch.stack([x[g].double() @ W[g * stride + offset:][:50].T for g in range(G)])
    assert torch.isfinite(out).all() and relative_error(out, ref) <= TOL

    xt = torch.randn(G, 40)  # 40 rows: a ragged last row tile
    y = gk.fp8_linear_grouped_t(*dev(xt, w.q, w.scale), stride, offset, hw_fp8=hw_fp8)
    ref = torch.stack([xt[g].double() @ W[g * stride + offset:][:40] for g in range(G)])
    assert relative_error(y, ref) <= TOL


def int4_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform codes -8..7 (half the words negative int32) and bf16 scales near K2's: (packed, scale) on the host."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // 32, generator=g) + 0.5) / (8 * k**0.5)
    return torch.from_numpy(pack_int4(q.numpy())), scale.bfloat16()


def int4_dense(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weights by cpu_kernels/int4.py's numpy dequantizer (exact in float32), as float64."""
    return torch.from_numpy(dequantize_int4(packed, scale)).double()


@functools.cache
def int4_k2_weight(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = K2_SHAPES[name]
    return int4_weight(n if DEVICE == "cuda" else INTERPRETER_ROWS[name], k, seed=n + k)


@pytest.mark.parametrize("M", [1, 3, 16, 83])
@pytest.mark.parametrize("name", ["gate_up", "down"])
def test_int4_linear_k2_shapes(name, M):
    """A routed expert's linears (the decode tile up to 16 rows, prefill tiles beyond), split-K by default; under the
    interpreter with the output rows of INTERPRETER_ROWS (full width in K)."""
    packed, scale = int4_k2_weight(name)
    x = torch.randn(M, packed.shape[1] * 8, generator=torch.Generator().manual_seed(M))
    out = torch.full((M, packed.shape[0]), float("nan"), device=DEVICE)
    y = gk.int4_linear(*dev(x, packed, scale), out=out)
    assert y is out and torch.isfinite(out).all()
    assert relative_error(out, x.double() @ int4_dense(packed, scale).T) <= INT4_TOL


@pytest.mark.parametrize("M", [16, 83])
def test_int4_every_code_and_sign_converts_exactly(M):
    """One-hot activations pick single weights: every code -8..7 (in words of both signs, under scales of both
    signs) in every scale group must come out bit for bit, through the decode tile (M=16) and the prefill tiles."""
    n, k = 80, 288  # two decode row tiles (the last partial), 9 scale groups, a ragged last decode K tile
    codes = ((torch.arange(n)[:, None] * 5 + torch.arange(k)[None, :]) % 16 - 8).to(torch.int8)
    g = torch.Generator().manual_seed(3)
    scale = (torch.randn(n, k // 32, generator=g) * 2.0 ** torch.randint(-12, 6, (n, k // 32), generator=g))
    packed, scale = torch.from_numpy(pack_int4(codes.numpy())), scale.bfloat16()
    assert (packed < 0).any() and (packed >= 0).any() and (scale < 0).any()  # top nibble >= 8: a negative int32
    cols = (torch.arange(M) * 37 + 5) % k
    assert set(codes[:, cols].flatten().tolist()) == set(range(-8, 8))
    assert set((cols // 32).tolist()) == set(range(k // 32))
    x = torch.zeros(M, k)
    x[torch.arange(M), cols] = 1.0
    want = torch.from_numpy(dequantize_int4(packed, scale))[:, cols].T
    assert torch.equal(gk.int4_linear(*dev(x, packed, scale)).cpu(), want)
    assert torch.equal(gk.int4_linear_reference(*dev(x, packed, scale)).cpu(), want)


@pytest.mark.parametrize("n, k, M, split_k", [(5, 32, 1, None), (100, 160, 3, None), (70, 2080, 16, 5),
                                              (130, 1056, 20, 3)])  # fmt: skip
def test_int4_linear_partial_tiles(n, k, M, split_k):
    """Ragged rows, columns and K tiles, forced splits; `out` a strided view whose other columns stay untouched."""
    packed, scale = int4_weight(n, k, seed=n)
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(k))
    buf = torch.full((M, n + 3), float("nan"), device=DEVICE)
    gk.int4_linear(*dev(x, packed, scale), out=buf[:, :n], split_k=split_k)
    assert torch.isfinite(buf[:, :n]).all() and torch.isnan(buf[:, n:]).all()
    assert relative_error(buf[:, :n], x.double() @ int4_dense(packed, scale).T) <= INT4_TOL


def test_int4_linear_and_its_reference_on_the_device(gpu):
    """Kernel and torch reference on the device's own tensors (CUDA, or the stand-in's, which refuse host mixing)."""
    packed, scale = int4_weight(96, 256, seed=5)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    args = [gpu.to(t) for t in (x, packed, scale)]
    y, ref = gk.int4_linear(*args), gk.int4_linear_reference(*args)
    assert y.device == args[0].device and ref.device == args[0].device
    golden = x.double() @ int4_dense(packed, scale).T
    assert relative_error(y, golden) <= INT4_TOL and relative_error(ref, golden) <= INT4_TOL
    assert relative_error(gk.int4_linear_reference(*args, dtype=torch.float64), golden) <= 1e-12


@functools.cache
def bf16_k2_weight(name: str) -> torch.Tensor:
    """A K2-Thinking / K2.5 non-expert linear: plain bf16 [N, K], K2's scale of values."""
    n, k = K2_SHAPES[name]
    n = n if DEVICE == "cuda" else INTERPRETER_ROWS.get(name, n)
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / k**0.5).bfloat16()


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("name", list(K2_SHAPES))
def test_bf16_linear_k2_shapes(name, M):
    """K2's decode linears with bf16 weights (split-K by default); under the interpreter with the output rows of
    INTERPRETER_ROWS (full width in K)."""
    w = bf16_k2_weight(name)
    x = torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M))
    out = torch.full((M, w.shape[0]), float("nan"), device=DEVICE)
    y = gk.bf16_linear(*dev(x, w), out=out)
    assert y is out and torch.isfinite(out).all()
    assert relative_error(out, x.double() @ w.double().T) <= BF16_TOL


def bf16_values(n: int, k: int) -> torch.Tensor:
    """Normal bf16 numbers of both signs, every mantissa pattern, exponents 2^-60..2^60: [n, k]."""
    g = torch.Generator().manual_seed(4)
    mantissa = (torch.arange(n)[:, None] * 13 + torch.arange(k)[None, :]) % 128
    exponent = torch.randint(127 - 60, 127 + 61, (n, k), generator=g)
    sign = torch.randint(0, 2, (n, k), generator=g)
    return ((sign << 15) | (exponent << 7) | mantissa).to(torch.int16).view(torch.bfloat16)


def test_every_bf16_weight_converts_exactly():
    """One-hot activations pick single weights: each bf16 value must come out bit for bit, through the linear
    kernel (ragged row and K tiles) and the transposed one (MLA's absorption of q_nope)."""
    n, k = 150, 200
    w = bf16_values(n, k)
    cols = torch.arange(16) * 12 + 5
    assert set((w.view(torch.int16)[:, cols] & 0x7F).flatten().tolist()) == set(range(128))  # every mantissa
    x = torch.zeros(16, k)
    x[torch.arange(16), cols] = 1.0
    assert torch.equal(gk.bf16_linear(*dev(x, w)).cpu(), w[:, cols].T.float())
    rows = torch.arange(16) * 9 + 5  # group g picks row g * 8 + 5 + g
    y = gk.fp8_linear_grouped_t(*dev(torch.eye(16), w), None, row_stride=8, row_offset=5)
    assert torch.equal(y.cpu(), w[rows].float())


@pytest.mark.parametrize("n, k, M, split_k", [(5, 7, 1, None), (300, 200, 3, None), (130, 1000, 16, 3),
                                              (70, 2080, 16, 40)])  # fmt: skip
def test_bf16_linear_partial_tiles(n, k, M, split_k):
    """Ragged rows, columns and K tiles, forced splits (more than the K tiles: no empty split); `out` a strided view
    whose other columns stay untouched."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)).bfloat16()
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(k))
    buf = torch.full((M, n + 3), float("nan"), device=DEVICE)
    gk.bf16_linear(*dev(x, w), out=buf[:, :n], split_k=split_k)
    assert torch.isfinite(buf[:, :n]).all() and torch.isnan(buf[:, n:]).all()
    assert relative_error(buf[:, :n], gk.bf16_linear_reference(x, w, torch.float64)) <= BF16_TOL


def test_bf16_grouped_forms_with_unaligned_groups():
    """scale=None: the grouped forms MLA uses read a bf16 weight, group g's rows from g * row_stride + row_offset."""
    G, stride, offset, K = 5, 100, 37, 300
    w = torch.randn(G * stride, K, generator=torch.Generator().manual_seed(1)).bfloat16()
    W = w.double()
    x = torch.randn(G, 3, K)
    out = torch.full((G, 3, 50), float("nan"), device=DEVICE)
    gk.fp8_linear_grouped(*dev(x, w), None, 50, stride, offset, out)
    ref = torch.stack([x[g].double() @ W[g * stride + offset:][:50].T for g in range(G)])
    assert torch.isfinite(out).all() and relative_error(out, ref) <= BF16_TOL
    xt = torch.randn(G, 40)  # 40 rows: a ragged last row tile
    y = gk.fp8_linear_grouped_t(*dev(xt, w), None, stride, offset)
    ref = torch.stack([xt[g].double() @ W[g * stride + offset:][:40] for g in range(G)])
    assert relative_error(y, ref) <= BF16_TOL


def test_bf16_linear_and_its_reference_on_the_device(gpu):
    """Kernel and torch reference on the device's own tensors (CUDA, or the stand-in's, which refuse host mixing)."""
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(6))
    args = [gpu.to(t) for t in (x, w)]
    y, ref = gk.bf16_linear(*args), gk.bf16_linear_reference(*args)
    assert y.device == args[0].device and ref.device == args[0].device
    golden = x.double() @ w.double().T
    assert relative_error(y, golden) <= BF16_TOL and relative_error(ref, golden) <= BF16_TOL


NH, DN, DR, DV, C = 64, 128, 64, 128, 512  # Kimi-K2's attention
SOFTMAX_SCALE = (0.1 * 1.0 * torch.log(torch.tensor(32.0)).item() + 1) ** 2 / (DN + DR) ** 0.5  # YaRN mscale^2


@pytest.fixture(scope="module")
def mla():
    g = torch.Generator().manual_seed(7)
    kv_b = quantize(torch.randn(NH * (DN + DV), C, generator=g) / C**0.5)
    c = torch.randn(1100, C, generator=g).bfloat16()
    pe = torch.randn(1100, DR, generator=g).bfloat16()
    return kv_b, c, pe, torch.randn(NH, DN, generator=g), torch.randn(NH, DR, generator=g)


@pytest.fixture(scope="module")
def mla_bf16(mla):
    """The same attention with a K2-Thinking / K2.5 kv_b: plain bf16 [nh * (dn + dv), C], no scale."""
    kv_b = torch.randn(NH * (DN + DV), C, generator=torch.Generator().manual_seed(8)) / C**0.5
    return (kv_b.bfloat16(), None), *mla[1:]


def run_mla(mla, length, split_tokens=None, hw_fp8=None):
    """The kernel with the cache past `length` poisoned (it must never be read), and the float64 reference."""
    kv_b, c, pe, q_nope, q_pe = mla
    kv_q, kv_scale = kv_b if isinstance(kv_b, tuple) else (kv_b.q, kv_b.scale)
    c, pe = c.clone(), pe.clone()
    c[length:], pe[length:] = float("nan"), float("nan")
    out = gk.mla_decode(*dev(q_nope, q_pe, kv_q), None if kv_scale is None else dev(kv_scale)[0], *dev(c, pe), length,
                        SOFTMAX_SCALE, DV, split_tokens, hw_fp8=hw_fp8)  # fmt: skip
    ref = gk.mla_decode_reference(q_nope, q_pe, kv_q, kv_scale, c, pe, length, SOFTMAX_SCALE, DV, torch.float64)
    assert out.shape == (NH, DV) and torch.isfinite(out).all()
    return out.cpu(), ref


@pytest.mark.parametrize("length, hw_fp8", [(1, None), (47, None), (49, False), (3 * 48 + 5, None)])
def test_mla_decode_across_split_boundaries(mla, length, hw_fp8):
    """48-token splits (tiles of 32 end inside them); length 49 also takes the sm_80 fp8 path."""
    out, ref = run_mla(mla, length, split_tokens=48, hw_fp8=hw_fp8)
    assert relative_error(out, ref) <= TOL


def test_mla_decode_matches_the_models_absorbed_path(mla):
    """A long context with the default split (4 x 256 tokens here) against float64 and model.py's T == 1 branch."""
    length = 1000
    assert gk.default_split_tokens(length, NH, torch.empty(0, device=DEVICE)) < length
    out, ref = run_mla(mla, length)
    assert relative_error(out, ref) <= TOL
    kv_b, c, pe, q_nope, q_pe = mla
    c, pe = c[:length].float(), pe[:length].float()  # Attention.__call__ with T == 1, on CPU fp32
    q_abs = absorb_query(q_nope, kv_b, DV)[None]
    scores = torch.einsum("thc,sc->hts", q_abs, c) + torch.einsum("thr,sr->hts", q_pe[None], pe)
    p = torch.softmax(scores * SOFTMAX_SCALE, dim=-1, dtype=torch.float32)
    model = absorb_value(torch.einsum("hts,sc->thc", p, c)[0], kv_b, DN)
    assert relative_error(out, model) <= TOL


@pytest.mark.parametrize("length, split_tokens", [(49, 48), (1000, None)])
def test_mla_decode_with_a_bf16_kv_b(mla_bf16, length, split_tokens):
    """kv_b_scale=None: the absorption and the value half read the bf16 kv_b itself; 48-token splits across a
    boundary, and the default split of a long context."""
    out, ref = run_mla(mla_bf16, length, split_tokens)
    assert relative_error(out, ref) <= TOL


def _bad_calls():
    w = quantize(torch.randn(256, 256))
    q, s, x = w.q, w.scale, torch.randn(2, 256)
    kv = quantize(torch.randn(2 * (4 + 4), 32))
    qn, qp, c, pe = torch.randn(2, 4), torch.randn(2, 16), torch.randn(10, 32), torch.randn(10, 16)
    mla = (qn, qp, kv.q, kv.scale, c, pe)
    p4, s4 = int4_weight(64, 256)
    p4_t = torch.empty(32, 64, dtype=torch.int32).T  # the right shape, not contiguous
    wb, kvb = torch.randn(256, 256).bfloat16(), torch.randn(2 * (4 + 4), 32).bfloat16()
    mla16 = (qn, qp, kvb, None, c, pe)
    return [
        ("x", lambda: gk.bf16_linear(x.double(), wb)),
        ("x", lambda: gk.bf16_linear(torch.randn(17, 256), wb)),
        ("x", lambda: gk.bf16_linear(x[:0], wb)),
        ("w", lambda: gk.bf16_linear(x, wb.float())),
        ("w", lambda: gk.bf16_linear(x, q)),
        ("w", lambda: gk.bf16_linear(x, wb[0])),
        ("w", lambda: gk.bf16_linear(torch.randn(2, 128), wb)),
        ("w", lambda: gk.bf16_linear(x, wb.T)),
        ("w", lambda: gk.bf16_linear(x, wb.to("meta"))),
        ("out", lambda: gk.bf16_linear(x, wb, out=torch.empty(2, 255))),
        ("out", lambda: gk.bf16_linear(x, wb, out=torch.empty(2, 256, dtype=torch.bfloat16))),
        ("split_k", lambda: gk.bf16_linear(x, wb, split_k=0)),
        ("scale", lambda: gk.fp8_linear(x, q, None)),
        ("q", lambda: gk.fp8_linear_grouped_t(torch.randn(2, 200), wb, None, 100)),
        ("kv_b_q", lambda: gk.mla_decode(*mla[:2], kv.q, None, c, pe, 5, 1.0, 4)),
        ("kv_b_q", lambda: gk.mla_decode(*mla[:2], kvb.float(), None, c, pe, 5, 1.0, 4)),
        ("kv_b_q", lambda: gk.mla_decode(*mla16, 5, 1.0, 3)),
        ("kv_b_q", lambda: gk.mla_decode(*mla[:2], kvb.to("meta"), None, c, pe, 5, 1.0, 4)),
        ("length", lambda: gk.mla_decode(*mla16, 11, 1.0, 4)),
        ("x", lambda: gk.int4_linear(x.double(), p4, s4)),
        ("x", lambda: gk.int4_linear(x[:0], p4, s4)),
        ("x", lambda: gk.int4_linear(torch.randn(2, 264), p4, s4)),
        ("packed", lambda: gk.int4_linear(torch.randn(2, 128), p4, s4)),
        ("packed", lambda: gk.int4_linear(x, p4.float(), s4)),
        ("packed", lambda: gk.int4_linear(x, p4_t, s4)),
        ("scale", lambda: gk.int4_linear(x, p4, s4.float())),
        ("scale", lambda: gk.int4_linear(x, p4, s4[:, :4])),
        ("scale", lambda: gk.int4_linear(x, p4, s4.to("meta"))),
        ("out", lambda: gk.int4_linear(x, p4, s4, out=torch.empty(2, 63))),
        ("split_k", lambda: gk.int4_linear(x, p4, s4, split_k=0)),
        ("x", lambda: gk.fp8_linear(x.double(), q, s)),
        ("x", lambda: gk.fp8_linear(torch.randn(17, 256), q, s)),
        ("x", lambda: gk.fp8_linear(torch.randn(2, 256)[:0], q, s)),
        ("q", lambda: gk.fp8_linear(x, q.float(), s)),
        ("q", lambda: gk.fp8_linear(torch.randn(2, 128), q, s)),
        ("q", lambda: gk.fp8_linear(x, q.T, s)),
        ("scale", lambda: gk.fp8_linear(x, q, s[:1])),
        ("scale", lambda: gk.fp8_linear(x, q, s.double())),
        ("scale", lambda: gk.fp8_linear(x, q, s.to("meta"))),
        ("out", lambda: gk.fp8_linear(x, q, s, out=torch.empty(2, 255))),
        ("out", lambda: gk.fp8_linear(x, q, s, out=torch.empty(2, 256, device="meta"))),
        ("q", lambda: gk.fp8_linear_grouped(x[None].expand(3, 2, 256), q, s, 100, 100)),
        ("q", lambda: gk.fp8_linear_grouped_t(torch.randn(2, 200), q, s, 100)),
        ("q_pe", lambda: gk.mla_decode(qn, qp[:1], *mla[2:], 5, 1.0, 4)),
        ("c", lambda: gk.mla_decode(*mla[:4], c.half(), pe, 5, 1.0, 4)),
        ("pe", lambda: gk.mla_decode(*mla[:5], pe.bfloat16(), 5, 1.0, 4)),
        ("pe", lambda: gk.mla_decode(*mla[:5], pe[:9], 5, 1.0, 4)),
        ("kv_b_q", lambda: gk.mla_decode(*mla, 5, 1.0, 3)),
        ("kv_b_scale", lambda: gk.mla_decode(*mla[:3], kv.scale[:, :0], c, pe, 5, 1.0, 4)),
        ("c", lambda: gk.mla_decode(*mla[:4], c.to("meta"), pe.to("meta"), 5, 1.0, 4)),
        ("length", lambda: gk.mla_decode(*mla, 11, 1.0, 4)),
        ("length", lambda: gk.mla_decode(*mla, 0, 1.0, 4)),
        ("split_tokens", lambda: gk.mla_decode(*mla, 5, 1.0, 4, 0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_input_checks_name_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=f"^{name}: "):
        call()


def test_standin_interprets_even_after_triton_was_imported_and_set_to_compile():
    """HYBRID_GPU_STANDIN=1 wins over an earlier `import triton` (whose own @jit helpers then cannot be called)."""
    code = ("import triton; triton.knobs.runtime.interpret = False\n"
            "import torch; from hybrid import gpu_kernels as gk; from hybrid.fp8 import quantize\n"
            "torch.manual_seed(0)\n"
            "w = quantize(torch.randn(4, 8)); x = torch.randn(1, 8)\n"
            "ref = gk.fp8_linear_reference(x, w.q, w.scale)\n"
            "assert torch.allclose(gk.fp8_linear(x, w.q, w.scale), ref, atol=1e-5)\n"
            "wb = torch.randn(4, 8).bfloat16()\n"
            "assert torch.allclose(gk.bf16_linear(x, wb), gk.bf16_linear_reference(x, wb), atol=1e-6)\n"
            "kv = quantize(torch.randn(2 * 32, 32)); c, pe = torch.randn(40, 32), torch.randn(40, 16)\n"
            "args = (torch.randn(2, 16), torch.randn(2, 16), kv.q, kv.scale, c, pe, 40, 0.2, 16)\n"
            "assert torch.allclose(gk.mla_decode(*args, 16), gk.mla_decode_reference(*args), atol=1e-5)\n"
            "p, s = torch.randint(-2**31, 2**31, (4, 8)).int(), torch.rand(4, 2).bfloat16(); x = torch.randn(2, 64)\n"
            "assert torch.allclose(gk.int4_linear(x, p, s), gk.int4_linear_reference(x, p, s), atol=1e-5)\n"
            "assert triton.knobs.runtime.interpret and not (gk.SOURCES / '__init__.py').exists()\n")  # fmt: skip
    env = {**os.environ, "HYBRID_GPU_STANDIN": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(DEVICE == "cuda", reason="plays an older GPU on the stand-in")
def test_a_gpu_without_fp8_conversion_gets_the_bit_path_and_refuses_the_hardware_one(monkeypatch):
    from hybrid.device import StandinDevice

    monkeypatch.setattr(StandinDevice, "compute_capability", (8, 6))  # an RTX 3090
    w = quantize(torch.randn(40, 256))
    x = torch.randn(3, 256)
    assert relative_error(gk.fp8_linear(x, w.q, w.scale), gk.fp8_linear_reference(x, w.q, w.scale, torch.float64)) <= TOL
    with pytest.raises(ValueError, match="^hw_fp8: .*no fp8 conversion instructions"):
        gk.fp8_linear(x, w.q, w.scale, hw_fp8=True)
