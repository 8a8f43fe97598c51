"""CPU routed-expert kernels at Kimi-K2 shapes against the machine's read bandwidth and torch's bf16 matmul.

    python bench/cpu_experts.py --quick    # 48 experts (2.1 GB fp8, 1.2 GB int4), ~2 min on a 2-core box
    python bench/cpu_experts.py            # full: 384 experts (~17 GB fp8 + ~34 GB bf16), for big boxes
    python bench/cpu_experts.py --quick --format int4   # one format only

For fp8 (K2-Instruct) and native-INT4 (K2-Thinking, K2.5+) experts in turn: validates the kernels against the
float64 reference, then measures STREAM-like read bandwidth (all threads, and per core); the decode kernel (1
token x top-8, cycling over all experts, >= 1 GB, so caches cannot help), exact and in the fast mode; the
single-core ceiling of each decode kernel variant on cache-resident weights (bench/kernel_ceiling.py: the
generic one is the fallback, so "before" and "after" show in one run); the prefill kernel at 16/128/512
tokens routed over 384 experts against torch's matmul on the same weights dequantized to bf16 (AMX where
present). GB/s counts weight bytes (fp8 codes; packed nibbles + bf16 scales). Prints a table, appends JSON lines
to bench/results/cpu_experts.jsonl and prints a JSON summary as its last line (INT4 keys prefixed int4_). With
fewer physical experts than 384, prefill routes over 384 virtual experts in rounds (virtual v uses physical
v mod E), so each expert sees K2's token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_kernels import ExpertStack, reference_moe, routed_moe, warmup  # noqa: E402
from cpu_kernels.int4 import (Int4ExpertStack, dequantize_int4, pack_int4, reference_moe_int4,  # noqa: E402
                              routed_moe_int4)  # fmt: skip
from hybrid.fp8 import dequantize  # noqa: E402
from cpu_kernels.stream import read_bandwidth  # noqa: E402
from common import RESULTS, append_result, machine  # noqa: E402
from kernel_ceiling import EXACT, ceilings  # noqa: E402

H, I, TOPK, VIRTUAL_EXPERTS = 7168, 2048, 8, 384
BASES = 4  # distinct weight contents, copied into every expert slot (values repeat, addresses do not)


def build(n_experts: int, rng) -> tuple[ExpertStack, list]:
    """K2-shaped experts: fp8 codes of normal weights (subnormals included) with jittered block scales."""
    table = (rng.standard_normal(1 << 16) * 112).clip(-448, 448)
    table = torch.from_numpy(table.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy().view(np.int8)
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    bases = [{n: (table[rng.integers(0, 1 << 16, size=s, dtype=np.uint16)],
                  (np.exp(0.25 * rng.standard_normal((-(-s[0] // 128), -(-s[1] // 128)))) / (112 * np.sqrt(s[1])))
                  .astype(np.float32)) for n, s in shapes.items()} for _ in range(BASES)]  # fmt: skip
    arrays = {}
    for n, (rows, cols) in shapes.items():
        q = np.empty((n_experts, rows, cols), np.int8)
        s = np.empty((n_experts, -(-rows // 128), -(-cols // 128)), np.float32)
        for e in range(n_experts):
            q[e], s[e] = bases[e % BASES][n]
        arrays[n], arrays[n + "_s"] = q, s
    return ExpertStack(**arrays), bases


def torch_weights(bases, n_experts: int) -> list[dict]:
    """The same weights dequantized to bf16, one private copy per expert slot."""
    deq = [{n: dequantize(torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(s),
                          torch.bfloat16) for n, (q, s) in b.items()} for b in bases]  # fmt: skip
    return [{n: w.clone() for n, w in deq[e % BASES].items()} for e in range(n_experts)]


def build_int4(n_experts: int, rng) -> tuple[Int4ExpertStack, list]:
    """K2-shaped INT4 experts: codes -8..7 from a rounded normal (the -8 code included), bf16 group scales."""
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    bases = [{n: (pack_int4(np.clip(np.rint(rng.standard_normal(s) * 2.5), -8, 7).astype(np.int8)),
                  torch.from_numpy(np.exp(0.25 * rng.standard_normal((s[0], s[1] // 32))) / (2.5 * np.sqrt(s[1])))
                  .bfloat16()) for n, s in shapes.items()} for _ in range(BASES)]  # fmt: skip
    arrays = {}
    for n, (rows, cols) in shapes.items():
        q = np.empty((n_experts, rows, cols // 8), np.int32)
        sc = torch.empty((n_experts, rows, cols // 32), dtype=torch.bfloat16)
        for e in range(n_experts):
            q[e], sc[e] = bases[e % BASES][n]
        arrays[n] = (q, sc)
    return Int4ExpertStack.from_packed(**arrays), bases


def torch_weights_int4(bases, n_experts: int) -> list[dict]:
    deq = [{n: torch.from_numpy(dequantize_int4(q, s)).bfloat16() for n, (q, s) in b.items()} for b in bases]
    return [{n: w.clone() for n, w in deq[e % BASES].items()} for e in range(n_experts)]


def validate(stack, rng, moe=routed_moe, reference=reference_moe) -> float:
    worst = 0.0
    for T in (1, 9):  # decode kernel, then grouped GEMM (tiles: 9 tokens on each of the two experts)
        x = rng.standard_normal((T, H)).astype(np.float32)
        ids, k = np.tile(np.arange(2, dtype=np.int64), (T, 1)), 2
        w = rng.random((T, k)).astype(np.float32)
        out = np.full((T, H), np.nan, np.float32)
        moe(x, ids, w, stack, out)
        ref = reference(x, ids, w, stack)
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    if not worst <= 1e-5:
        raise SystemExit(f"validation failed: max relative error {worst:.2e}")
    return worst


def bench_decode(stack, calls: int, rng, moe=routed_moe) -> tuple[float, float]:
    """GB/s of weight (fp8 or packed int4) + scale bytes per call (median), cycling through every expert in turn."""
    x = rng.standard_normal((1, H)).astype(np.float32)
    w = rng.random((1, TOPK)).astype(np.float32)
    out = np.empty((1, H), np.float32)
    E = stack.num_experts
    order = rng.permutation(E)
    times = []
    for c in range(calls):
        ids = order[(np.arange(TOPK) + c * TOPK) % E][None].astype(np.int64)
        t0 = time.perf_counter()
        moe(x, ids, w, stack, out)
        times.append(time.perf_counter() - t0)
    nbytes = TOPK * stack.expert_bytes()
    return nbytes / statistics.median(times) / 1e9, nbytes / min(times) / 1e9


def rounds(T: int, E: int, rng):
    """Route T tokens top-8 over 384 virtual experts; yield per round (token of each assignment, physical id)."""
    virt = np.stack([rng.choice(VIRTUAL_EXPERTS, TOPK, replace=False) for _ in range(T)])
    tok = np.repeat(np.arange(T), TOPK)
    v = virt.reshape(-1)
    for r in range(-(-VIRTUAL_EXPERTS // E)):
        sel = (v >= r * E) & (v < (r + 1) * E)
        yield tok[sel], (v[sel] - r * E).astype(np.int64)


def bench_prefill(stack, tw: list, T: int, rng, moe=routed_moe) -> tuple[float, float, float]:
    """(our GFLOP/s, torch bf16 GFLOP/s, seconds) for T tokens; assignments flattened to one expert per row."""
    x = rng.standard_normal((T, H)).astype(np.float32)
    ours = theirs = 0.0
    flops = 0
    for tok, ids in rounds(T, stack.num_experts, rng):
        xs = np.ascontiguousarray(x[tok])
        w = np.ones((len(tok), 1), np.float32)
        out = np.empty_like(xs)
        t0 = time.perf_counter()
        moe(xs, ids[:, None], w, stack, out)
        ours += time.perf_counter() - t0
        xb = torch.from_numpy(xs).to(torch.bfloat16)
        t0 = time.perf_counter()
        for e in np.unique(ids):
            rows = torch.from_numpy(np.nonzero(ids == e)[0])
            xe, we = xb[rows], tw[e]
            h = torch.nn.functional.silu(xe @ we["gate"].T) * (xe @ we["up"].T)
            h @ we["down"].T
        theirs += time.perf_counter() - t0
        flops += 6 * H * I * len(tok)
    return flops / ours / 1e9, flops / theirs / 1e9, ours


def run_format(fmt: str, n_experts: int, quick: bool, rng) -> tuple[list[dict], dict]:
    """Validate, then measure one expert format: (result rows, summary fields without the format prefix)."""
    if fmt == "int4":
        moe, reference = routed_moe_int4, reference_moe_int4
        stack, bases = build_int4(n_experts, rng)
        tw = torch_weights_int4(bases, n_experts)
    else:
        moe, reference = routed_moe, reference_moe
        stack, bases = build(n_experts, rng)
        tw = torch_weights(bases, n_experts)
    err = validate(stack, rng, moe, reference)
    stream_bufs = [stack.gate, stack.up, stack.down]  # >= 2 GB: the experts' own memory
    threads = numba.get_num_threads()
    stream_before = read_bandwidth(stream_bufs)
    calls = 48 if quick else 192
    dec_med, dec_best = bench_decode(stack, calls, rng, moe)
    fast_med, _ = bench_decode(stack, calls, rng, lambda *a: moe(*a, fast=True))
    stream = max(stream_before, read_bandwidth(stream_bufs))
    ceil = ceilings(stack, fmt)
    default = ceil[next(k for k in EXACT if k in ceil)]["gbs"]
    rows = [{"case": "stream_read", "gbs": round(stream, 2), "gbs_per_core": round(stream / threads, 2),
             "bytes": sum(b.nbytes for b in stream_bufs)},
            {"case": "decode_1x8", "gbs": round(dec_med, 2), "gbs_best": round(dec_best, 2),
             "ratio": round(dec_med / stream, 3), "expert_bytes": stack.expert_bytes(), "cycle_bytes": stack.nbytes,
             "validation_error": err},
            {"case": "decode_1x8_fast", "gbs": round(fast_med, 2), "ratio": round(fast_med / stream, 3)},
            {"case": "ceiling_1_core", "gbs": default, "kernels": ceil}]  # fmt: skip
    for T in (16, 128, 512):
        ours, theirs, secs = bench_prefill(stack, tw, T, rng, moe)
        rows.append({"case": f"prefill_{T}", "gflops": round(ours, 1), "torch_bf16_gflops": round(theirs, 1),
                     "ratio_vs_torch": round(ours / theirs, 2), "seconds": round(secs, 3)})  # fmt: skip
    summary = {"stream_gbs": round(stream, 2), "stream_gbs_per_core": round(stream / threads, 2),
               "decode_gbs": round(dec_med, 2), "decode_ratio": round(dec_med / stream, 3),
               "fast_decode_ratio": round(fast_med / stream, 3), "ceiling_gbs_per_core": default,
               "ceiling_by_kernel": {k: v["gbs"] for k, v in ceil.items()},
               **{f"prefill_{r['case'][8:]}_vs_torch": r["ratio_vs_torch"] for r in rows[4:]}}  # fmt: skip
    return rows, summary


def print_table(fmt: str, rows: list[dict]) -> None:
    print(f"{fmt} experts")
    for r in rows:
        if "gflops" in r:
            desc = f"{r['gflops']:8.1f} GFLOP/s  torch bf16 {r['torch_bf16_gflops']:8.1f}  x{r['ratio_vs_torch']:.2f}"
        elif r["case"] == "ceiling_1_core":
            desc = "  ".join(f"{k} {v['gbs']:.1f}" for k, v in r["kernels"].items()) + " GB/s"
        elif "ratio" in r:
            desc = f"{r['gbs']:8.1f} GB/s  {100 * r['ratio']:5.1f}% of STREAM"
        else:
            desc = f"{r['gbs']:8.1f} GB/s ({r['gbs_per_core']:.1f} per core)"
        print(f"  {r['case']:<16}{desc:>60}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="48 experts, fewer repeats (2-core box, ~2 min for both)")
    p.add_argument("--experts", type=int, help="physical experts (default 384, or 48 with --quick)")
    p.add_argument("--format", choices=("fp8", "int4", "both"), default="both", help="expert format (default both)")
    p.add_argument("--out", type=Path, default=RESULTS / "cpu_experts.jsonl")
    args = p.parse_args()
    t_start = time.perf_counter()
    n_experts = args.experts or (48 if args.quick else VIRTUAL_EXPERTS)
    rng = np.random.default_rng(0)
    warmup()
    info = machine()
    print(f"{info['cpu']} ({'AMX' if info['amx'] else 'no AMX'}), {info['threads']} threads, {n_experts} experts")
    summary = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for fmt in ("fp8", "int4") if args.format == "both" else (args.format,):
        rows, fields = run_format(fmt, n_experts, args.quick, rng)
        for row in rows:
            append_result(args.out, {"time": stamp, "quick": args.quick, "format": fmt, "experts": n_experts,
                                     **info, **row})  # fmt: skip
        print_table(fmt, rows)
        summary.update({(k if fmt == "fp8" else f"int4_{k}"): v for k, v in fields.items()})
    summary.update({"seconds": round(time.perf_counter() - t_start, 1), "machine": info["cpu"],
                    "threads": info["threads"]})  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
