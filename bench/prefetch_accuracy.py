"""How well the prefetcher's prediction (layer L+1's router on the residual after layer L's attention) matches the
experts layer L+1 then really uses, during greedy decode with every expert in RAM.

    python bench/prefetch_accuracy.py --checkpoint checkpoints/demo        # the trained demo model (top-2 of 8)
    python bench/prefetch_accuracy.py --checkpoint /tmp/k2w                # a K2-width slice (bench/memory_budget.py --write)

Prints the precision of each predicted rank (rank 1 = the expert with the highest predicted selection score) and
the recall per MoE layer, and appends a JSON line to bench/results/prefetch_accuracy.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from hybrid import Engine  # noqa: E402
from hybrid.model import MoE  # noqa: E402
from hybrid.prefetch import predict_experts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=48, help="decode steps measured")
    p.add_argument("--out", type=Path, default=RESULTS / "prefetch_accuracy.jsonl")
    args = p.parse_args()

    engine = Engine.from_pretrained(args.checkpoint, progress=False)
    k = engine.cfg.num_experts_per_tok
    blocks = engine.model.blocks
    predicted: dict[int, list[list[int]]] = {}
    actual: dict[int, list[set[int]]] = {}
    decoding = [False]
    for layer in range(1, len(blocks)):
        if not isinstance(blocks[layer].ffn, MoE):
            continue
        predicted[layer], actual[layer] = [], []

        def predict(h, nxt=blocks[layer], layer=layer):
            if decoding[0]:
                predicted[layer].append(predict_experts(nxt, h, k))

        def submit(x, idx, w, original=blocks[layer].ffn.experts.submit, layer=layer):
            if decoding[0]:
                actual[layer].append(set(idx[-1].tolist()))  # the routing layer L+1 really used
            return original(x, idx, w)

        blocks[layer - 1].after_attention = predict
        blocks[layer].ffn.experts.submit = submit
    prompt = list(range(10, 26))
    for _ in engine.generate(prompt, args.tokens + 1):
        decoding[0] = True  # after the prefill: one token per step from here on

    rank_hits = np.zeros(k)
    recall = {}
    for layer in predicted:
        pairs = list(zip(predicted[layer], actual[layer]))
        for pred, used in pairs:
            rank_hits[: len(pred)] += [e in used for e in pred]
        recall[layer] = sum(len(set(pred) & used) for pred, used in pairs) / sum(len(used) for _, used in pairs)
    steps = sum(len(v) for v in predicted.values())
    precision_by_rank = (rank_hits / steps).round(3).tolist()
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine(), "checkpoint": str(args.checkpoint),
              "top_k": k, "experts": engine.cfg.n_routed_experts, "decode_steps": args.tokens,
              "precision_by_rank": precision_by_rank, "recall_by_layer": {str(i): round(r, 3) for i, r in recall.items()}}
    append_result(args.out, record)
    print(f"{args.checkpoint}: top-{k} of {engine.cfg.n_routed_experts} experts, {args.tokens} decode steps")
    print("precision by predicted rank:", " ".join(f"{v:.2f}" for v in precision_by_rank))
    print("recall by layer:", ", ".join(f"{i}: {r:.2f}" for i, r in recall.items()))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
