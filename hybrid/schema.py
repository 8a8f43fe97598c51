"""What a Kimi-K2 / DeepSeek-V3 checkpoint must hold for a given config: names, shapes, dtypes.

One table serves the validator (every expected tensor present, every key consumed or skipped) and the synthetic
checkpoint writer, so the two can never disagree.
"""

from __future__ import annotations

import re

from .checkpoint import Checkpoint, CheckpointError
from .config import ModelConfig
from .formats import FLOAT_DTYPES, FORMATS, Spec, scale_shape

__all__ = ["Spec", "scale_shape", "linear_specs", "expected_tensors", "validate", "skipped"]


def linear_specs(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every linear (module path -> [out, in]), in checkpoint order; its format is `cfg.format_of(module)`."""
    out: dict[str, tuple[int, int]] = {}
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}.self_attn"
        if cfg.q_lora_rank:
            out[f"{a}.q_a_proj"] = (cfg.q_lora_rank, h)
            out[f"{a}.q_b_proj"] = (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            out[f"{a}.q_proj"] = (nh * cfg.qk_head_dim, h)
        out[f"{a}.kv_a_proj_with_mqa"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        out[f"{a}.kv_b_proj"] = (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        out[f"{a}.o_proj"] = (h, nh * cfg.v_head_dim)
        m = f"model.layers.{i}.mlp"
        if not cfg.is_moe_layer(i):
            out.update(_mlp(m, h, cfg.intermediate_size))
            continue
        for e in range(cfg.n_routed_experts):
            out.update(_mlp(f"{m}.experts.{e}", h, cfg.moe_intermediate_size))
        if cfg.n_shared_experts:
            out.update(_mlp(f"{m}.shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts))
    return out


def _mlp(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.gate_proj": (inter, hidden), f"{prefix}.up_proj": (inter, hidden),
            f"{prefix}.down_proj": (hidden, inter)}  # fmt: skip


def expected_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    h = cfg.hidden_size
    specs: dict[str, Spec] = {"model.embed_tokens.weight": Spec((cfg.vocab_size, h), FLOAT_DTYPES)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        specs[f"{p}.input_layernorm.weight"] = Spec((h,), FLOAT_DTYPES)
        specs[f"{p}.post_attention_layernorm.weight"] = Spec((h,), FLOAT_DTYPES)
        if cfg.q_lora_rank:
            specs[f"{p}.self_attn.q_a_layernorm.weight"] = Spec((cfg.q_lora_rank,), FLOAT_DTYPES)
        specs[f"{p}.self_attn.kv_a_layernorm.weight"] = Spec((cfg.kv_lora_rank,), FLOAT_DTYPES)
        if cfg.is_moe_layer(i):
            specs[f"{p}.mlp.gate.weight"] = Spec((cfg.n_routed_experts, h), FLOAT_DTYPES)
            # DeepSeek-V3 stores the bias in fp32; K2's dtype was not read from a real header, so accept floats.
            specs[f"{p}.mlp.gate.e_score_correction_bias"] = Spec((cfg.n_routed_experts,), ("F32", "BF16", "F16"))
    for module, shape in linear_specs(cfg).items():
        for suffix, spec in FORMATS[cfg.format_of(module)].specs(shape).items():
            specs[f"{module}.{suffix}"] = spec
    specs["model.norm.weight"] = Spec((h,), FLOAT_DTYPES)
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = Spec((cfg.vocab_size, h), FLOAT_DTYPES)
    return specs


def skipped(cfg: ModelConfig, name: str) -> bool:
    """Keys a checkpoint may carry that inference does not use: MTP layers and cached rotary tables."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers:
        return True
    return name.endswith("rotary_emb.inv_freq")


def validate(ckpt: Checkpoint, cfg: ModelConfig) -> dict[str, Spec]:
    """Check the whole checkpoint against the config before any weight is used; return the expected specs."""
    specs = expected_tensors(cfg)
    for name, spec in specs.items():
        info = ckpt.tensors.get(name)
        if info is None:
            full = cfg.tensor_prefix + name
            if name.endswith(".weight_scale_inv"):
                weight = ckpt.tensors.get(name[: -len("_scale_inv")])
                where = weight.file if weight else ckpt.dir
                raise CheckpointError(f"{where}: fp8 tensor '{full[: -len('_scale_inv')]}' has no scale '{full}'")
            raise CheckpointError(f"{ckpt.dir}: tensor '{full}' is missing (expected {_fmt(spec)})")
        if info.shape != spec.shape:
            raise CheckpointError(
                f"{info.file}: tensor '{info.name}' has shape {list(info.shape)}, config implies {list(spec.shape)}"
            )
        if info.dtype not in spec.dtypes:
            raise CheckpointError(f"{info.file}: tensor '{info.name}' has dtype {info.dtype}, expected {_fmt(spec)}")
    for name, info in ckpt.tensors.items():
        if name not in specs and not skipped(cfg, name):
            raise CheckpointError(f"{info.file}: unexpected tensor '{info.name}' (not used by this config)")
    _check_int4_shapes(ckpt, specs)
    return specs


def _check_int4_shapes(ckpt: Checkpoint, specs: dict[str, Spec]) -> None:
    """Each INT4 weight's `weight_shape` must hold the [N, K] its packed words imply (K2 has no padding)."""
    for name, spec in specs.items():
        if spec.kind != "int4_shape":
            continue
        packed = specs[name[: -len("shape")] + "packed"].shape
        want = [packed[0], packed[1] * 8]
        got = ckpt.get(name).tolist()
        if got != want:
            info = ckpt.tensors[name]
            raise CheckpointError(f"{info.file}: tensor '{info.name}' holds {got}, "
                                  f"but its weight_packed implies {want}")


def _fmt(spec: Spec) -> str:
    return f"{'/'.join(spec.dtypes)}{list(spec.shape)}"
