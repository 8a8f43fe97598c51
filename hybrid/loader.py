"""Build the model from a validated checkpoint: every parameter filled exactly once, from mapped memory."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from tqdm import tqdm

from .config import ModelConfig
from .formats import FORMATS
from .model import MLP, Attention, Block, LoopExperts, MoE, Router, RoutedExperts, Transformer
from .schema import expected_tensors

# (layer, its routed experts, the checkpoint names of their tensors) -> the backend that computes them
ExpertsFactory = Callable[[int, list[MLP], list[str]], RoutedExperts]


def reference_experts(layer: int, experts: list[MLP], names: list[str]) -> RoutedExperts:
    return LoopExperts(experts)


class TensorTaker:
    """Hands out tensors by checkpoint name and remembers which were used, so nothing is silently left behind.

    `linear(module)`, when given, builds every linear's weight itself (training); by default the weight object of
    the module's format (`formats.FORMATS`) is built from its checkpoint tensors.
    """

    def __init__(self, get: Callable[[str], torch.Tensor], linear: Callable[[str], object] | None = None,
                 format_of: Callable[[str], str] = lambda module: "fp8"):  # fmt: skip
        self.get, self.linear, self.format_of, self.used = get, linear, format_of, set()

    def __call__(self, name: str):
        if name in self.used:
            raise AssertionError(f"tensor '{name}' assigned twice")
        self.used.add(name)
        return self.get(name)

    def weight(self, module: str):
        fmt = FORMATS[self.format_of(module)]
        if self.linear is not None:
            self.used.update(f"{module}.{suffix}" for suffix in fmt.tensors)
            return self.linear(module)
        return fmt.build({suffix: self(f"{module}.{suffix}") for suffix in fmt.tensors})

    def mlp(self, prefix: str) -> MLP:
        return MLP(*(self.weight(f"{prefix}.{proj}") for proj in ("gate_proj", "up_proj", "down_proj")))


def mlp_tensor_names(mlp: str, fmt: str = "fp8") -> list[str]:
    """The six stacked checkpoint tensors of an MLP module in `fmt`, in stack field order (gate, gate_s, up, up_s,
    down, down_s): fp8 `weight` + `weight_scale_inv`, INT4 `weight_packed` + `weight_scale`."""
    return [f"{mlp}.{proj}.{suffix}" for proj in ("gate_proj", "up_proj", "down_proj")
            for suffix in FORMATS[fmt].suffixes]  # fmt: skip


class TensorSource(Protocol):
    """Tensors by checkpoint name: a Checkpoint, or synthetic weights made on demand (benchmarks)."""

    def get(self, name: str) -> torch.Tensor: ...

    def release(self, name: str) -> None: ...


def assemble(cfg: ModelConfig, get: Callable[[str], torch.Tensor], experts: ExpertsFactory = reference_experts,
             progress: bool = True, linear: Callable[[str], object] | None = None) -> Transformer:  # fmt: skip
    """Build the model from get(name) (which also places each tensor) and check every expected tensor was used.
    linear(module), when given, builds each linear's weight object (e.g. requantized)."""
    take = TensorTaker(get, linear, format_of=cfg.format_of)
    model = build_transformer(cfg, take, experts, progress)
    missed = expected_tensors(cfg).keys() - take.used
    if missed:
        raise AssertionError(f"loader left {len(missed)} expected tensors unused, e.g. {sorted(missed)[:3]}")
    return model


def build_transformer(cfg: ModelConfig, take: TensorTaker, experts: ExpertsFactory = reference_experts,
                      progress: bool = False) -> Transformer:  # fmt: skip
    """Assemble the model from tensors named as in the checkpoint (also used to train the demo model)."""
    blocks = []
    for i in tqdm(range(cfg.num_hidden_layers), desc="loading layers", disable=not progress, unit="layer"):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        q_lora = bool(cfg.q_lora_rank)
        attn = Attention(
            cfg, i,
            q_a=take.weight(f"{a}.q_a_proj") if q_lora else None,
            q_a_norm=take(f"{a}.q_a_layernorm.weight") if q_lora else None,
            q_b=take.weight(f"{a}.q_b_proj" if q_lora else f"{a}.q_proj"),
            kv_a=take.weight(f"{a}.kv_a_proj_with_mqa"), kv_a_norm=take(f"{a}.kv_a_layernorm.weight"),
            kv_b=take.weight(f"{a}.kv_b_proj"), o=take.weight(f"{a}.o_proj"),
        )  # fmt: skip
        if cfg.is_moe_layer(i):
            router = Router(cfg, take(f"{p}.mlp.gate.weight"), take(f"{p}.mlp.gate.e_score_correction_bias"))
            modules = [f"{p}.mlp.experts.{e}" for e in range(cfg.n_routed_experts)]
            routed = [take.mlp(m) for m in modules]
            shared = take.mlp(f"{p}.mlp.shared_experts") if cfg.n_shared_experts else None
            names = [n for m in modules for n in mlp_tensor_names(m, cfg.format_of(f"{m}.gate_proj"))]
            ffn = MoE(router, experts(i, routed, names), shared)
        else:
            ffn = take.mlp(f"{p}.mlp")
        blocks.append(Block(take(f"{p}.input_layernorm.weight"), attn, take(f"{p}.post_attention_layernorm.weight"),
                            ffn, cfg.rms_norm_eps))  # fmt: skip
    embed = take("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else take("lm_head.weight")
    return Transformer(cfg, embed, blocks, take("model.norm.weight"), lm_head)
