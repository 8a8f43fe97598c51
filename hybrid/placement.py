"""Placement: the one place that decides where every part of the model lives, before anything is loaded.

From a config (and, for a checkpoint directory, the safetensors headers' dtypes), a GPU budget, a host-RAM
budget and a context length, `plan()` returns a frozen Plan: each component's bytes and device, the KV-cache
capacity, VRAM left for a hot-expert cache, and the decode speed the host read bandwidth allows.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint, tensor_nbytes
from .config import ModelConfig
from .schema import expected_tensors

GiB = 1 << 30
GPU_RESERVE = 1 * GiB  # CUDA context, activations and scratch buffers of one decode step and a prefill chunk
KV_BYTES = 2  # the latent KV cache is kept in bf16
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(gpu_bytes=self.bytes_on("gpu"), host_bytes=self.bytes_on("host"), disk_bytes=self.bytes_on("disk"),
                 expected_decode_tps=round(self.expected_decode_tps, 3))  # fmt: skip
        return d


def component_bytes(cfg: ModelConfig, dtypes: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes per component; dtypes maps tensor name -> safetensors dtype (default: K2's published dtypes)."""
    sizes: dict[str, int] = {}
    for name, spec in expected_tensors(cfg).items():
        dtype = (dtypes or {}).get(name, spec.dtypes[0])
        key = _component_of(name)
        sizes[key] = sizes.get(key, 0) + tensor_nbytes(dtype, spec.shape)
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
         dtypes: dict[str, str] | None = None) -> Plan:  # fmt: skip
    """Place everything; raise PlanError when the GPU part cannot fit.

    context None: the longest context whose KV cache fits beside the weights (at most max_position_embeddings).
    """
    sizes = component_bytes(cfg, dtypes)
    if context is None:
        context = _longest_context(cfg, gpu_mem, sizes)
    if context <= 0:
        raise PlanError(f"context must be positive, got {context}")
    if context > cfg.max_position_embeddings:
        raise PlanError(f"context {context} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    kv_per_token = _kv_per_token(cfg)
    gpu_parts = _gpu_parts(sizes)
    gpu_need = sum(sizes[k] for k in gpu_parts) + kv_per_token * context + GPU_RESERVE
    if gpu_need > gpu_mem:
        detail = ", ".join(f"{k} {_gib(sizes[k])}" for k in gpu_parts)
        raise PlanError(
            f"the GPU part does not fit: it needs {_gib(gpu_need)} ({detail}, KV cache for {context} tokens "
            f"{_gib(kv_per_token * context)}, reserve {_gib(GPU_RESERVE)}) but the GPU budget is {_gib(gpu_mem)}: "
            f"short by {_gib(gpu_need - gpu_mem)}. Use a shorter --context or a larger GPU."
        )
    notes = []
    embed_on_gpu = gpu_need + sizes["embeddings"] <= gpu_mem
    if embed_on_gpu:
        gpu_need += sizes["embeddings"]
    else:
        notes.append("embeddings stay in host RAM (a row lookup per token); the GPU budget has no room for them")
    routed = sizes.get("routed experts", 0)
    host_need = routed + (0 if embed_on_gpu else sizes["embeddings"])
    routed_device = "host"
    if host_need > host_mem:
        routed_device = "disk"
        notes.append(f"host RAM {_gib(host_mem)} is {_gib(host_need - host_mem)} short of the routed experts: "
                     "they would need the disk tier, which is not supported yet")  # fmt: skip
    components = [Component(k, sizes[k], "gpu") for k in gpu_parts]
    components.append(Component("embeddings", sizes["embeddings"], "gpu" if embed_on_gpu else "host"))
    components.append(Component("KV cache", kv_per_token * context, "gpu"))
    if routed:
        components.append(Component("routed experts", routed, routed_device))
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = routed // max(1, n_moe * cfg.n_routed_experts)
    return Plan(
        components=tuple(components), gpu_budget=gpu_mem, host_budget=host_mem, context=context,
        kv_bytes_per_token=kv_per_token, kv_capacity_tokens=context, gpu_free_for_expert_cache=gpu_mem - gpu_need,
        routed_bytes_per_token=per_expert * cfg.num_experts_per_tok * n_moe, host_read_gbs=host_read_gbs,
        notes=tuple(notes),
    )  # fmt: skip


def _gpu_parts(sizes: dict[str, int]) -> list[str]:
    return [k for k in ("attention (MLA)", "shared experts", "dense MLP", "router", "norms", "lm_head") if k in sizes]


def _kv_per_token(cfg: ModelConfig) -> int:
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * KV_BYTES


def _longest_context(cfg: ModelConfig, gpu_mem: int, sizes: dict[str, int]) -> int:
    free = gpu_mem - GPU_RESERVE - sum(sizes[k] for k in _gpu_parts(sizes))
    return min(cfg.max_position_embeddings, max(1, free // _kv_per_token(cfg)))  # 1 token: let plan() say why


def checkpoint_dtypes(path: str | Path) -> dict[str, str]:
    """Tensor dtypes from the safetensors headers alone (no weight is read)."""
    return {name: info.dtype for name, info in Checkpoint(path).tensors.items()}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.2f} MiB"


def format_plan(p: Plan) -> str:
    rows = [f"{'component':<18}{'device':>8}{'size':>14}"]
    for c in p.components:
        rows.append(f"{c.name:<18}{c.device:>8}{_gib(c.nbytes):>14}")
    rows.append("")
    rows.append(f"GPU: {_gib(p.bytes_on('gpu'))} of {_gib(p.gpu_budget)} (+ {_gib(GPU_RESERVE)} reserve); "
                f"{_gib(p.gpu_free_for_expert_cache)} free for a hot-expert cache")  # fmt: skip
    rows.append(f"host RAM: {_gib(p.bytes_on('host'))} of {_gib(p.host_budget)}")
    rows.append(f"KV cache: {p.kv_bytes_per_token:,} bytes/token, {p.kv_capacity_tokens:,} tokens")
    per_token = p.routed_bytes_per_token / 1e9
    if any(c.device == "disk" for c in p.components):
        rows.append(f"decode: {per_token:.2f} GB of routed experts per token; no speed estimate without the disk tier")
    elif p.host_read_gbs:
        rows.append(f"decode: {per_token:.2f} GB of routed experts per token at {p.host_read_gbs:.1f} GB/s host read "
                    f"-> at most {p.expected_decode_tps:.2f} tokens/s")  # fmt: skip
    else:
        rows.append(f"decode: {per_token:.2f} GB of routed experts per token (give --host-read-gbs for tokens/s)")
    rows += [f"note: {n}" for n in p.notes]
    return "\n".join(rows)
