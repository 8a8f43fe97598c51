"""Numba fp8 expert kernels against a float64 reference at Kimi-K2 shapes, edge codes included."""

import os

import numpy as np
import pytest
import torch

from cpu_kernels import ExpertStack, reference_moe, routed_moe
from cpu_kernels import fp8_simd
from cpu_kernels.decode import moe_decode
from cpu_kernels.moe import DECODE_MAX_TOKENS, dequantize_np
from cpu_kernels.prefill import moe_prefill

TOL = 1e-5  # max |out - ref| / max |ref|
FAST_TOL = 1e-3  # the fast mode against its own rounding emulated in float64 (its cost vs exact: 2e-3 to 1e-2)
EDGE_CODES = np.array([0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x08, 0x7E, 0xFE, 0x77, 0xF7], np.uint8)  # 0, -0,
# subnormals (min/max, both signs), min normal, +-448, +-240


def make_stack(E: int, hidden: int, inter: int, seed: int) -> ExpertStack:
    rng = np.random.default_rng(seed)

    def codes(*shape):
        c = rng.integers(0, 256, size=shape, dtype=np.uint8)
        c[(c & 0x7F) == 0x7F] = 0x38  # no NaN codes in a checkpoint
        flat = c.reshape(-1)
        flat[rng.integers(0, flat.size, size=flat.size // 50)] = rng.choice(EDGE_CODES, size=flat.size // 50)
        c[:, 0, : len(EDGE_CODES)] = EDGE_CODES  # and a row that starts with every edge code
        return c.view(np.int8)

    def scales(rows, cols):
        return (rng.random((E, -(-rows // 128), -(-cols // 128))) * 2e-3 + 1e-5).astype(np.float32)

    return ExpertStack(codes(E, inter, hidden), scales(inter, hidden), codes(E, inter, hidden), scales(inter, hidden),
                       codes(E, hidden, inter), scales(hidden, inter))  # fmt: skip


def route(T: int, E: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int64)
    return ids, rng.random((T, k)).astype(np.float32) * 2


def relative_error(out, ref) -> float:
    assert np.isfinite(out).all(), "kernel left unwritten (poisoned) outputs"
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def k2_stack():
    return make_stack(E=10, hidden=7168, inter=2048, seed=0)


@pytest.mark.parametrize("T", [1, 3, 6, 83, 128])  # 6: grouped GEMM with 1-2 tokens per expert (streamed rows)
def test_routed_moe_at_k2_shapes(k2_stack, T):
    rng = np.random.default_rng(T)
    k = 2 if T == 6 else int(rng.integers(2, 9))
    ids, w = route(T, k2_stack.num_experts, k, seed=T)
    x = rng.standard_normal((T, 7168)).astype(np.float32)
    out = np.full_like(x, np.nan)
    routed_moe(x, ids, w, k2_stack, out)
    assert relative_error(out, reference_moe(x, ids, w, k2_stack)) <= TOL


def moe_decode_table(x, ids, w, *arrays):
    """The SIMD decode kernel, exact path (fp8_simd.py: AVX-512 table conversion, or AVX2 placement on AMD)."""
    fp8_simd.moe_decode_simd(x, ids, w, *arrays, False)


KERNELS = [moe_decode, moe_prefill] + ([moe_decode_table] if fp8_simd.SIMD else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hidden, inter", [(200, 72), (256, 96), (300, 136)])
def test_every_kernel_on_partial_blocks(kernel, hidden, inter):
    """Widths that are not multiples of 128 (or of 8 rows) through both kernels, whatever the token count."""
    stack = make_stack(E=6, hidden=hidden, inter=inter, seed=hidden)
    for T in (1, 2, 7, 13):
        ids, w = route(T, 6, 3, seed=T)
        x = np.random.default_rng(T).standard_normal((T, hidden)).astype(np.float32)
        out = np.full_like(x, np.nan)
        kernel(x, ids, w, stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down, stack.down_s, out)
        assert relative_error(out, reference_moe(x, ids, w, stack)) <= TOL


def test_simd_kernel_is_the_one_this_cpu_gets():
    """AVX-512 (VBMI, BF16) -> the table kernel; AVX2 + FMA on AMD Zen -> the placement kernel; else generic."""
    from cpu_kernels import simd_ir

    feats = set(simd_ir.cpu_features())
    avx512 = {"+avx512f", "+avx512bw", "+avx512vbmi", "+avx512bf16"} <= feats
    avx2 = {"+avx2", "+fma"} <= feats and simd_ir.cpu_name().startswith("znver")
    expected = "avx512" if avx512 else "avx2" if avx2 else None
    if os.environ.get("HYBRID_FP8_SIMD") == "0":
        expected = None
    assert fp8_simd.ISA == expected and fp8_simd.SIMD == (expected is not None)


@pytest.mark.parametrize("x_scale, s_in, s_down", [(1e6, 1e3, 1e-18), (1e-7, 1e-5, 1e6), (1.0, 1e-3, 1e-3)])
def test_decode_stays_exact_for_extreme_activations_and_scales(x_scale, s_in, s_down):
    """Activations times scales from ~2^-40 to ~2^30 (gate/up, then down): the AVX2 kernel carries a 2^60 factor in
    the scaled activations (finite up to |x s| = 2^68, normal products down to 2^-51); all paths stay within TOL."""
    stack = make_stack(E=4, hidden=384, inter=256, seed=8)
    for name, scale in (("gate_s", s_in), ("up_s", s_in), ("down_s", s_down)):
        setattr(stack, name, (getattr(stack, name) / 1e-3 * scale).astype(np.float32))
    for T in (1, 2):
        ids, w = route(T, 4, 2, seed=T)
        x = (np.random.default_rng(T).standard_normal((T, 384)) * x_scale).astype(np.float32)
        out = np.full_like(x, np.nan)
        routed_moe(x, ids, w, stack, out)
        assert relative_error(out, reference_moe(x, ids, w, stack)) <= TOL


def test_dispatch_boundary_gives_the_same_numbers():
    stack = make_stack(E=5, hidden=256, inter=128, seed=3)
    T = DECODE_MAX_TOKENS + 1
    ids, w = route(T, 5, 2, seed=1)
    x = np.random.default_rng(2).standard_normal((T, 256)).astype(np.float32)
    a, b = np.full_like(x, np.nan), np.full_like(x, np.nan)
    moe_decode(x, ids, w, stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down, stack.down_s, a)
    routed_moe(x, ids, w, stack, b)  # takes the grouped GEMM
    assert relative_error(a, b) <= TOL


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), as float64."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).bfloat16().double().numpy()


def reference_moe_fast(x, ids, weights, stack) -> np.ndarray:
    """The fast mode's arithmetic in float64: each 128-row block multiplies bf16(activations * its column scales)
    (full 64-column chunks; a partial last chunk stays fp32)."""
    from cpu_kernels.moe import _E4M3_TABLE

    def gemv(q, s, v):
        K, kf = q.shape[1], q.shape[1] // 64 * 64
        out = np.empty(q.shape[0])
        for rb in range(s.shape[0]):
            xs = (v.astype(np.float32) * np.repeat(s[rb], 128)[:K]).astype(np.float32)
            xs = np.concatenate([bf16(xs[:kf]), xs[kf:].astype(np.float64)])
            out[128 * rb : 128 * rb + 128] = _E4M3_TABLE[q[128 * rb : 128 * rb + 128].view(np.uint8)] @ xs
        return out

    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for k, e in enumerate(ids[t]):
            g, u = gemv(stack.gate[e], stack.gate_s[e], x[t]), gemv(stack.up[e], stack.up_s[e], x[t])
            h = (g / (1 + np.exp(-g)) * u).astype(np.float32)
            out[t] += weights[t, k] * gemv(stack.down[e], stack.down_s[e], h)
    return out


@pytest.mark.skipif(not fp8_simd.FAST, reason="the fast mode needs AVX-512 BF16 and VBMI")
@pytest.mark.parametrize("hidden, inter", [(7168, 256), (300, 136)])
def test_fast_mode_rounds_activations_to_bf16_and_nothing_else(hidden, inter):
    """Against the same rounding done in float64 (FAST_TOL: an h computed in fp32 can round to the other bf16
    neighbour); against the exact reference its cost, which must be there (or the flag did not reach the kernel)
    and stay below 1e-2."""
    stack = make_stack(E=4, hidden=hidden, inter=inter, seed=5)
    for T in (1, 3):
        ids, w = route(T, 4, 2, seed=T)
        x = np.random.default_rng(T).standard_normal((T, hidden)).astype(np.float32)
        out = np.full_like(x, np.nan)
        routed_moe(x, ids, w, stack, out, fast=True)
        assert relative_error(out, reference_moe_fast(x, ids, w, stack)) <= FAST_TOL
        assert 1e-4 < relative_error(out, reference_moe(x, ids, w, stack)) < 1e-2


def test_reference_dequantization_matches_torch():
    stack = make_stack(E=1, hidden=300, inter=136, seed=9)
    q = torch.from_numpy(stack.gate[0].view(np.uint8).copy()).view(torch.float8_e4m3fn)
    s = torch.from_numpy(stack.gate_s[0])
    expected = q.double() * s.double().repeat_interleave(128, 0)[:136].repeat_interleave(128, 1)[:, :300]
    np.testing.assert_array_equal(dequantize_np(stack.gate[0], stack.gate_s[0]), expected.numpy())


def test_input_checks_refuse_bad_arguments():
    stack = make_stack(E=3, hidden=256, inter=128, seed=4)
    x = np.zeros((2, 256), np.float32)
    ids = np.zeros((2, 2), np.int64)
    w = np.ones((2, 2), np.float32)
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="x: expected"):
        routed_moe(x.astype(np.float64), ids, w, stack, out)
    with pytest.raises(ValueError, match="x: expected"):
        routed_moe(np.zeros((2, 512), np.float32)[:, ::2], ids, w, stack, out)
    with pytest.raises(ValueError, match="ids: expected"):
        routed_moe(x, ids.astype(np.int32), w, stack, out)
    with pytest.raises(ValueError, match="out of range"):
        routed_moe(x, ids + 3, w, stack, out)
    with pytest.raises(ValueError, match="weights: expected"):
        routed_moe(x, ids, w[:, :1], stack, out)
    with pytest.raises(ValueError, match="gate_s: expected"):
        ExpertStack(stack.gate, stack.gate_s[:, :, :1].copy(), stack.up, stack.up_s, stack.down, stack.down_s)


def test_whole_weight_dequantization_is_exact_with_partial_blocks():
    from cpu_kernels.dequant import dequantize_into

    stack = make_stack(E=1, hidden=300, inter=200, seed=9)  # 300 = 2 full blocks + 44, 200 = 1 + 72
    for q, s in ((stack.gate[0], stack.gate_s[0]), (stack.down[0], stack.down_s[0])):
        out = np.full(q.shape, np.nan, np.float32)
        dequantize_into(q, s, out)
        assert np.array_equal(out.astype(np.float64), dequantize_np(q, s).astype(np.float32).astype(np.float64))
    with pytest.raises(ValueError, match="float32"):
        dequantize_into(stack.gate[0], stack.gate_s[0][:1], np.empty(stack.gate.shape[1:], np.float32))


@pytest.mark.parametrize("T", [1, 3])
def test_fp8_linear_matches_the_float64_reference(k2_stack, T):
    from cpu_kernels.linear import fp8_linear

    x = np.random.default_rng(T).standard_normal((T, 2048)).astype(np.float32)
    for W, S in ((k2_stack.down[1], k2_stack.down_s[1]), (k2_stack.gate[2][:1000, :300], None)):
        if S is None:  # a partial-block shape: 1000 x 300 with its own scales
            W = np.ascontiguousarray(W)
            S = np.random.default_rng(0).random((8, 3)).astype(np.float32) * 1e-3
            x = x[:, :300].copy()
        out = np.full((T, W.shape[0]), np.nan, np.float32)
        fp8_linear(x, W, S, out)
        assert relative_error(out, x.astype(np.float64) @ dequantize_np(W, S).T) <= TOL


def test_bf16_linear_is_exact_conversion_with_fp32_accumulation():
    from cpu_kernels.linear import bf16_linear

    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.standard_normal((1000, 300)).astype(np.float32)).bfloat16()
    w[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -3e30])  # zero, -0, a bf16 subnormal, a large value
    x = rng.standard_normal((2, 300)).astype(np.float32)
    out = np.full((2, 1000), np.nan, np.float32)
    bf16_linear(x, w.view(torch.int16).numpy(), out)
    assert relative_error(out, x.astype(np.float64) @ w.double().numpy().T) <= TOL


@pytest.mark.parametrize("T", [1, 3, 40])  # decode kernel, and the grouped GEMM
def test_assignments_marked_minus_one_are_skipped(T):
    stack = make_stack(E=12, hidden=384, inter=256, seed=4)
    ids, weights = route(T, 12, 4, seed=T)
    ids[np.random.default_rng(T).random(ids.shape) < 0.3] = -1
    ids[0] = -1  # a token with nothing to do here gets zeros
    x = np.random.default_rng(0).standard_normal((T, 384)).astype(np.float32)
    out = np.full_like(x, np.nan)
    routed_moe(x, ids, weights, stack, out)
    ref = reference_moe(x, ids, weights, stack)
    assert np.array_equal(out[0], np.zeros(384, np.float32))
    if T > 1:
        assert relative_error(out[1:], ref[1:]) <= TOL
    with pytest.raises(ValueError, match="out of range"):
        routed_moe(x, np.full_like(ids, -2), weights, stack, out)


def test_mla_absorbed_products_match_float64_at_k2_shapes():
    from cpu_kernels.mla import absorb_query, absorb_value

    H, dn, dv, C = 64, 128, 128, 512  # Kimi-K2: kv_b is [64 * 256, 512]
    stack = make_stack(E=1, hidden=C, inter=H * (dn + dv), seed=11)  # gate: [16384, 512] with edge codes
    W, S = stack.gate[0], stack.gate_s[0]
    w = dequantize_np(W, S).reshape(H, dn + dv, C)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((H, dn)).astype(np.float32)
    ctx = rng.standard_normal((H, C)).astype(np.float32)
    assert relative_error(absorb_query(q, W, S, dv), np.einsum("hd,hdc->hc", q, w[:, :dn])) <= TOL
    assert relative_error(absorb_value(ctx, W, S, dn), np.einsum("hc,hvc->hv", ctx, w[:, dn:])) <= TOL
    with pytest.raises(ValueError, match="kv_b"):
        absorb_query(q[:, :100], W, S, dv)
