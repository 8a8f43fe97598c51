"""Placement: the one place that decides where every part of the model lives, before anything is loaded.

From a config (and, for a checkpoint directory, the safetensors headers' dtypes), a GPU budget, a host-RAM
budget and a context length, `plan()` returns a frozen Plan: each component's bytes and device, the KV-cache
capacity, VRAM left for a hot-expert cache, and the decode speed the host read bandwidth allows.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint, tensor_nbytes
from .config import ModelConfig
from .schema import expected_tensors, linear_specs, scale_shape

GiB = 1 << 30
GPU_RESERVE = 1 * GiB  # CUDA context, activations and scratch buffers of one decode step and a prefill chunk
KV_BYTES = 2  # the latent KV cache is kept in bf16 on the GPU (fp32 in CPU-only mode)
CPU_DEFAULT_CONTEXT = 8192
STREAMING_SLOTS = 2  # experts' worth of VRAM for the double-buffered long-prefill streaming
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


class PlanError(ValueError):
    """The budgets cannot hold the model; the message says what does not fit and by how much."""


def parse_bytes(text: str | int | float) -> int:
    """'24GiB', '1100 GiB', '80GB', '512MiB' or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (examples: 24GiB, 1100GiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Component:
    name: str
    nbytes: int
    device: str  # "gpu", "host" or "disk"


@dataclass(frozen=True)
class Plan:
    components: tuple[Component, ...]
    gpu_budget: int
    host_budget: int
    context: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int  # tokens of KV cache the plan allocates on the GPU
    gpu_free_for_expert_cache: int
    routed_bytes_per_token: int  # expert bytes a batch-1 decode step reads (top-k per MoE layer)
    host_read_gbs: float
    expert_slots: int = 0  # RAM slots per MoE layer; fewer than n_routed_experts means a disk tier
    expert_bytes: int = 0  # one routed expert (gate + up + down with scales)
    disk_read_gbs: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def device_of(self, tensor: str) -> str:
        """Where a checkpoint tensor lives: "gpu", "host" or "disk"."""
        component = _component_of(tensor)
        return next((c.device for c in self.components if c.name == component), "gpu")

    def bytes_on(self, device: str) -> int:
        return sum(c.nbytes for c in self.components if c.device == device)

    @property
    def expected_decode_tps(self) -> float:
        """Upper bound of batch-1 decode from host bandwidth alone (GPU time assumed hidden behind it)."""
        return self.host_read_gbs * 1e9 / self.routed_bytes_per_token if self.host_read_gbs else 0.0

    def tps_range(self, ram_fraction: float) -> tuple[float, float] | None:
        """Decode tokens/s with `ram_fraction` of each layer's experts in RAM and the rest read from disk, assuming
        a needed expert is in RAM with that probability (uniform routing: real routing is skewed, so hits are
        likelier). (no overlap of disk reads with compute, perfect prefetch); None without the bandwidths."""
        if not self.host_read_gbs or (ram_fraction < 1 and not self.disk_read_gbs):
            return None
        ram_s = self.routed_bytes_per_token * ram_fraction / (self.host_read_gbs * 1e9)
        disk_s = self.routed_bytes_per_token * (1 - ram_fraction) / (self.disk_read_gbs * 1e9) if ram_fraction < 1 else 0
        return 1 / (ram_s + disk_s), 1 / max(ram_s, disk_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(gpu_bytes=self.bytes_on("gpu"), host_bytes=self.bytes_on("host"), disk_bytes=self.bytes_on("disk"),
                 expected_decode_tps=round(self.expected_decode_tps, 3))  # fmt: skip
        return d


def component_bytes(cfg: ModelConfig, dtypes: dict[str, str] | None = None,
                    gpu_weights: str = "bf16") -> dict[str, int]:
    """Bytes per component as held in memory; dtypes maps tensor name -> safetensors dtype (default: the published
    dtypes). gpu_weights "fp8": bf16 linears outside the routed experts counted as requantized to block-fp8."""
    if dtypes is None:  # presets: ~70K tensors at K2 size, counted once per config
        return dict(_published_bytes(cfg, gpu_weights))
    return _bytes(cfg, dtypes, gpu_weights)


@functools.lru_cache(maxsize=16)
def _published_bytes(cfg: ModelConfig, gpu_weights: str) -> dict[str, int]:
    return _bytes(cfg, {}, gpu_weights)


def _requantizable(cfg: ModelConfig) -> bool:
    """Whether --gpu-weights fp8 changes anything: bf16 linears outside the routed experts (INT4 checkpoints)."""
    return any(cfg.format_of(m) == "bf16" and ".mlp.experts." not in m for m in linear_specs(cfg))


def _bytes(cfg: ModelConfig, dtypes: dict[str, str], gpu_weights: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    requantized = {f"{m}.weight" for m in linear_specs(cfg)
                   if gpu_weights == "fp8" and cfg.format_of(m) == "bf16" and ".mlp.experts." not in m}  # fmt: skip
    for name, spec in expected_tensors(cfg).items():
        if spec.kind == "int4_shape":
            continue  # checked at load, not kept
        key = _component_of(name)
        if name in requantized:
            n = tensor_nbytes("F8_E4M3", spec.shape) + tensor_nbytes("F32", scale_shape(spec.shape))
        else:
            n = tensor_nbytes(dtypes.get(name, spec.dtypes[0]), spec.shape)
        sizes[key] = sizes.get(key, 0) + n
    return sizes


def _component_of(name: str) -> str:
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".self_attn." in name and name.endswith(("weight", "weight_scale_inv")) and "layernorm" not in name:
        return "attention (MLA)"
    if ".mlp.gate." in name:
        return "router"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return "dense MLP"
    if name == "model.embed_tokens.weight":
        return "embeddings"
    if name == "lm_head.weight":
        return "lm_head"
    return "norms"


def plan(cfg: ModelConfig, gpu_mem: int, host_mem: int, context: int | None, host_read_gbs: float = 0.0,
         dtypes: dict[str, str] | None = None, gpu: bool = True, kv_bytes: int = KV_BYTES,
         disk_read_gbs: float = 0.0, gpu_weights: str = "bf16") -> Plan:  # fmt: skip
    """Place everything; raise PlanError when the GPU part (or, without a GPU, the non-expert part) cannot fit.

    context None: with a GPU the longest context whose KV cache fits beside the weights, without one
    CPU_DEFAULT_CONTEXT (both at most max_position_embeddings). gpu False: what would go to the GPU stays in host
    RAM (CPU-only mode). Routed experts take the host RAM left: whole layers' worth, or a number of slots per
    layer with the rest on the disk tier (at least top-k per layer, or the plan is refused).
    """
    sizes = component_bytes(cfg, dtypes, gpu_weights)
    kv_per_token = _kv_per_token(cfg, kv_bytes)
    if context is None:
        context = _longest_context(cfg, gpu_mem, sizes, kv_per_token) if gpu else min(
            CPU_DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if context <= 0:
        raise PlanError(f"context must be positive, got {context}")
    if context > cfg.max_position_embeddings:
        raise PlanError(f"context {context} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    fast = "gpu" if gpu else "host"
    gpu_parts = _gpu_parts(sizes) + ([] if gpu else ["embeddings"])
    fixed = sum(sizes[k] for k in gpu_parts) + kv_per_token * context + (GPU_RESERVE if gpu else 0)
    budget = gpu_mem if gpu else host_mem
    if fixed > budget:
        detail = ", ".join(f"{k} {_gib(sizes[k])}" for k in gpu_parts)
        where = "GPU" if gpu else "host RAM"
        fp8 = gpu and gpu_weights == "bf16" and _requantizable(cfg)
        raise PlanError(
            f"the {'GPU' if gpu else 'non-expert'} part does not fit: it needs {_gib(fixed)} ({detail}, KV cache for "
            f"{context} tokens {_gib(kv_per_token * context)}{f', reserve {_gib(GPU_RESERVE)}' if gpu else ''}) but "
            f"the {where} budget is {_gib(budget)}: short by {_gib(fixed - budget)}. Use a shorter --context"
            f"{', --gpu-weights fp8 (bf16 linears requantized to block-fp8 at load)' if fp8 else ''} or a "
            f"larger {'GPU' if gpu else 'host RAM budget'}."
        )
    notes = []
    if gpu_weights == "fp8" and _requantizable(cfg):
        notes.append("bf16 linears outside the routed experts are requantized to block-fp8 at load (--gpu-weights fp8)")
    embed_on_fast = not gpu or fixed + sizes["embeddings"] <= budget
    if gpu and embed_on_fast:
        fixed += sizes["embeddings"]
    elif gpu:
        notes.append("embeddings stay in host RAM (a row lookup per token); the GPU budget has no room for them")
    host_left = host_mem - (fixed if not gpu else 0 if embed_on_fast else sizes["embeddings"])
    routed = sizes.get("routed experts", 0)
    n_moe = cfg.moe_layers
    per_expert = routed // max(1, n_moe * cfg.n_routed_experts)
    slots = min(cfg.n_routed_experts, max(0, host_left) // max(1, per_expert * n_moe)) if routed else cfg.n_routed_experts
    if routed and slots < cfg.num_experts_per_tok:
        need = cfg.num_experts_per_tok * per_expert * n_moe - host_left
        raise PlanError(f"host RAM cannot hold even {cfg.num_experts_per_tok} experts per layer (top-k) besides the "
                        f"rest: short by {_gib(need)}")  # fmt: skip
    components = [Component(k, sizes[k], fast) for k in gpu_parts if k != "embeddings"]
    components.append(Component("embeddings", sizes["embeddings"], fast if embed_on_fast else "host"))
    components.append(Component("KV cache", kv_per_token * context, fast))
    if routed:
        in_ram = slots * per_expert * n_moe
        components.append(Component("routed experts", in_ram, "host"))
        if slots < cfg.n_routed_experts:
            components.append(Component("routed (disk tier)", routed - in_ram, "disk"))
            notes.append(f"host RAM holds {slots} of {cfg.n_routed_experts} experts per layer "
                         f"({slots / cfg.n_routed_experts:.0%}); the rest are read from the checkpoint when needed")
    return Plan(
        components=tuple(components), gpu_budget=gpu_mem if gpu else 0, host_budget=host_mem, context=context,
        kv_bytes_per_token=kv_per_token, kv_capacity_tokens=context,
        gpu_free_for_expert_cache=gpu_mem - fixed if gpu else 0,
        routed_bytes_per_token=per_expert * cfg.num_experts_per_tok * n_moe, host_read_gbs=host_read_gbs,
        expert_slots=slots, expert_bytes=per_expert, disk_read_gbs=disk_read_gbs, notes=tuple(notes),
    )  # fmt: skip


def gpu_cache_slots(cfg: ModelConfig, p: Plan) -> int:
    """Hot-expert cache slots per MoE layer in the VRAM the plan leaves free (minus the streaming slots)."""
    free = p.gpu_free_for_expert_cache - STREAMING_SLOTS * p.expert_bytes
    return int(min(cfg.n_routed_experts, max(0, free) // max(1, p.expert_bytes * cfg.moe_layers)))


def host_mem_for(cfg: ModelConfig, slots: int, context: int | None, gpu: bool = False) -> int:
    """The host RAM budget that leaves exactly `slots` routed experts per MoE layer in RAM (benchmarks, tests)."""
    full = plan(cfg, 1 << 50, 1 << 50, context, gpu=gpu, kv_bytes=KV_BYTES if gpu else 4)
    routed = {c.name: c.nbytes for c in full.components}["routed experts"]
    return full.bytes_on("host") - routed + slots * full.expert_bytes * cfg.moe_layers


def gpu_mem_for(cfg: ModelConfig, cache_slots: int, context: int | None) -> int:
    """The GPU budget that leaves exactly `cache_slots` hot experts per MoE layer in VRAM (benchmarks, tests)."""
    own = plan(cfg, 1 << 50, 1 << 50, context)
    return own.bytes_on("gpu") + GPU_RESERVE + (cache_slots * cfg.moe_layers + STREAMING_SLOTS) * own.expert_bytes


def _gpu_parts(sizes: dict[str, int]) -> list[str]:
    return [k for k in ("attention (MLA)", "shared experts", "dense MLP", "router", "norms", "lm_head") if k in sizes]


def _kv_per_token(cfg: ModelConfig, kv_bytes: int = KV_BYTES) -> int:
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * kv_bytes


def _longest_context(cfg: ModelConfig, gpu_mem: int, sizes: dict[str, int], kv_per_token: int) -> int:
    free = gpu_mem - GPU_RESERVE - sum(sizes[k] for k in _gpu_parts(sizes))
    return min(cfg.max_position_embeddings, max(1, free // kv_per_token))  # 1 token: let plan() say why


def checkpoint_dtypes(path: str | Path, prefix: str = "") -> dict[str, str]:
    """Tensor dtypes from the safetensors headers alone (no weight is read); prefix: the config's tensor_prefix."""
    return {name: info.dtype for name, info in Checkpoint(path, prefix).tensors.items()}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.2f} MiB"


def format_plan(p: Plan) -> str:
    rows = [f"{'component':<18}{'device':>8}{'size':>14}"]
    for c in p.components:
        rows.append(f"{c.name:<18}{c.device:>8}{_gib(c.nbytes):>14}")
    rows.append("")
    if p.gpu_budget:
        rows.append(f"GPU: {_gib(p.bytes_on('gpu'))} of {_gib(p.gpu_budget)} (+ {_gib(GPU_RESERVE)} reserve); "
                    f"{_gib(p.gpu_free_for_expert_cache)} free for a hot-expert cache")  # fmt: skip
    else:
        rows.append("GPU: none (everything on the CPU)")
    rows.append(f"host RAM: {_gib(p.bytes_on('host'))} of {_gib(p.host_budget)}")
    rows.append(f"KV cache: {p.kv_bytes_per_token:,} bytes/token, {p.kv_capacity_tokens:,} tokens")
    per_token = p.routed_bytes_per_token / 1e9
    if p.host_read_gbs and not p.bytes_on("disk"):
        rows.append(f"decode: {per_token:.2f} GB of routed experts per token at {p.host_read_gbs:.1f} GB/s host read "
                    f"-> at most {p.expected_decode_tps:.2f} tokens/s")  # fmt: skip
    elif not p.host_read_gbs:
        rows.append(f"decode: {per_token:.2f} GB of routed experts per token (give --host-read-gbs for tokens/s)")
    rows += _budget_table(p)
    rows += [f"note: {n}" for n in p.notes]
    return "\n".join(rows)


def _budget_table(p: Plan) -> list[str]:
    """Expected decode speed per host-RAM budget (share of the routed experts in RAM, the rest on disk)."""
    if not p.host_read_gbs or not p.expert_bytes:
        return []
    this = p.bytes_on("host") and p.bytes_on("disk") and p.bytes_on("host") / (p.bytes_on("host") + p.bytes_on("disk"))
    fractions = sorted({1.0, 0.75, 0.5, 0.25} | ({round(this, 3)} if this else set()), reverse=True)
    rows = ["", f"routed experts in RAM vs decode tokens/s (host {p.host_read_gbs:.1f} GB/s, "
                f"disk {p.disk_read_gbs:.2f} GB/s; range: no overlap .. perfect prefetch)"]  # fmt: skip
    for f in fractions:
        r = p.tps_range(f)
        speed = "give --disk-read-gbs" if r is None else f"{r[0]:.2f} .. {r[1]:.2f}"
        mark = "  <- this plan" if this and abs(f - this) < 1e-3 or (not this and f == 1.0) else ""
        rows.append(f"  {f:>6.0%}   {speed}{mark}")
    return rows
