"""Routing-aware prefetch for the disk tier: while layer L computes, layer L+1's router is applied to the current
residual stream (normalised with L+1's own norm) to predict L+1's experts, and the predicted ones not in RAM are
read from the checkpoint on the I/O threads, overlapped with layer L's compute. Recent tokens' routing works
through the tiers' eviction scores: experts a layer keeps choosing stay resident.

The residual after layer L's attention is not what L+1's router will see (L's MoE and L+1's attention are still
to be added), so this is a prediction; its precision and recall are counted per layer in each tier's stats.
"""

from __future__ import annotations

import torch

from .model import Block, MoE, rms_norm
from .profile import PROFILE
from .tiers import LayerTier


def predict_experts(block: Block, h: torch.Tensor, limit: int) -> list[int]:
    """The experts `block`'s router would choose for hidden states h, ranked by the selection scores they would
    get summed over the tokens (the top ranks are the surest: bench/prefetch_accuracy.py measured 0.97 for rank 1
    and 0.47 for rank 8 on a random K2-width slice), at most `limit`."""
    router = block.ffn.router
    scores = router.scores(rms_norm(h, block.ffn_norm, block.eps))
    idx, _ = router.route(scores)
    chosen = torch.zeros_like(scores).scatter_(1, idx, 1.0)
    total = ((scores + router.bias.float()) * chosen).sum(0)
    order = torch.argsort(total, descending=True)[: min(limit, int(chosen.any(0).sum()))]
    return order.cpu().tolist()


class Prefetcher:
    def __init__(self, blocks: list[Block], tiers: dict[int, LayerTier], depth: int | None = None):
        """depth: predicted experts read ahead per layer and step (default: all the prediction holds)."""
        self.enabled, self.depth = True, depth
        for layer, block in enumerate(blocks[:-1]):
            nxt = blocks[layer + 1]
            if isinstance(nxt.ffn, MoE) and layer + 1 in tiers:
                block.after_attention = self._hook(nxt, tiers[layer + 1])

    def _hook(self, nxt: Block, tier: LayerTier):
        def predict(h: torch.Tensor) -> None:
            if not self.enabled:
                return
            with PROFILE("prefetch predict"):
                experts = predict_experts(nxt, h, min(tier.slots, self.depth or 1 << 30))
            tier.last_prediction = set(experts)
            tier.prefetch(experts)

        return predict
