"""The Triton kernels (cuda/*.py via hybrid/gpu_kernels.py) at Kimi-K2's decode shapes: each is validated against a
float64 reference first, then timed with CUDA events against a device-to-device copy measured in the same run (the
HBM roof) and against torch's path (fp8_linear: dequantize then matmul; int4_linear: its torch reference, unpack
then matmul; bf16_linear (K2-Thinking / K2.5's non-expert linears): F.linear on an fp32 copy of the weight, the
model's old path; mla_decode: the model's old path, an fp32 copy of the cache and einsums, with an fp8 and with a
bf16 kv_b). int4_linear's GB/s count the packed words and bf16 scales of a routed expert's linears, bf16_linear's
the bf16 weight: at M=1 the fraction of the copy's rate is the share of HBM bandwidth reached; TFLOP/s matter for
the prefill row counts.

    python bench/gpu_kernels.py [--out bench/results/gpu_kernels.jsonl]   # needs a CUDA GPU
    python bench/gpu_kernels.py --interpret-smoke   # no GPU: one small shape of each through Triton's interpreter
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from cpu_kernels.int4 import pack_int4  # noqa: E402
from hybrid import gpu_kernels as gk  # noqa: E402
from hybrid.fp8 import dequantize, quantize  # noqa: E402

SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512), "o": (7168, 8192),
          "gate_up": (2048, 7168), "down": (7168, 2048)}  # fmt: skip
CONTEXTS = (1024, 8192, 32768)
NH, DN, DR, DV, C = 64, 128, 64, 128, 512  # Kimi-K2's attention
INT4_SHAPES = {"gate_up": (2048, 7168), "down": (7168, 2048)}  # a routed expert's (out, in), K2-Thinking / K2.5
MAX_REL_ERR, INT4_MAX_REL_ERR, BF16_MAX_REL_ERR = 1e-4, 1e-5, 1e-5  # what tests/test_gpu_kernels.py asserts


def seconds(fn, device: str, repeats: int) -> float:
    """Mean time per call after one warm-up call: CUDA events on a GPU, wall clock under the interpreter."""
    fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def check(name: str, err: float, tol: float = MAX_REL_ERR) -> None:
    if not err <= tol:  # also catches NaN
        sys.exit(f"{name}: relative error {err:.2e} > {tol:.0e} against float64: not timing a wrong kernel")


def bench_linear(shapes: dict, tokens, device: str, repeats: int, copy_gbs: float, emit) -> None:
    print(f"{'linear':<9}{'M':>3}{'max rel err':>13}{'kernel GB/s':>13}{'of copy':>9}{'torch GB/s':>12}")
    for name, (n, k) in shapes.items():
        w = quantize(torch.randn(n, k) / k**0.5)
        q, s = w.q.to(device), w.scale.to(device)
        nbytes = q.numel() + s.numel() * 4
        for m in tokens:
            x = torch.randn(m, k, device=device)
            err = rel_err(gk.fp8_linear(x, q, s), x.double() @ dequantize(q, s).double().T)
            check(f"fp8_linear {name} M={m}", err)
            ours = nbytes / seconds(lambda: gk.fp8_linear(x, q, s), device, repeats) / 1e9
            theirs = nbytes / seconds(lambda: x @ dequantize(q, s).T, device, repeats) / 1e9
            print(f"{name:<9}{m:>3}{err:>13.1e}{ours:>13.1f}{ours / copy_gbs:>9.0%}{theirs:>12.1f}")
            emit({"kernel": "fp8_linear", "linear": name, "shape": [n, k], "tokens": m, "max_rel_err": err,
                  "kernel_gbs": round(ours, 2), "copy_gbs": round(copy_gbs, 1), "torch_dequant_gbs": round(theirs, 2)})


def bench_bf16(shapes: dict, tokens, device: str, repeats: int, copy_gbs: float, emit) -> None:
    print(f"{'bf16':<9}{'M':>3}{'max rel err':>13}{'kernel GB/s':>13}{'of copy':>9}{'torch GB/s':>12}")
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k) / k**0.5).bfloat16().to(device)
        nbytes = w.numel() * w.element_size()
        for m in tokens:
            x = torch.randn(m, k, device=device)
            err = rel_err(gk.bf16_linear(x, w), gk.bf16_linear_reference(x, w, torch.float64))
            check(f"bf16_linear {name} M={m}", err, BF16_MAX_REL_ERR)
            ours = nbytes / seconds(lambda: gk.bf16_linear(x, w), device, repeats) / 1e9
            theirs = nbytes / seconds(lambda: torch.nn.functional.linear(x, w.float()), device, repeats) / 1e9
            print(f"{name:<9}{m:>3}{err:>13.1e}{ours:>13.1f}{ours / copy_gbs:>9.0%}{theirs:>12.1f}")
            emit({"kernel": "bf16_linear", "linear": name, "shape": [n, k], "tokens": m, "max_rel_err": err,
                  "kernel_gbs": round(ours, 2), "copy_gbs": round(copy_gbs, 1),
                  "torch_fp32_copy_gbs": round(theirs, 2)})  # fmt: skip


def bench_int4(shapes: dict, tokens, device: str, repeats: int, copy_gbs: float, emit) -> None:
    print(f"{'int4':<9}{'M':>4}{'max rel err':>13}{'kernel GB/s':>13}{'of copy':>9}{'TFLOP/s':>9}{'torch GB/s':>12}")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes.items():
        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        packed = torch.from_numpy(pack_int4(codes.numpy())).to(device)
        scale = ((torch.rand(n, k // 32, generator=g) + 0.5) / (8 * k**0.5)).bfloat16().to(device)
        nbytes = packed.numel() * 4 + scale.numel() * 2
        for m in tokens:
            x = torch.randn(m, k, device=device)
            err = rel_err(gk.int4_linear(x, packed, scale), gk.int4_linear_reference(x, packed, scale, torch.float64))
            check(f"int4_linear {name} M={m}", err, INT4_MAX_REL_ERR)
            t = seconds(lambda: gk.int4_linear(x, packed, scale), device, repeats)
            ours, tflops = nbytes / t / 1e9, 2 * m * n * k / t / 1e12
            theirs = nbytes / seconds(lambda: gk.int4_linear_reference(x, packed, scale), device, repeats) / 1e9
            print(f"{name:<9}{m:>4}{err:>13.1e}{ours:>13.1f}{ours / copy_gbs:>9.0%}{tflops:>9.2f}{theirs:>12.1f}")
            emit({"kernel": "int4_linear", "linear": name, "shape": [n, k], "tokens": m, "max_rel_err": err,
                  "kernel_gbs": round(ours, 2), "copy_gbs": round(copy_gbs, 1), "tflops": round(tflops, 3),
                  "torch_dequant_gbs": round(theirs, 2)})  # fmt: skip


def bench_mla(contexts, nh: int, device: str, repeats: int, copy_gbs: float, emit) -> None:
    print(f"{'kv_b':<6}{'context':>8}{'max rel err':>13}{'kernel ms':>11}{'cache GB/s':>12}{'of copy':>9}"
          f"{'torch ms':>10}")  # fmt: skip
    kv_b = torch.randn(nh * (DN + DV), C) / C**0.5
    fp8 = quantize(kv_b)
    weights = {"fp8": (fp8.q.to(device), fp8.scale.to(device)), "bf16": (kv_b.bfloat16().to(device), None)}
    q_nope, q_pe = torch.randn(nh, DN, device=device), torch.randn(nh, DR, device=device)
    scale = 1.3466**2 / (DN + DR) ** 0.5  # K2's YaRN mscale^2 / sqrt(dn + dr)
    for length in contexts:
        c = torch.randn(length, C, device=device).bfloat16()
        pe = torch.randn(length, DR, device=device).bfloat16()
        for fmt, (kq, ks) in weights.items():
            args = (q_nope, q_pe, kq, ks, c, pe, length, scale, DV)
            err = rel_err(gk.mla_decode(*args), gk.mla_decode_reference(*args, dtype=torch.float64))
            check(f"mla_decode kv_b={fmt} context={length}", err)
            ms = seconds(lambda: gk.mla_decode(*args), device, repeats) * 1e3
            ref_ms = seconds(lambda: gk.mla_decode_reference(*args), device, repeats) * 1e3
            gbs = (c.numel() + pe.numel()) * c.element_size() / (ms / 1e3) / 1e9
            print(f"{fmt:<6}{length:>8}{err:>13.1e}{ms:>11.3f}{gbs:>12.1f}{gbs / copy_gbs:>9.0%}{ref_ms:>10.3f}")
            emit({"kernel": "mla_decode", "kv_b": fmt, "context": length, "heads": nh, "max_rel_err": err,
                  "ms": round(ms, 4), "reference_ms": round(ref_ms, 4), "kernel_gbs": round(gbs, 2),
                  "copy_gbs": round(copy_gbs, 1)})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_kernels.jsonl")
    ap.add_argument("--interpret-smoke", action="store_true", help="no GPU: one small shape of each, interpreted")
    args = ap.parse_args()
    smoke = args.interpret_smoke
    if smoke:
        assert gk.interpreting(), "--interpret-smoke runs the interpreter: use it without CUDA or with " \
            "HYBRID_GPU_STANDIN=1"  # fmt: skip
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA GPU (torch sees none). Without one, --interpret-smoke runs one "
                 "small shape of each kernel through Triton's interpreter to show the script works.")  # fmt: skip
    device = "cuda" if not smoke else "cpu"
    repeats = 1 if smoke else 50
    info, stamp = machine(), time.strftime("%Y-%m-%dT%H:%M:%S")

    def emit(record: dict) -> None:
        if smoke:  # interpreter timings say nothing about a GPU: shown, never recorded
            print("  record:", record)
        else:
            append_result(args.out, {"time": stamp, **info, **record})

    src = torch.empty(1 << (20 if smoke else 30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / seconds(lambda: dst.copy_(src), device, 20) / 1e9  # read + write
    print(f"{info['gpu'] or 'no GPU: Triton interpreter'}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    bench_linear({"kv_a/4": (144, 1792)} if smoke else SHAPES, (1, 4) if smoke else (1, 4, 16), device, repeats,
                 copy_gbs, emit)  # fmt: skip
    bench_bf16({"kv_a/4": (144, 1792)} if smoke else SHAPES, (1, 4) if smoke else (1, 4, 16), device, repeats,
               copy_gbs, emit)  # fmt: skip
    # M=1..16: decode tiles (the hot-expert cache); 83, 256: prefill tiles (a streamed prefill's rows per expert)
    bench_int4({"gate_up/8": (256, 1024)} if smoke else INT4_SHAPES, (1, 20) if smoke else (1, 4, 16, 83, 256),
               device, repeats, copy_gbs, emit)  # fmt: skip
    bench_mla((300,) if smoke else CONTEXTS, 16 if smoke else NH, device, repeats, copy_gbs, emit)
    if not smoke:
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
