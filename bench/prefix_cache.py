"""Time to first token of the next turn of a growing conversation, cold (no prefix cache) against warm (the history
cached by the turn before), and the cache's memory per token.

    python bench/prefix_cache.py                      # demo (trained), small, and a K2-width slice (16 experts)
    python bench/prefix_cache.py --cases demo small   # the quick ones

For each history length H: the history is sent once (the previous turn), then H + 32 new tokens: the warm engine
prefills only the 32, the cold one all of it. TTFT is the time to the first new token's logits. The K2-width slice
is weights synthesized in memory (1 dense + 2 MoE layers, K2's widths and vocabulary, 16 experts per layer so it
fits a 24 GB box). Appends to bench/results/prefix_cache.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from hybrid import Engine  # noqa: E402
from hybrid.config import ModelConfig  # noqa: E402
from hybrid.presets import synthetic_config  # noqa: E402
from hybrid.synthetic import SyntheticTensors, write_checkpoint  # noqa: E402

NEW_TOKENS = 32  # the next user message
LENGTHS = {"demo": [256, 1024, 2048], "small": [256, 1024, 2048], "k2-slice": [256, 1024]}
ROOT = Path(__file__).resolve().parents[1]


def engines(case: str, tmp: Path, context: int) -> tuple[Engine, Engine]:
    """(warm, cold) engines for a case."""
    if case == "k2-slice":
        cfg = ModelConfig.from_dict(synthetic_config("k2-slice", layers=3, n_routed_experts=16))
        source = SyntheticTensors(cfg)
        warm = Engine.from_tensors(cfg, source, max_context=context, progress=False)
        warm.enable_prefix_cache("8GiB")
        cold = Engine(cfg, warm.model, None, context, warm.plan, None)  # the same weights, no prefix cache
        cold.worker, cold.kv_dtype = warm.worker, warm.kv_dtype
        return warm, cold
    if case == "demo":
        path = ROOT / "checkpoints" / "demo"
        if not (path / "config.json").exists():
            from hybrid.demo import train

            train(path)
    else:
        path = write_checkpoint(tmp / case, synthetic_config(case), progress=False)
    return (Engine.from_pretrained(path, progress=False, max_context=context, prefix_cache_mem="8GiB"),
            Engine.from_pretrained(path, progress=False, max_context=context, prefix_cache_mem=0))  # fmt: skip


def ttft(engine: Engine, ids: list[int]) -> float:
    t0 = time.perf_counter()
    engine.next_token_logits(ids)
    return time.perf_counter() - t0


def run(case: str, tmp: Path) -> list[dict]:
    lengths = LENGTHS[case]
    warm, cold = engines(case, tmp, max(lengths) + NEW_TOKENS + 8)
    g = torch.Generator().manual_seed(0)
    vocab = warm.cfg.vocab_size - 256
    records = []
    ttft(warm, torch.randint(0, vocab, (8,), generator=g).tolist())  # compile / warm the kernels once
    ttft(cold, torch.randint(0, vocab, (8,), generator=g).tolist())
    for n in lengths:
        history = torch.randint(0, vocab, (n,), generator=g).tolist()
        turn = history + torch.randint(0, vocab, (NEW_TOKENS,), generator=g).tolist()
        warm.next_token_logits(history)  # the previous turn
        cached = warm.prefix_cache
        warm_s = ttft(warm, turn)
        assert warm.last_cached_tokens == n
        cold_s = ttft(cold, turn)
        per_token = cached.nbytes / cached.tokens
        records.append({"case": case, "history_tokens": n, "new_tokens": NEW_TOKENS, "cold_ttft_s": round(cold_s, 3),
                        "warm_ttft_s": round(warm_s, 3), "warm_over_cold": round(warm_s / cold_s, 3),
                        "cache_bytes_per_token": per_token, "kv_dtype": str(warm.kv_dtype),
                        "bytes_per_token_bf16_gpu": warm.cfg.num_hidden_layers * (
                            warm.cfg.kv_lora_rank + warm.cfg.qk_rope_head_dim) * 2})  # fmt: skip
        print(f"{case:9s} history {n:5d}: cold {cold_s:7.3f} s, warm {warm_s:6.3f} s ({warm_s / cold_s:.1%}), "
              f"cache {per_token:,.0f} B/token ({warm.kv_dtype})")  # fmt: skip
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=list(LENGTHS), choices=list(LENGTHS))
    p.add_argument("--out", type=Path, default=RESULTS / "prefix_cache.jsonl")
    args = p.parse_args()
    info = machine()
    print(f"{info['cpu']}, {info['threads']} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for record in run(case, Path(tmp)):
                append_result(args.out, {**record, "machine": info})
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
