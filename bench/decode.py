"""Decode and prefill speed of the hybrid engine at Kimi-K2 width, with a per-phase breakdown.

    python bench/decode.py                                   # GPU box: k2-slice (1 dense + 2 MoE layers, 384 experts)
    python bench/decode.py --device cpu --experts 32 --vocab 32768 --prefill 512   # a small CPU-only box

Weights are synthesized straight into memory by default (SyntheticTensors: the same values a written k2-slice
checkpoint holds, through the same assembly code); --checkpoint DIR loads a written one instead. One run
measures: STREAM-like read bandwidth over the expert stacks; decode tokens/s; a per-token breakdown (attention,
router, shared expert, CPU experts, waits, copies, lm_head); effective routed-expert GB/s; prefill tokens/s; peak
RAM and VRAM. It then projects a 61-layer Kimi-K2 step (1 dense + 60 MoE layers), labelled as a projection.
Appends a JSON line to bench/results/decode.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from cpu_kernels.stream import read_bandwidth  # noqa: E402
from hybrid import Engine  # noqa: E402
from hybrid.config import ModelConfig  # noqa: E402
from hybrid.model import MoE  # noqa: E402
from hybrid.placement import gpu_cache_slots, gpu_mem_for, parse_bytes, plan  # noqa: E402
from hybrid.presets import KIMI_K2_INSTRUCT, synthetic_config  # noqa: E402
from hybrid.profile import PROFILE  # noqa: E402
from hybrid.synthetic import SyntheticTensors  # noqa: E402

K2 = ModelConfig.from_dict(KIMI_K2_INSTRUCT)
K2_MOE_LAYERS = K2.moe_layers
TARGET_RATIO = 1.15  # issue 4: time per token <= 1.15 x routed bytes per token / STREAM


def k2_equivalent_gpu_mem(cfg: ModelConfig, gpu_mem: int, context: int) -> int:
    """A GPU budget giving the slice the hot-expert cache per layer that the whole of Kimi-K2 would get from
    `gpu_mem` (a few experts per layer on a 24 GB card), not the slice's own leftover VRAM (which would cache
    most of its experts and hide the CPU side)."""
    return gpu_mem_for(cfg, gpu_cache_slots(K2, plan(K2, gpu_mem, 1 << 50, context)), context)


def build(args) -> Engine:
    ctx = args.prompt + args.tokens + 8 + max(args.prefill, default=0)
    if args.checkpoint:
        cfg = ModelConfig.from_file(args.checkpoint)
    else:
        overrides = {"n_routed_experts": args.experts, **({"vocab_size": args.vocab} if args.vocab else {})}
        cfg = ModelConfig.from_dict(synthetic_config("k2-slice", layers=args.layers, **overrides))
    gpu_mem = k2_equivalent_gpu_mem(cfg, parse_bytes(args.gpu_mem), ctx) if args.device == "cuda" else None
    if args.checkpoint:
        return Engine.from_pretrained(args.checkpoint, device=args.device, gpu_mem=gpu_mem, max_context=ctx)
    return Engine.from_tensors(cfg, SyntheticTensors(cfg), device=args.device, gpu_mem=gpu_mem, max_context=ctx)


def timed_decode(engine: Engine, prompt: list[int], tokens: int, profile: bool) -> float:
    """Seconds per decode step over `tokens` steps after one warm step; the prefill is not counted."""
    stamps = []
    for i, _ in enumerate(engine.generate(prompt, tokens + 2)):
        if engine.gpu is not None:
            engine.gpu.synchronize()
        stamps.append(time.perf_counter())
        if i == 1 and profile:
            PROFILE.start(sync=engine.gpu.synchronize if engine.gpu is not None else None)
    PROFILE.stop()
    return (stamps[-1] - stamps[1]) / tokens


def timed_prefill(engine: Engine, n: int, g: torch.Generator) -> tuple[float, list[str]]:
    ids = torch.randint(0, engine.cfg.vocab_size - 256, (n,), generator=g).tolist()
    t0 = time.perf_counter()
    next(engine.generate(ids, 1))
    paths = [b.ffn.experts.last_path for b in engine.model.blocks if isinstance(b.ffn, MoE)]
    return n / (time.perf_counter() - t0), paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=3, help="slice depth: layer 0 is dense, the rest MoE")
    p.add_argument("--experts", type=int, default=K2.n_routed_experts, help="routed experts per MoE layer")
    p.add_argument("--vocab", type=int, help="vocabulary size (default K2's 163840)")
    p.add_argument("--checkpoint", type=Path, help="load this checkpoint instead of synthesizing one")
    p.add_argument("--gpu-mem", default="24GiB", help="the card modelled: the slice gets the hot-expert cache per "
                   "layer Kimi-K2 would get on it (default 24GiB)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed")
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 4096], help="prefill lengths timed")
    p.add_argument("--out", type=Path, default=RESULTS / "decode.jsonl")
    args = p.parse_args()

    t_load = time.perf_counter()
    engine = build(args)
    load_s = time.perf_counter() - t_load
    cfg = engine.cfg
    moe = [b.ffn for b in engine.model.blocks if isinstance(b.ffn, MoE)]
    stacks = [m.experts.stack for m in moe]
    stream = read_bandwidth([a for s in stacks for a in (s.gate, s.up, s.down)])
    expert_bytes = stacks[0].expert_bytes()
    routed_per_token = len(moe) * cfg.num_experts_per_tok * expert_bytes

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size - 256, (args.prompt,), generator=g).tolist()
    step_s = timed_decode(engine, prompt, args.tokens, profile=False)
    profiled_s = timed_decode(engine, prompt, args.tokens, profile=True)  # sections synchronize: a bit slower
    phases = {k: v / args.tokens for k, v in PROFILE.seconds.items()}
    expert_s = phases.get("experts (CPU)", 0.0)

    n_dense = cfg.num_hidden_layers - len(moe)
    attn_per_layer = phases.get("attention", 0.0) / cfg.num_hidden_layers
    # the unprofiled step split in the profiled run's proportions; embedding lookup and sampling count as MoE time
    fixed = phases.get("lm_head", 0.0) + phases.get("dense MLP", 0.0) + n_dense * attn_per_layer
    moe_layer_s = step_s * max(0.0, 1 - fixed / profiled_s) / len(moe)
    projected_s = step_s + (K2_MOE_LAYERS - len(moe)) * moe_layer_s
    projected_bytes = K2_MOE_LAYERS * K2.num_experts_per_tok * expert_bytes
    roof_s = projected_bytes / (stream * 1e9)

    prefill = {}
    for n in args.prefill:
        tps, paths = timed_prefill(engine, n, g)
        prefill[str(n)] = {"tokens_per_s": round(tps, 2), "expert_paths": paths}

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine(), "device": engine.gpu.name if engine.gpu else "cpu",
        "gpu_cache_experts_per_layer": engine.gpu_cache_slots, "layers": cfg.num_hidden_layers, "moe_layers": len(moe), "experts": cfg.n_routed_experts,
        "vocab": cfg.vocab_size, "source": str(args.checkpoint or "synthetic in memory"), "load_s": round(load_s, 1),
        "stream_gbs": round(stream, 2), "decode_tokens_per_s": round(1 / step_s, 3), "step_ms": round(1e3 * step_s, 2),
        "phases_ms_per_token": {k: round(1e3 * v, 3) for k, v in sorted(phases.items())},
        "routed_bytes_per_token": routed_per_token,
        "routed_gbs_effective": round(routed_per_token / expert_s / 1e9, 2) if expert_s else None,
        "moe_layer_ms": round(1e3 * moe_layer_s, 2),
        "projection_61_layers": {"step_ms": round(1e3 * projected_s, 1), "tokens_per_s": round(1 / projected_s, 3),
                                 "routed_gb_per_token": round(projected_bytes / 1e9, 2),
                                 "ratio_to_stream_roof": round(projected_s / roof_s, 3),
                                 "target_ratio": TARGET_RATIO, "met": projected_s / roof_s <= TARGET_RATIO},
        "prefill": prefill,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_vram_gib": round(engine.gpu.max_memory_allocated() / 2**30, 2) if engine.gpu is not None else None,
    }  # fmt: skip
    append_result(args.out, record)

    print(f"{record['cpu']}, {record['threads']} threads, GPU: {record['gpu']}; device {record['device']}")
    print(f"slice: {cfg.num_hidden_layers} layers ({len(moe)} MoE, {cfg.n_routed_experts} experts, K2 widths), "
          f"loaded in {load_s:.0f} s; STREAM read {stream:.1f} GB/s")
    print(f"decode: {1 / step_s:.2f} tokens/s ({1e3 * step_s:.1f} ms/step), per MoE layer {1e3 * moe_layer_s:.1f} ms")
    print(f"  {'phase':<18}{'ms/token':>10}{'ms/layer':>10}")
    per_layer = {"attention": cfg.num_hidden_layers, "dense MLP": n_dense}
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<18}{1e3 * v:>10.2f}{1e3 * v / per_layer.get(k, len(moe) if k != 'lm_head' else 1):>10.2f}")
    if expert_s:
        print(f"routed experts: {routed_per_token / 1e9:.3f} GB/token at {record['routed_gbs_effective']} GB/s "
              f"effective ({record['routed_gbs_effective'] / stream:.0%} of STREAM)")
    proj = record["projection_61_layers"]
    print(f"PROJECTION to 61 layers (1 dense + 60 MoE, not measured): {proj['step_ms']} ms/token = "
          f"{proj['tokens_per_s']} tokens/s; {proj['ratio_to_stream_roof']}x the STREAM roof "
          f"(target <= {TARGET_RATIO}: {'met' if proj['met'] else 'NOT met'})")
    for n, r in prefill.items():
        print(f"prefill {n} tokens: {r['tokens_per_s']} tokens/s (experts on: {', '.join(r['expert_paths'])})")
    print(f"peak RSS {record['peak_rss_gib']} GiB, peak VRAM {record['peak_vram_gib']} GiB")
    print(json.dumps(record))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
