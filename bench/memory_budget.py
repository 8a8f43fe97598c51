"""What each host-RAM budget buys: decode speed, tier hit rates and disk traffic, with and without the prefetcher.

    python bench/memory_budget.py --checkpoint DIR                       # budgets 100/75/50/25% of the experts
    python bench/memory_budget.py --write /tmp/k2w --experts 32 --vocab 32768   # write a K2-width slice first

For each budget (a share of the routed experts held in RAM; the rest read from the checkpoint's own shards) the
page cache of the checkpoint files is dropped (posix_fadvise DONTNEED) before loading and again before decoding,
so disk-tier reads are real reads. The same greedy tokens must come out at every point (checked and recorded).
Also measured in the same run: cold disk read bandwidth of the shards and STREAM-like RAM read bandwidth.
Writes bench/results/memory_budget.{csv,json} and memory_budget.png (tokens/s and hit rate against budget).
With --device cuda, --gpu-mem takes several values: each sets the VRAM left for the hot-expert cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, machine  # noqa: E402

from cpu_kernels.stream import read_bandwidth  # noqa: E402
from hybrid import Engine  # noqa: E402
from hybrid.config import ModelConfig  # noqa: E402
from hybrid.placement import host_mem_for  # noqa: E402
from hybrid.presets import synthetic_config  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402
from hybrid.tiers import drop_cached, disk_read_bandwidth  # noqa: E402


def run_point(ckpt: Path, shards: list[Path], args, fraction: float, prefetch: bool, gpu_mem: str | None) -> dict:
    cfg = ModelConfig.from_file(ckpt)
    context = args.prompt + args.tokens + 8
    slots = max(cfg.num_experts_per_tok, round(fraction * cfg.n_routed_experts))  # `fraction` of each layer's
    host_mem = host_mem_for(cfg, slots, context, gpu=args.device == "cuda")
    for path in shards:
        drop_cached(path)
    engine = Engine.from_pretrained(ckpt, device=args.device, host_mem=host_mem, gpu_mem=gpu_mem, max_context=context,
                                    progress=False)  # fmt: skip
    if engine.prefetcher is not None:
        engine.prefetcher.enabled, engine.prefetcher.depth = prefetch, args.prefetch_depth
    for path in shards:
        drop_cached(path)
    prompt = list(range(100, 100 + args.prompt))
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for token in engine.generate(prompt, args.tokens):
        stamps.append(time.perf_counter())
        tokens.append(token)
    tiers = list(engine.tiers.values())
    read = sum(t.stats.bytes_read for t in tiers)
    decode_s = stamps[-1] - stamps[0]

    def mean(values):
        values = list(values)
        return round(float(np.mean(values)), 3) if values else None

    return {
        "ram_fraction": fraction, "slots": engine.plan.expert_slots, "prefetch": prefetch, "gpu_mem": gpu_mem,
        "gpu_cache_experts": getattr(engine, "gpu_cache_slots", 0),
        "host_mem_gib": round(host_mem / 2**30, 3), "prefill_s": round(stamps[0] - t0, 3),
        "decode_tokens_per_s": round((len(stamps) - 1) / decode_s, 3),
        "hit_rate": mean(t.stats.hit_rate for t in tiers) if tiers else 1.0,
        "on_demand_reads_per_token": round(sum(t.stats.misses for t in tiers) / len(tokens), 2),
        "disk_mb_per_token": round(read / len(tokens) / 1e6, 2),
        "disk_gbs_effective": round(read / (stamps[-1] - t0) / 1e9, 3),
        "precision": mean(t.stats.precision for t in tiers if t.stats.predicted),
        "recall": mean(t.stats.recall for t in tiers if t.stats.predicted),
        "tokens": tokens,
    }  # fmt: skip


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, hits) = plt.subplots(1, 2, figsize=(10, 4))
    for prefetch, style in ((True, "o-"), (False, "s--")):
        pts = sorted((r["ram_fraction"] * 100, r["decode_tokens_per_s"], r["hit_rate"]) for r in rows
                     if r["prefetch"] == prefetch or r["ram_fraction"] >= 1)  # all in RAM: nothing to prefetch
        if not pts:
            continue
        x, tps, hit = zip(*pts)
        label = "prefetch on" if prefetch else "prefetch off"
        speed.plot(x, tps, style, label=label)
        hits.plot(x, hit, style, label=label)
    speed.set(xlabel="routed experts in host RAM (%)", ylabel="decode tokens/s", title="speed")
    hits.set(xlabel="routed experts in host RAM (%)", ylabel="RAM hit rate", title="hit rate", ylim=(0, 1.05))
    for ax in (speed, hits):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="an existing checkpoint directory")
    src.add_argument("--write", type=Path, help="write a k2-slice checkpoint here first (kept for later runs)")
    p.add_argument("--layers", type=int, default=3, help="with --write: depth (layer 0 dense)")
    p.add_argument("--experts", type=int, default=32, help="with --write: routed experts per layer")
    p.add_argument("--vocab", type=int, default=32768, help="with --write: vocabulary size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budgets", default="100,75,50,25", help="percent of the routed experts held in RAM")
    p.add_argument("--gpu-mem", nargs="*", default=[None], help="with --device cuda: GPU budgets to sweep")
    p.add_argument("--prefetch-depth", type=int, help="predicted experts read ahead per layer and step (default: all)")
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()

    ckpt = args.checkpoint or args.write
    if args.write and not (args.write / "config.json").exists():
        cfg = synthetic_config("k2-slice", layers=args.layers, n_routed_experts=args.experts, vocab_size=args.vocab)
        write_checkpoint(args.write, cfg, shard_bytes=1 << 30)
    shards = sorted(ckpt.glob("*.safetensors"))
    disk_gbs = disk_read_bandwidth(shards)
    ram_gbs = read_bandwidth([np.ones(1 << 30, np.uint8)])
    rows = []
    for gpu_mem in args.gpu_mem:
        for pct in (float(b) for b in args.budgets.split(",")):
            for prefetch in ((True, False) if pct < 100 else (True,)):
                row = run_point(ckpt, shards, args, pct / 100, prefetch, gpu_mem)
                rows.append(row)
                print(f"RAM {pct:5.1f}% ({row['slots']} slots) prefetch {'on ' if prefetch else 'off'}: "
                      f"{row['decode_tokens_per_s']:.2f} tokens/s, hit rate {row['hit_rate']:.2f}, "
                      f"{row['on_demand_reads_per_token']} on-demand reads/token, "
                      f"{row['disk_mb_per_token']} MB/token from disk, recall {row['recall']}", flush=True)  # fmt: skip
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine(), "checkpoint": str(ckpt),
               "disk_read_gbs": round(disk_gbs, 3), "ram_read_gbs": round(ram_gbs, 2), "tokens_identical": same,
               "points": rows}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "memory_budget.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(args.out_dir / "memory_budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "tokens"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    title = f"{ckpt.name} on {summary['cpu']} ({summary['threads']} threads); disk {disk_gbs:.2f} GB/s, RAM {ram_gbs:.1f} GB/s"
    plot(rows, args.out_dir / "memory_budget.png", title)
    print(f"disk read {disk_gbs:.2f} GB/s (cold), RAM read {ram_gbs:.1f} GB/s; same tokens at every budget: {same}")
    if not same:
        sys.exit("budget changed the output tokens")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count())
    main()
