"""The stable Python surface: Engine.from_pretrained(path).logits(ids) / .generate(ids, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .loader import load_transformer, reference_experts
from .model import KVCache, Transformer


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling over the smallest set whose mass reaches top_p."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of strictly more likely tokens
        sorted_p[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    def __init__(self, cfg: ModelConfig, model: Transformer, path: Path):
        self.cfg, self.model, self.path = cfg, model, path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", progress: bool = True,
                        experts: str = "cpu") -> "Engine":  # fmt: skip
        """Open a checkpoint directory (config.json + safetensors) after validating every tensor against the config.

        experts: "cpu" (the Numba fp8 kernels) or "reference" (a plain per-expert torch loop, for debugging).
        """
        if device != "cpu":
            raise ValueError(f"device {device!r} is not supported yet; use device='cpu'")
        if experts not in ("cpu", "reference"):
            raise ValueError(f"experts must be 'cpu' or 'reference', got {experts!r}")
        path = Path(path)
        cfg = ModelConfig.from_file(path)
        ckpt = Checkpoint(path)
        factory = reference_experts
        if experts == "cpu":
            import cpu_kernels

            from .cpu_experts import CpuExperts, stack_experts

            cpu_kernels.warmup()  # compiled once, then loaded from Numba's disk cache: no JIT wait later

            def factory(layer, routed, names):
                return CpuExperts(stack_experts(routed, ckpt, names))

        model = load_transformer(ckpt, cfg, experts=factory, progress=progress)
        return cls(cfg, model, path)

    def _check_ids(self, ids: list[int]) -> torch.Tensor:
        if not ids:
            raise ValueError("ids must hold at least one token")
        t = torch.tensor(ids, dtype=torch.long)
        if int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return t

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Full causal forward: float32 logits [len(ids), vocab_size]."""
        t = self._check_ids(ids)
        return self.model.forward(t, 0, KVCache(self.cfg, len(ids)))

    def generate(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:  # fmt: skip
        """Yield new token ids one at a time: prefill the prompt, then decode against the latent KV cache."""
        t = self._check_ids(ids)
        if max_new_tokens <= 0:
            return
        stop = set(stop_ids)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        cache = KVCache(self.cfg, len(ids) + max_new_tokens)
        logits = self.model.forward(t, 0, cache, last_only=True)[0]
        pos = len(ids)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            yield token
            if token in stop or i == max_new_tokens - 1:
                return
            logits = self.model.forward(torch.tensor([token]), pos, cache, last_only=True)[0]
            pos += 1
