import json
import math

import pytest
import torch

from hybrid.config import ConfigError, ModelConfig
from hybrid.model import rope_frequencies
from hybrid.presets import KIMI_K2_INSTRUCT, KIMI_K2_INSTRUCT_0905, synthetic_config


def test_kimi_k2_presets_parse():
    cfg = ModelConfig.from_dict(KIMI_K2_INSTRUCT)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts, cfg.num_experts_per_tok) == (7168, 64, 384, 8)
    assert cfg.qk_head_dim == 192 and cfg.first_k_dense_replace == 1 and cfg.n_group == 1
    assert cfg.rope_scaling.factor == 32.0 and cfg.eos_token_id == 163585
    assert ModelConfig.from_dict(KIMI_K2_INSTRUCT_0905).rope_scaling.factor == 64.0


def test_softmax_scale_matches_the_published_arithmetic():
    # shared/KIMI_K2.md section 5: 192^-0.5 * (0.1 ln(factor) + 1)^2
    assert ModelConfig.from_dict(KIMI_K2_INSTRUCT).softmax_scale == pytest.approx(0.1308608, rel=1e-6)
    assert ModelConfig.from_dict(KIMI_K2_INSTRUCT_0905).softmax_scale == pytest.approx(0.1446796, rel=1e-6)
    plain = dict(KIMI_K2_INSTRUCT, rope_scaling=None)
    assert ModelConfig.from_dict(plain).softmax_scale == pytest.approx(192**-0.5)


def test_k2_yarn_is_a_hard_switch_between_dims_19_and_20():
    cfg = ModelConfig.from_dict(KIMI_K2_INSTRUCT)
    inv_freq, mult = rope_frequencies(cfg)
    theta = 50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert mult == 1.0 and inv_freq.shape == (32,)
    torch.testing.assert_close(inv_freq[:20].double(), theta[:20], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq[20:].double(), theta[20:] / 32, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        ({"quantization_config": None}, "quantization_config"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config.fmt"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
         "quantization_config.weight_block_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "7168"}, "hidden_size"),
        ({"n_group": 5}, "n_group"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ],
)
def test_unsupported_values_name_the_field(change, field, tmp_path):
    raw = synthetic_config("tiny")
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert f"'{field}'" in str(e.value) and str(path) in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


def test_yarn_factor_defaults_to_context_ratio():
    raw = dict(KIMI_K2_INSTRUCT_0905)
    raw["rope_scaling"] = {k: v for k, v in raw["rope_scaling"].items() if k != "factor"}
    assert ModelConfig.from_dict(raw).rope_scaling.factor == 64.0
    assert math.isclose(ModelConfig.from_dict(raw).softmax_scale, 0.1446796, rel_tol=1e-6)
