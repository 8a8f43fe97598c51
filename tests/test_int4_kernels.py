"""Numba native-INT4 expert kernels (Kimi-K2-Thinking / K2.5 format) against a float64 reference at K2 shapes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cpu_kernels.int4 import (Int4ExpertStack, dequantize_int4, pack_int4, reference_moe_int4, routed_moe_int4,
                              unpack_int4)  # fmt: skip
from cpu_kernels import int4_fast
from cpu_kernels.int4_simd import moe_decode_int4, moe_prefill_int4

TOL = 1e-5  # max |out - ref| / max |ref|
FAST_TOL = 1e-3  # the fast mode against its own rounding emulated in float64 (its cost vs exact: 2e-3 to 1e-2)


def make_stack(E: int, hidden: int, inter: int, seed: int) -> Int4ExpertStack:
    """Random codes (every code -8..7, and a row starting with all 16) and bf16 scales, via the int32 format."""
    rng = np.random.default_rng(seed)

    def proj(rows, cols):
        q = rng.integers(-8, 8, size=(E, rows, cols), dtype=np.int8)
        q[:, 0, :16] = np.arange(-8, 8)
        q[:, 1, :8] = -8  # an all -8 word: 0x00000000; and one of all 7 (0xFFFFFFFF, int32 -1)
        q[:, 1, 8:16] = 7
        scale = torch.from_numpy(np.exp(rng.standard_normal((E, rows, cols // 32))) * 0.02).bfloat16()
        return pack_int4(q), scale

    return Int4ExpertStack.from_packed(proj(inter, hidden), proj(inter, hidden), proj(hidden, inter))


def route(T: int, E: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int64)
    return ids, rng.random((T, k)).astype(np.float32) * 2


def relative_error(out, ref) -> float:
    assert np.isfinite(out).all(), "kernel left unwritten (poisoned) outputs"
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_pack_unpack_round_trip_every_code():
    q = np.tile(np.arange(-8, 8, dtype=np.int8), (3, 4))  # [3, 64]: every code, in every nibble position
    q[1] = np.roll(q[1], 5)
    q[2, :8] = 7  # high nibble 0xF everywhere: the word is 0xFFFFFFFF = int32 -1
    packed = pack_int4(q)
    assert packed.dtype == np.int32 and packed.shape == (3, 8)
    assert packed[2, 0] == -1 and (packed < 0).any()
    assert np.array_equal(unpack_int4(packed), q)
    # hand-packed words: element k in bits 4k (offset binary), lowest nibble first
    assert pack_int4(np.array([[-8, -7, -6, -5, -4, -3, -2, -1]], np.int8))[0, 0] == 0x76543210
    assert pack_int4(np.array([[0, 1, 2, 3, 4, 5, 6, 7]], np.int8)).view(np.uint32)[0, 0] == 0xFEDCBA98
    words = np.array([[np.uint32(0x89ABCDEF).view(np.int32), 0x01234567]], np.int32)  # a negative int32 word
    assert np.array_equal(unpack_int4(words)[0], [7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8])
    with pytest.raises(ValueError):
        pack_int4(np.array([[8, 0, 0, 0, 0, 0, 0, 0]]))


def test_dequantization_hand_computed():
    q = np.zeros((2, 64), np.int8)
    q[0, 0], q[0, 31], q[0, 32], q[1, 63] = -8, 7, 3, -1
    scale = torch.tensor([[0.5, 0.375], [1.0, -2.5]], dtype=torch.bfloat16)  # exact bf16 values
    w = dequantize_int4(pack_int4(q), scale)
    assert w.dtype == np.float32 and w.shape == (2, 64)
    expected = np.zeros((2, 64), np.float32)
    expected[0, 0], expected[0, 31], expected[0, 32], expected[1, 63] = -4.0, 3.5, 1.125, 2.5
    assert np.array_equal(w, expected)
    # the stack's uint8 byte view: byte j = element 2j (low nibble) | element 2j+1 (high nibble)
    stack = make_stack(1, 64, 32, seed=0)
    b = stack.gate[0, 0]
    assert b[0] == 0x10 and b[7] == 0xFE  # row 0 starts -8, -7, ..., 7: nibbles 0, 1, ..., 15


@pytest.fixture(scope="module")
def k2_stack():
    stack = make_stack(E=5, hidden=7168, inter=2048, seed=0)
    for nibbles in (stack.gate[0, :64] & 15, stack.down[4, :64] >> 4):
        assert np.unique(nibbles).size == 16  # every nibble 0..15, i.e. every code -8..7, is in the weights
    return stack


@pytest.mark.parametrize("T", [1, 3, 83, 128])
def test_routed_moe_int4_at_k2_shapes(k2_stack, T):
    rng = np.random.default_rng(T)
    k = int(rng.integers(2, 5))
    ids, w = route(T, k2_stack.num_experts, k, seed=T)
    x = rng.standard_normal((T, 7168)).astype(np.float32)
    out = np.full_like(x, np.nan)
    routed_moe_int4(x, ids, w, k2_stack, out)
    assert relative_error(out, reference_moe_int4(x, ids, w, k2_stack)) <= TOL


@pytest.mark.parametrize("kernel", [moe_decode_int4, moe_prefill_int4])
def test_both_kernels_on_small_odd_shapes(kernel):
    """Row counts that are not multiples of 8 (decode) or 4 (prefill tiles); 1..13 tokens through both kernels."""
    stack = make_stack(E=6, hidden=224, inter=96, seed=2)
    for T in (1, 2, 7, 13):
        ids, w = route(T, 6, 3, seed=T)
        x = np.random.default_rng(T).standard_normal((T, 224)).astype(np.float32)
        out = np.full_like(x, np.nan)
        kernel(x, ids, w, stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down, stack.down_s, out)
        assert relative_error(out, reference_moe_int4(x, ids, w, stack)) <= TOL


@pytest.mark.parametrize("T", [1, 3, 40])
def test_assignments_marked_minus_one_are_skipped(T):
    stack = make_stack(E=8, hidden=256, inter=128, seed=4)
    ids, weights = route(T, 8, 4, seed=T)
    ids[np.random.default_rng(T).random(ids.shape) < 0.3] = -1
    ids[0] = -1  # a token with nothing to do here gets zeros
    x = np.random.default_rng(0).standard_normal((T, 256)).astype(np.float32)
    out = np.full_like(x, np.nan)
    routed_moe_int4(x, ids, weights, stack, out)
    assert np.array_equal(out[0], np.zeros(256, np.float32))
    if T > 1:
        assert relative_error(out[1:], reference_moe_int4(x, ids, weights, stack)[1:]) <= TOL


def test_stack_is_zero_copy_and_sized():
    q = np.random.default_rng(0).integers(-8, 8, size=(2, 64, 256), dtype=np.int8)
    packed, scale = pack_int4(q), torch.ones((2, 64, 8), dtype=torch.bfloat16)
    qd = np.random.default_rng(1).integers(-8, 8, size=(2, 256, 64), dtype=np.int8)
    down = (pack_int4(qd), torch.ones((2, 256, 2), dtype=torch.bfloat16))
    stack = Int4ExpertStack.from_packed((packed, scale), (packed, scale), down)
    assert np.shares_memory(stack.gate, packed) and stack.gate.shape == (2, 64, 128) and stack.gate.dtype == np.uint8
    assert stack.gate_s.dtype == np.uint16 and stack.hidden == 256 and stack.num_experts == 2
    assert stack.nbytes == 3 * (2 * 64 * 128 + 2 * 64 * 8 * 2) and stack.expert_bytes() == stack.nbytes // 2
    assert np.array_equal(unpack_int4(stack.gate[1].copy().view(np.int32)), q[1])


def test_input_checks_refuse_bad_arguments():
    stack = make_stack(E=3, hidden=256, inter=128, seed=4)
    x = np.zeros((2, 256), np.float32)
    ids = np.zeros((2, 2), np.int64)
    w = np.ones((2, 2), np.float32)
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="x: expected"):
        routed_moe_int4(x.astype(np.float64), ids, w, stack, out)
    with pytest.raises(ValueError, match="x: expected"):
        routed_moe_int4(np.zeros((2, 512), np.float32)[:, ::2], ids, w, stack, out)
    with pytest.raises(ValueError, match="ids: expected"):
        routed_moe_int4(x, ids.astype(np.int32), w, stack, out)
    with pytest.raises(ValueError, match="out of range"):
        routed_moe_int4(x, ids + 3, w, stack, out)
    with pytest.raises(ValueError, match="out of range"):
        routed_moe_int4(x, np.full_like(ids, -2), w, stack, out)
    with pytest.raises(ValueError, match="weights: expected"):
        routed_moe_int4(x, ids, w[:, :1], stack, out)
    with pytest.raises(ValueError, match="gate_s: expected"):
        Int4ExpertStack(stack.gate, stack.gate_s[:, :, :1].copy(), stack.up, stack.up_s, stack.down, stack.down_s)
    with pytest.raises(ValueError, match="down: expected"):
        Int4ExpertStack(stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down.view(np.int8), stack.down_s)
    with pytest.raises(ValueError, match="weight_scale"):
        Int4ExpertStack.from_packed((np.zeros((1, 32, 32), np.int32), torch.ones((1, 32, 8))), None, None)
    with pytest.raises(ValueError, match="weight_packed"):
        Int4ExpertStack.from_packed((np.zeros((1, 32, 32), np.int64), torch.ones((1, 32, 8))), None, None)


def quantized(v: np.ndarray) -> np.ndarray:
    """The fast mode's activations: int8 per 32-group with scale max|v| / 127 over the full 128-element chunks,
    the rest exact (float64)."""
    kf = v.shape[0] // 128 * 128
    g = v[:kf].astype(np.float32).reshape(-1, 32)
    s = (np.abs(g).max(1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(s == 0, np.float32(0), np.float32(1) / np.where(s == 0, 1, s)).astype(np.float32)
    q = np.round(g * inv).astype(np.float64) * s
    return np.concatenate([q.reshape(-1), v[kf:].astype(np.float64)])


def reference_moe_int4_fast(x, ids, weights, stack) -> np.ndarray:
    from cpu_kernels.int4 import _dequant64

    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for k, e in enumerate(ids[t]):
            xq = quantized(x[t])
            g, u = _dequant64(stack.gate[e], stack.gate_s[e]) @ xq, _dequant64(stack.up[e], stack.up_s[e]) @ xq
            h = (g / (1 + np.exp(-g)) * u).astype(np.float32)
            out[t] += weights[t, k] * (_dequant64(stack.down[e], stack.down_s[e]) @ quantized(h))
    return out


@pytest.mark.skipif(not int4_fast.FAST, reason="the INT4 fast mode needs AVX-512 VNNI or AVX2")
@pytest.mark.parametrize("hidden, inter", [(7168, 256), (224, 96)])  # 224: a partial last chunk, exact
def test_fast_mode_quantizes_activations_per_group_and_nothing_else(hidden, inter):
    """Against the same quantization done in float64 (FAST_TOL: an h computed in fp32 can round to the other
    int8 neighbour); against the exact reference its cost, which must be there and stay below 3e-2."""
    stack = make_stack(E=4, hidden=hidden, inter=inter, seed=7)
    for T in (1, 3):
        ids, w = route(T, 4, 2, seed=T)
        x = np.random.default_rng(T).standard_normal((T, hidden)).astype(np.float32)
        out = np.full_like(x, np.nan)
        routed_moe_int4(x, ids, w, stack, out, fast=True)
        assert relative_error(out, reference_moe_int4_fast(x, ids, w, stack)) <= FAST_TOL
        assert 1e-4 < relative_error(out, reference_moe_int4(x, ids, w, stack)) < 3e-2


# ---- the decode inner loop (int4_simd.gemv_simd: AVX-512 or AVX2), row by row --------------------------------


def _host_has(*features) -> bool:
    from cpu_kernels import simd_ir

    have = simd_ir.cpu_features()
    return all(f"+{f}" in have for f in features)


def test_decode_isa_is_picked_once_and_prefill_stays_put():
    """AVX2 + FMA without AVX-512F: the AVX2 decode path with the generic prefill; HYBRID_INT4_SIMD=0: generic."""
    from cpu_kernels import int4_simd

    if os.environ.get("HYBRID_INT4_SIMD") == "0":
        assert int4_simd.ISA is None and int4_simd.moe_decode_int4 is int4_simd._moe_decode_generic
    elif _host_has("avx512f"):
        assert int4_simd.ISA == "avx512" and int4_simd.moe_prefill_int4 is int4_simd._moe_prefill_simd
    elif _host_has("avx2", "fma"):
        assert int4_simd.ISA == "avx2" and int4_simd.CX == 144
        assert int4_simd.moe_decode_int4 is int4_simd._moe_decode_simd
        assert int4_simd.moe_prefill_int4 is int4_simd._moe_prefill_generic
    else:
        assert int4_simd.ISA is None
    code = "from cpu_kernels import int4_simd as m; print(m.ISA, m.moe_decode_int4.py_func.__name__)"
    env = {**os.environ, "HYBRID_INT4_SIMD": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "_moe_decode_generic"]


def _rows_case(rows: int, K: int, seed: int):
    """Codes with every nibble value in every nibble position of a word; bf16 scales from 2^-90 to 2^90 (and
    plain ones) mixed in each row; x with a wide range of magnitudes (all >= 2^-102: the AVX2 layout's 2^-24)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, size=(rows, K), dtype=np.int8)
    for p in range(8):  # row p % rows: words of code c at position p, c = -8..7
        q[p % rows, : 8 * (K // 8)].reshape(-1, 8)[: 16, p] = np.arange(-8, 8)[: K // 8]
    e = rng.integers(-90, 91, size=(rows, K // 32))
    e[::3] = rng.integers(-8, 1, size=e[::3].shape)  # some rows with ordinary scales only
    s = (np.ldexp(1.0, e) * rng.choice([-1.5, -1.0, 1.0, 1.25], size=e.shape)).astype(np.float32)
    s_bits = (s.view(np.uint32) >> 16).astype(np.uint16)  # exact: at most 3 significant bits
    x = (rng.standard_normal(K) * np.ldexp(1.0, rng.integers(-16, 17, size=K))).astype(np.float32)
    return pack_int4(q).view(np.uint8), s_bits, x


@pytest.mark.parametrize("rows, K", [(67, 7168 + 96), (13, 416), (8, 128), (21, 96), (64, 2048)])
def test_gemv_simd_rows_exact_in_fp32(rows, K):
    """Every row against float64: within 1e-5 of sum |w x| (fp32 sums); K not a multiple of 128 runs the tail,
    rows not a multiple of 8 the leftover-row path."""
    from cpu_kernels import int4_simd
    from cpu_kernels.int4 import _dequant64

    if not int4_simd.SIMD:
        pytest.skip("no AVX-512F or AVX2 + FMA: the generic kernels run")
    W, S, x = _rows_case(rows, K, seed=rows + K)
    kf = K // 128
    XP = np.full(max(1, kf) * int4_simd.CX, np.nan, np.float32)  # poisoned: only what arrange writes is read
    int4_simd.arrange(x, XP, 0, 4 * kf)
    out = np.full(rows + 3, np.nan, np.float32)
    int4_simd.gemv_simd(W, S, 0, rows, XP, x, out[3:])
    w = _dequant64(W, S)
    ref, mag = w @ x.astype(np.float64), np.abs(w) @ np.abs(x.astype(np.float64))
    assert np.isfinite(out[3:]).all() and np.isnan(out[:3]).all()
    assert (np.abs(out[3:] - ref) <= 1e-5 * mag).all(), np.max(np.abs(out[3:] - ref) / mag)


def test_gemv_simd2_row_ranges_match_gemv_simd():
    """gemv_simd2 over a sub-range of rows (r0 > 0, a ragged count): the same numbers as gemv_simd."""
    from cpu_kernels import int4_simd

    if not int4_simd.SIMD:
        pytest.skip("no AVX-512F or AVX2 + FMA: the generic kernels run")
    G, SG, x = _rows_case(80, 7168, seed=5)
    U, SU, _ = _rows_case(80, 7168, seed=6)
    XP = np.empty(56 * int4_simd.CX, np.float32)
    int4_simd.arrange(x, XP, 0, 224)
    g, u, g1 = (np.full(80, np.nan, np.float32) for _ in range(3))
    int4_simd.gemv_simd2(G, SG, U, SU, 5, 80, XP, x, g, u)
    int4_simd.gemv_simd(G, SG, 5, 80, XP, x, g1)
    assert np.array_equal(g[:75], g1[:75]) and np.isfinite(u[:75]).all() and np.isnan(g[75:]).all()


@pytest.mark.parametrize("hidden, inter", [(672, 320), (7168, 2048)])
def test_decode_ragged_widths_and_extreme_scales(hidden, inter):
    """Both widths not multiples of 128 (672 = 5 chunks + 32, 320 = 2 chunks + 64: gate/up and down tails), and
    one expert with group scales spanning 2^-30 .. 2^10 (gate, up) and 2^-60 .. 2^40 (down): finite outputs."""
    stack = make_stack(E=4, hidden=hidden, inter=inter, seed=11)
    rng = np.random.default_rng(11)
    for s, lo, hi in ((stack.gate_s, -30, 10), (stack.up_s, -30, 10), (stack.down_s, -60, 40)):
        e = rng.integers(lo, hi + 1, size=s[2].shape)
        s[2] = (np.ldexp(1.0, e).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    for T in (1, 2):
        ids, w = route(T, 4, 3, seed=T)
        ids[0, 0] = 2
        x = rng.standard_normal((T, hidden)).astype(np.float32)
        out = np.full_like(x, np.nan)
        moe_decode_int4(x, ids, w, stack.gate, stack.gate_s, stack.up, stack.up_s, stack.down, stack.down_s, out)
        with np.errstate(over="ignore"):  # the reference's exp(-g) for g << 0 (silu -> 0)
            ref = reference_moe_int4(x, ids, w, stack)
        assert np.isfinite(out).all() and (np.abs(out - ref) <= 1e-5 * np.abs(ref).max(axis=1, keepdims=True)).all()
