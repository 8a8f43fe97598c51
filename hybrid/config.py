"""Model configuration read straight from a Kimi-K2 / DeepSeek-V3 style config.json.

`kimi_k2` is not a model type transformers knows, so there is no AutoConfig here: the fields map one-to-one onto
the JSON keys, and anything the runtime cannot compute exactly is refused with the field's name. `kimi_k25`
(K2.5+, multimodal) nests the text model's config under `text_config` and its tensors under `language_model.`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3", "kimi_k25")
FP8_BLOCK = 128
INT4_GROUP = 32
K25_PREFIX = "language_model."  # where kimi_k25 keeps the text model's tensors


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
class Quantization:
    """How the checkpoint stores its linears: "fp8" (block-fp8 everywhere: K2-Instruct) or "int4" (compressed-tensors
    pack-quantized: every Linear not matched by `ignore` is INT4, the rest bf16: K2-Thinking, K2.5+)."""

    method: str = "fp8"
    ignore: tuple[str, ...] = ()

    def format_of(self, module: str) -> str:
        """"fp8", "int4" or "bf16" for a linear module, named as in the checkpoint (prefix included)."""
        if self.method == "fp8":
            return "fp8"
        return "bf16" if any(_ignored(pattern, module) for pattern in self.ignore) else "int4"


def _ignored(pattern: str, module: str) -> bool:
    # compressed-tensors' rule: "re:" entries are regular expressions matched at the start of the module name
    return bool(re.match(pattern[3:], module)) if pattern.startswith("re:") else pattern == module


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
    quantization: Quantization = Quantization()
    tensor_prefix: str = ""  # prepended to every text-model tensor name in the checkpoint ("language_model." in K2.5)

    def format_of(self, module: str) -> str:
        """The weight format ("fp8", "int4", "bf16") of a linear module named without the tensor prefix."""
        return self.quantization.format_of(self.tensor_prefix + module)

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
    prefix = ""
    if model_type == "kimi_k25":  # the text model is text_config; the vision tower is not run (text only)
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise fail("text_config", "is missing; a kimi_k25 config nests the text model's config there")
        if "quantization_config" in raw and "quantization_config" not in text:
            text = dict(text, quantization_config=raw["quantization_config"])
        for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):
            if key in raw and key not in text:
                text = dict(text, **{key: raw[key]})
        raw, prefix, model_type = text, K25_PREFIX, "kimi_k2"
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

    block, quantization = _parse_quantization(raw, fail)
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
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0, quantization=quantization,
        tensor_prefix=prefix,
    )  # fmt: skip
    return ModelConfig(**kwargs)


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def _parse_quantization(raw: dict, fail) -> tuple[tuple[int, int], Quantization]:
    q = raw.get("quantization_config")
    if q is None:
        raise fail("quantization_config", "is missing; hybrid reads the fp8 and INT4 checkpoints as published")
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return (FP8_BLOCK, FP8_BLOCK), _parse_compressed_tensors(q, fail)
    if method != "fp8":
        raise fail("quantization_config.quant_method", f"is {method!r}; supported: 'fp8', 'compressed-tensors'")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise fail("quantization_config.fmt", f"is {fmt!r}; only 'e4m3' is supported")
    block = tuple(q.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))
    if block != (FP8_BLOCK, FP8_BLOCK):
        raise fail("quantization_config.weight_block_size", f"is {list(block)}; only [128, 128] is supported")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise fail("quantization_config.activation_scheme", f"is {q['activation_scheme']!r}; expected 'dynamic'")
    return block, Quantization("fp8")


# compressed-tensors weight fields and the only values this runtime computes (K2-Thinking / K2.5's scheme)
_INT4_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": INT4_GROUP,
                 "dynamic": False}  # fmt: skip


def _parse_compressed_tensors(q: dict, fail) -> Quantization:
    """K2-Thinking / K2.5: int4 group-32 symmetric weights, no activation quantization; anything else is refused."""
    base = "quantization_config"
    if q.get("format") != "pack-quantized":
        raise fail(f"{base}.format", f"is {q.get('format')!r}; only 'pack-quantized' is supported")
    if q.get("quantization_status", "compressed") != "compressed":
        raise fail(f"{base}.quantization_status", f"is {q['quantization_status']!r}; expected 'compressed'")
    if q.get("kv_cache_scheme") is not None:
        raise fail(f"{base}.kv_cache_scheme", "is set; a quantized KV cache is not supported")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise fail(f"{base}.config_groups", "must hold exactly one group (int4 weights)")
    (name, group), = groups.items()
    where = f"{base}.config_groups.{name}"
    if not isinstance(group, dict) or "Linear" not in (group.get("targets") or []):
        raise fail(f"{where}.targets", "must include 'Linear'")
    for kind in ("input_activations", "output_activations"):
        if group.get(kind) is not None:
            raise fail(f"{where}.{kind}", "is set; activation quantization is not supported")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise fail(f"{where}.weights", "is missing")
    for key, want in _INT4_WEIGHTS.items():
        if weights.get(key) != want:
            raise fail(f"{where}.weights.{key}", f"is {weights.get(key)!r}; only {want!r} is supported")
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise fail(f"{base}.ignore", "must be a list of module names or 're:' patterns")
    for pattern in ignore:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise fail(f"{base}.ignore", f"holds an invalid regular expression {pattern!r} ({e})") from None
    return Quantization("int4", tuple(ignore))


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
