"""Model configuration read straight from a Kimi-K2 / DeepSeek-V3 style config.json.

`kimi_k2` is not a model type transformers knows, so there is no AutoConfig here: the fields map one-to-one onto
the JSON keys, and anything the runtime cannot compute exactly is refused with the field's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
FP8_BLOCK = 128


class ConfigError(ValueError):
    """config.json holds a value this runtime does not support (the message names the field)."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters, kept with transformers' defaults so the numbers match its implementation."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    weight_block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN, as transformers applies it."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found (a checkpoint directory must hold config.json)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return _parse(raw, str(path))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim",
)  # fmt: skip


def _parse(raw: dict, source: str) -> ModelConfig:
    def fail(field: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: field '{field}' {why}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise fail("model_type", f"is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name in _REQUIRED:
        if name not in raw:
            raise fail(name, "is missing")
        if not isinstance(raw[name], int) or isinstance(raw[name], bool) or raw[name] <= 0:
            raise fail(name, f"must be a positive integer, got {raw[name]!r}")

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise fail("hidden_act", f"is {act!r}; only 'silu' (SwiGLU experts) is supported")
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise fail("scoring_func", f"is {raw['scoring_func']!r}; only 'sigmoid' is supported")
    if raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise fail("topk_method", f"is {raw['topk_method']!r}; only 'noaux_tc' is supported")
    if raw.get("attention_bias", False):
        raise fail("attention_bias", "is true; Kimi-K2 / DeepSeek-V3 attention has no bias")
    kv_heads = raw.get("num_key_value_heads", raw["num_attention_heads"])
    if kv_heads != raw["num_attention_heads"]:
        raise fail("num_key_value_heads", f"is {kv_heads}; MLA needs it equal to num_attention_heads")

    block = _parse_quantization(raw, fail)
    rope_scaling = _parse_rope_scaling(raw, fail)

    n_group = raw.get("n_group") or 1
    topk_group = raw.get("topk_group") or 1
    if raw["n_routed_experts"] % n_group:
        raise fail("n_group", f"({n_group}) must divide n_routed_experts ({raw['n_routed_experts']})")
    if topk_group > n_group:
        raise fail("topk_group", f"({topk_group}) exceeds n_group ({n_group})")
    if raw["num_experts_per_tok"] > raw["n_routed_experts"]:
        raise fail("num_experts_per_tok", "exceeds n_routed_experts")
    if raw.get("first_k_dense_replace", 0) > raw["num_hidden_layers"]:
        raise fail("first_k_dense_replace", "exceeds num_hidden_layers")

    known = {f.name for f in fields(ModelConfig)}
    kwargs = {k: raw[k] for k in known if k in raw and raw[k] is not None}
    kwargs.update(
        model_type=model_type, n_group=n_group, topk_group=topk_group, rope_scaling=rope_scaling,
        weight_block_size=block, eos_token_id=_first_id(raw.get("eos_token_id")),
        q_lora_rank=raw.get("q_lora_rank") or None, n_shared_experts=raw.get("n_shared_experts") or 0,
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
    )  # fmt: skip
    return ModelConfig(**kwargs)


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def _parse_quantization(raw: dict, fail) -> tuple[int, int]:
    q = raw.get("quantization_config")
    if q is None:
        raise fail("quantization_config", "is missing; hybrid reads fp8 block-quantized checkpoints as published")
    method = q.get("quant_method")
    if method != "fp8":
        raise fail("quantization_config.quant_method", f"is {method!r}; only 'fp8' is supported")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise fail("quantization_config.fmt", f"is {fmt!r}; only 'e4m3' is supported")
    block = tuple(q.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))
    if block != (FP8_BLOCK, FP8_BLOCK):
        raise fail("quantization_config.weight_block_size", f"is {list(block)}; only [128, 128] is supported")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise fail("quantization_config.activation_scheme", f"is {q['activation_scheme']!r}; expected 'dynamic'")
    return block


def _parse_rope_scaling(raw: dict, fail) -> RopeScaling | None:
    rs = raw.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise fail("rope_scaling.type", f"is {kind!r}; only 'yarn' is supported")
    original = rs.get("original_max_position_embeddings")
    if not original:
        raise fail("rope_scaling.original_max_position_embeddings", "is missing")
    factor = rs.get("factor") or raw.get("max_position_embeddings", original) / original
    return RopeScaling(
        factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(rs.get("beta_fast") or 32.0), beta_slow=float(rs.get("beta_slow") or 1.0),
        mscale=rs.get("mscale"), mscale_all_dim=rs.get("mscale_all_dim"),
        attention_factor=rs.get("attention_factor"), truncate=bool(rs.get("truncate", True)),
    )  # fmt: skip
