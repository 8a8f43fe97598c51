"""The stable Python surface: Engine.from_pretrained(path).logits(ids) / .generate(ids, ...)."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path
from typing import Iterable, Iterator

import psutil
import torch

from . import device as gpu_device
from .checkpoint import Checkpoint
from .config import ModelConfig
from .cpu_experts import ExpertWorker
from .formats import FORMATS
from .fp8 import quantize
from .loader import TensorSource, assemble
from .model import KVCache, LoopExperts, MoE, Transformer
from .placement import Plan, PlanError, gpu_cache_slots, parse_bytes, plan
from .prefetch import Prefetcher
from .prefix_cache import PrefixCache
from .prefix_store import PrefixStore, model_identity
from .schema import validate


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


def _resolve_device(device: str):
    """None for "cpu"; for "cuda" / "cuda:N" the GPU as a `hybrid.device` Device (the stand-in under
    HYBRID_GPU_STANDIN=1)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return None if dev.type == "cpu" else gpu_device.get(dev.index)


SWAPS_PER_TOKEN = 2  # hot-expert cache admissions over PCIe per decode step, all layers together


class Engine:
    PREFILL_CHUNK = 2048  # tokens per prefill forward: bounds activation memory, fills the expert kernels

    def __init__(self, cfg: ModelConfig, model: Transformer, path: Path | None, max_context: int | None = None,
                 plan: Plan | None = None, worker: ExpertWorker | None = None):  # fmt: skip
        self.cfg, self.model, self.path, self.plan, self.worker = cfg, model, path, plan, worker
        self.gpu = worker.device if worker is not None else None  # the `hybrid.device` Device, None on the CPU
        self.max_context = max_context or cfg.max_position_embeddings
        self.kv_dtype = torch.bfloat16 if self.gpu is not None else torch.float32
        self.tiers: dict = {}  # MoE layer -> its LayerTier, when host RAM holds only some experts
        self.prefetcher: Prefetcher | None = None
        self.gpu_cache_slots = 0  # hot experts per MoE layer kept in VRAM
        self.prefix_cache: PrefixCache | None = None  # latents of earlier requests (enable_prefix_cache)
        self.last_cached_tokens = 0  # prompt tokens the last generate() took from the prefix cache
        self.last_logits: torch.Tensor | None = None  # float32 [vocab] logits of the token generate() last yielded
        if worker is not None:
            weakref.finalize(self, worker.close)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", gpu_mem: int | str | None = None,
                        host_mem: int | str | None = None, max_context: int | None = None, progress: bool = True,
                        experts: str = "cpu", gpu_weights: str = "bf16", prefix_cache_mem: int | str | None = None,
                        prefix_cache_dir: str | Path | None = None, fast_experts: bool = False) -> "Engine":  # fmt: skip
        """Open a checkpoint directory (config.json + safetensors) after validating every tensor against the config.

        device "cuda": attention, dense layer, shared experts, router, norms, lm_head and the KV cache on the GPU
        (embeddings too when they fit), routed experts pinned in host RAM and computed by the CPU kernels; where
        things go is decided by `placement.plan` from gpu_mem / host_mem (default: what is free now) and
        max_context (default: the longest that fits). device "cpu": everything on the CPU, same code.
        experts: "cpu" (the Numba kernels) or "reference" (a plain per-expert torch loop, for debugging).
        gpu_weights "fp8": bf16 linears outside the routed experts (INT4 checkpoints) are requantized to block-fp8
        at load, for cards that cannot hold them in bf16.
        prefix_cache_mem / prefix_cache_dir: see enable_prefix_cache (on by default; 0 turns it off).
        fast_experts: the CPU decode kernels round the routed experts' activations (bf16 for fp8 experts, int8 per
        32-group for INT4): faster on cores short of compute, at the cost the README measures; off by default.
        """
        path = Path(path)
        cfg = ModelConfig.from_file(path)
        ckpt = Checkpoint(path, prefix=cfg.tensor_prefix)
        if ckpt.skipped and progress:
            print(f"note: skipping {len(ckpt.skipped)} tensors outside the text model (e.g. '{ckpt.skipped[0]}'): "
                  "text only for now", file=sys.stderr)  # fmt: skip
        validate(ckpt, cfg)
        dtypes = {name: info.dtype for name, info in ckpt.tensors.items()}
        engine = cls.from_tensors(cfg, ckpt, device, gpu_mem, host_mem, max_context, progress, experts, dtypes, path,
                                  gpu_weights, fast_experts)  # fmt: skip
        engine.enable_prefix_cache(prefix_cache_mem, prefix_cache_dir)
        return engine

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, source: TensorSource, device: str = "cpu",
                     gpu_mem: int | str | None = None, host_mem: int | str | None = None,
                     max_context: int | None = None, progress: bool = True, experts: str = "cpu",
                     dtypes: dict[str, str] | None = None, path: Path | None = None,
                     gpu_weights: str = "bf16", fast_experts: bool = False) -> "Engine":  # fmt: skip
        """Build from any source of checkpoint-named tensors (a Checkpoint, or synthetic weights made on demand)."""
        if experts not in ("cpu", "reference"):
            raise ValueError(f"experts must be 'cpu' or 'reference', got {experts!r}")
        if gpu_weights not in ("bf16", "fp8"):
            raise ValueError(f"gpu_weights must be 'bf16' or 'fp8', got {gpu_weights!r}")
        dev = _resolve_device(device)
        cuda = dev is not None
        if cuda and experts == "reference":
            raise ValueError("experts='reference' runs on the CPU only (device='cpu')")
        host = parse_bytes(host_mem) if host_mem else psutil.virtual_memory().available
        gpu = (parse_bytes(gpu_mem) if gpu_mem else dev.mem_get_info()[0]) if cuda else 0
        the_plan = plan(cfg, gpu, host, max_context, dtypes=dtypes, gpu=cuda, kv_bytes=2 if cuda else 4,
                        gpu_weights=gpu_weights)  # fmt: skip
        max_context = the_plan.kv_capacity_tokens
        tiered = experts == "cpu" and the_plan.expert_slots < cfg.n_routed_experts
        if tiered and not hasattr(source, "tensors"):
            raise PlanError("the budget needs the disk tier, which reads experts from checkpoint files: "
                            "use Engine.from_pretrained or a larger host_mem")  # fmt: skip

        def place(name: str) -> torch.Tensor:
            t = source.get(name)
            if ".mlp.experts." in name:
                return t  # copied into expert stacks (or read into tier slots) by the experts factory
            # a private copy, not the file mapping: a shard truncated under a running engine must not SIGBUS it
            placed = dev.to(t) if cuda and the_plan.device_of(name) == "gpu" else t.clone()
            source.release(name)  # the copy is the only one now
            return placed

        def linear(module: str):
            fmt = FORMATS[cfg.format_of(module)]
            if gpu_weights == "fp8" and fmt.name == "bf16" and ".mlp.experts." not in module:
                name = f"{module}.weight"
                w = source.get(name)
                w = quantize(dev.to(w) if cuda and the_plan.device_of(name) == "gpu" else w)
                source.release(name)
                return w
            return fmt.build({suffix: place(f"{module}.{suffix}") for suffix in fmt.tensors})

        worker, cache_slots = None, 0
        if experts == "reference":
            def factory(layer, routed, names):
                return LoopExperts(routed)
        else:
            import cpu_kernels

            cpu_kernels.warmup(fast_experts)  # compiled once, then loaded from Numba's disk cache: no JIT wait later
            worker = ExpertWorker(cfg.hidden_size, cfg.num_experts_per_tok, dev, cls.PREFILL_CHUNK, fast=fast_experts)
            cache_slots = gpu_cache_slots(cfg, the_plan) if cuda else 0
            factory = _hybrid_factory(source, worker, dev, the_plan.expert_slots if tiered else 0, cache_slots,
                                      cfg.moe_layers)  # fmt: skip
        model = assemble(cfg, place, experts=factory, progress=progress, linear=linear)
        engine = cls(cfg, model, path, max_context, the_plan, worker)
        engine.tiers = {i: e.tier for i, e in engine._routed().items() if getattr(e, "tier", None) is not None}
        engine.prefetcher = Prefetcher(model.blocks, engine.tiers) if engine.tiers else None
        engine.gpu_cache_slots = cache_slots if experts == "cpu" else 0
        return engine

    def _routed(self) -> dict:
        """MoE layer -> its routed-experts backend."""
        return {i: b.ffn.experts for i, b in enumerate(self.model.blocks) if isinstance(b.ffn, MoE)}

    def tier_report(self) -> str:
        """One line on the expert tiers since load: RAM hit rate, disk traffic, prefetch precision/recall, GPU cache."""
        parts = []
        if self.tiers:
            stats = [t.stats for t in self.tiers.values()]
            steps = max(1, max(s.steps for s in stats))
            hit = sum(s.hit_rate for s in stats) / len(stats)
            parts.append(f"RAM hit rate {hit:.2f}, {sum(s.bytes_read for s in stats) / steps / 1e6:.0f} MB read from "
                         f"disk per step")  # fmt: skip
            predicted = [s for s in stats if s.predicted]
            if predicted:
                parts.append(f"prefetch precision {sum(s.precision for s in predicted) / len(predicted):.2f} "
                             f"recall {sum(s.recall for s in predicted) / len(predicted):.2f}")  # fmt: skip
        caches = [c for e in self._routed().values() if (c := getattr(e, "gpu_cache", None)) is not None]
        if caches:
            parts.append(f"GPU cache {self.gpu_cache_slots}/layer, "
                         f"{sum(c.hit_rate for c in caches) / len(caches):.0%} of assignments")  # fmt: skip
        return "; ".join(parts)

    def _check_ids(self, ids: list[int], new_tokens: int = 0) -> torch.Tensor:
        if not ids:
            raise ValueError("ids must hold at least one token")
        t = torch.tensor(ids, dtype=torch.long)
        if int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        if len(ids) + new_tokens > self.max_context:
            raise ValueError(f"{len(ids)} prompt tokens + {new_tokens} new tokens exceed this engine's context of "
                             f"{self.max_context} tokens")  # fmt: skip
        return t

    def _cache(self, tokens: int) -> KVCache:
        return KVCache(self.cfg, tokens, self.kv_dtype, torch.zeros if self.gpu is None else self.gpu.zeros)

    def _prefill(self, t: torch.Tensor, cache: KVCache, last_only: bool, offset: int = 0) -> torch.Tensor:
        """Forward tokens t at positions offset.. (the cache holds positions before offset)."""
        outs = []
        for start in range(0, len(t), self.PREFILL_CHUNK):
            chunk = t[start : start + self.PREFILL_CHUNK]
            outs.append(self.model.forward(chunk, offset + start, cache, last_only=last_only).float().cpu())
        return outs[-1] if last_only else torch.cat(outs)

    def enable_prefix_cache(self, mem: int | str | None = None, directory: str | Path | None = None) -> None:
        """Keep the latents of finished requests (host RAM, `mem` bytes; default half the RAM the plan leaves
        free, at most 16 GiB; 0 disables) so generate() prefills only what is new; with `directory`, evicted and
        (at close_prefix_cache) remaining prefixes go to disk and are read back after a restart."""
        budget = parse_bytes(mem) if mem is not None else _default_prefix_budget(self.plan)
        if budget <= 0:
            self.prefix_cache = None
            return
        store = None
        if directory is not None:
            if self.path is None:
                raise ValueError("a prefix-cache directory needs a checkpoint path (the model's identity)")
            store = PrefixStore(directory, model_identity(self.path, self.kv_dtype))
        self.prefix_cache = PrefixCache(budget, store)

    def close_prefix_cache(self) -> None:
        """Write what the prefix cache holds to its directory (a no-op without one)."""
        if self.prefix_cache is not None:
            self.prefix_cache.close()

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Full causal forward: float32 logits [len(ids), vocab_size] on the CPU."""
        t = self._check_ids(ids)
        return self._prefill(t, self._cache(len(ids)), last_only=False)

    def generate(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:  # fmt: skip
        """Yield new token ids one at a time: prefill the prompt, then decode against the latent KV cache."""
        t = self._check_ids(ids, max(0, max_new_tokens))
        if max_new_tokens <= 0:
            return
        stop = set(stop_ids)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        cache, logits = self._start(ids, t, len(ids) + max_new_tokens)
        fed = list(ids)  # tokens whose latents the cache holds
        try:
            pos = len(ids)
            for i in range(max_new_tokens):
                token = sample(logits, temperature, top_p, generator)
                self.last_logits = logits  # what `token` was drawn from (logprobs)
                yield token
                if token in stop or i == max_new_tokens - 1:
                    return
                logits = self.model.forward(torch.tensor([token]), pos, cache, last_only=True)[0].float().cpu()
                fed.append(token)
                pos += 1
        finally:
            self._remember(fed, cache)

    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [vocab_size] of the token after ids, reusing (and then extending) the prefix cache."""
        t = self._check_ids(ids)
        cache, logits = self._start(ids, t, len(ids))
        self._remember(list(ids), cache)
        return logits

    def _start(self, ids: list[int], t: torch.Tensor, capacity: int) -> tuple[KVCache, torch.Tensor]:
        """A cache holding the prompt's latents and the logits after it: the longest cached prefix is copied in
        (never the last token: its logits are needed), the rest prefilled."""
        cache = self._cache(capacity)
        reused = self.prefix_cache.match(ids, cache, len(ids) - 1) if self.prefix_cache is not None else 0
        self.last_cached_tokens = reused
        return cache, self._prefill(t[reused:], cache, last_only=True, offset=reused)[0]

    def _remember(self, ids: list[int], cache: KVCache) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.insert(ids, cache)


