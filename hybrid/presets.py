"""Known configurations: the published Kimi-K2 config.json values and the synthetic test/demo sizes."""

from __future__ import annotations

import copy

# Kimi-K2-Instruct (0711) config.json, field for field (sources and confidence in shared/KIMI_K2.md, section 1).
KIMI_K2_INSTRUCT = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    },  # fmt: skip
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "use_cache": True,
    "initializer_range": 0.02,
    "ep_size": 1,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    },  # fmt: skip
}

KIMI_K2_INSTRUCT_0905 = copy.deepcopy(KIMI_K2_INSTRUCT)
KIMI_K2_INSTRUCT_0905["max_position_embeddings"] = 262144
KIMI_K2_INSTRUCT_0905["rope_scaling"]["factor"] = 64.0

# The native-INT4 family (shared/KIMI_K2.md section 8): routed experts INT4 (compressed-tensors pack-quantized,
# group 32, symmetric), everything else bf16. No Moonshot config.json was read verbatim; the fields below are the
# ones third-party readers of the real files agree on.
COMPRESSED_TENSORS_INT4 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                    "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}},
    }},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "sparsity_config": {},
}  # fmt: skip


def int4_config(text: dict, layout: str = "flat") -> dict:
    """A K2 text config made INT4 (K2-Thinking's flat layout), or nested as kimi_k25 (layout "k25")."""
    text = copy.deepcopy(text)
    text["quantization_config"] = copy.deepcopy(COMPRESSED_TENSORS_INT4)
    if layout == "flat":
        return text
    if layout != "k25":
        raise ValueError(f"layout must be 'flat' or 'k25', got {layout!r}")
    text["quantization_config"]["ignore"] += ["re:vision_tower.*", "re:mm_projector.*"]
    return {
        "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
        "text_config": text, "vision_config": {"model_type": "moonvit", "hidden_size": 64, "patch_size": 14},
        "bos_token_id": text.get("bos_token_id"), "eos_token_id": text.get("eos_token_id"),
    }  # fmt: skip


# K2-Thinking: the 0905 text config (256K context), INT4 experts. K2.5 and K2.6: kimi_k25 with the text config's
# beta_fast 32 and rms_norm_eps 1e-5 (K2-Instruct had 1 and 1e-6: they are read from the file, never assumed).
KIMI_K2_THINKING = int4_config(KIMI_K2_INSTRUCT_0905)
_K25_TEXT = copy.deepcopy(KIMI_K2_INSTRUCT_0905)
_K25_TEXT["rope_scaling"]["beta_fast"] = 32.0
_K25_TEXT["rms_norm_eps"] = 1e-5
KIMI_K2_5 = int4_config(_K25_TEXT, "k25")
KIMI_K2_6 = copy.deepcopy(KIMI_K2_5)

MODEL_PRESETS = {
    "kimi-k2-instruct": KIMI_K2_INSTRUCT, "kimi-k2-instruct-0905": KIMI_K2_INSTRUCT_0905,
    "kimi-k2-thinking": KIMI_K2_THINKING, "kimi-k2.5": KIMI_K2_5, "kimi-k2.6": KIMI_K2_6,
}  # fmt: skip

# Synthetic sizes, as overrides of the K2 config. Widths deliberately include partial 128-blocks (e.g. kv_a
# has kv_lora_rank + rope rows, like K2's 576) so the edge-block paths are always exercised.
SYNTHETIC_PRESETS = {
    "tiny": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    ),
    "small": dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, num_experts_per_tok=4,
        q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    ),
    "k2-slice": dict(num_hidden_layers=3),  # every width exactly Kimi-K2's; --layers sets the depth
}  # fmt: skip


def synthetic_config(preset: str, layers: int | None = None, fmt: str = "fp8", layout: str = "flat",
                     **overrides) -> dict:  # fmt: skip
    """A K2-style config.json dict for a synthetic preset; special token ids follow the vocabulary's size.
    fmt "int4": K2-Thinking's format (INT4 experts, bf16 rest); layout "k25": nested as kimi_k25 (INT4)."""
    if preset not in SYNTHETIC_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(SYNTHETIC_PRESETS)}")
    cfg = copy.deepcopy(KIMI_K2_INSTRUCT)
    cfg.update(SYNTHETIC_PRESETS[preset])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cfg.update(overrides)
    first_special = cfg["vocab_size"] - 256
    cfg["bos_token_id"], cfg["eos_token_id"] = first_special, first_special + 1
    if fmt not in ("fp8", "int4"):
        raise ValueError(f"format must be 'fp8' or 'int4', got {fmt!r}")
    if fmt == "int4" or layout != "flat":
        return int4_config(cfg, layout)
    return cfg