def _default_prefix_budget(p: Plan | None) -> int:
    free = p.host_budget - p.bytes_on("host") if p is not None else 0
    return int(min(max(0, free) // 2, 16 * 2**30))


def _hybrid_factory(source: TensorSource, worker: ExpertWorker, dev, slots: int, cache_slots: int, n_moe: int):
    """Per MoE layer: stack the experts (pinned when a GPU may stream them) or, with `slots`, give the layer that
    many RAM slots over the checkpoint's files (the disk tier); with `cache_slots`, a hot-expert cache in VRAM;
    wrap them in the hybrid backend."""
    from .cpu_experts import stack_experts
    from .gpu_cache import GpuExpertCache, SwapBudget, device_slots
    from .gpu_experts import HybridExperts, StreamedExperts, measure_rates
    from .tiers import IoPools, LayerTier

    cuda = dev is not None
    register = dev.register_host if cuda else None
    shared: dict = {}
    swaps = SwapBudget(per_step=SWAPS_PER_TOKEN / max(1, n_moe))

    def factory(layer, routed, names):
        E = len(routed)
        if slots:
            io = shared.setdefault("io", IoPools())
            template = stack_experts(routed[:1], source, names[:6])
            tier = LayerTier(layer, E, slots, template, source.tensors, io, register)
            cache = GpuExpertCache(template, E, cache_slots, dev, swaps) if cache_slots else None
            return HybridExperts(None, worker, tier=tier, gpu_cache=cache)
        stack = stack_experts(routed, source, names, register)
        if not cuda:
            return HybridExperts(stack, worker)
        if not shared:
            shared["staging"] = device_slots(stack, 2, dev)
            shared["rates"] = measure_rates(stack, worker, dev)
        cache = GpuExpertCache(stack, E, cache_slots, dev, swaps) if cache_slots else None
        return HybridExperts(stack, worker, StreamedExperts(stack, dev, shared["staging"]), shared["rates"],
                             gpu_cache=cache)  # fmt: skip

    return factory
