"""The native-INT4 family (K2-Thinking, K2.5+): configs, layouts, the compressed-tensors packing, load errors, plans."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import compressed_tensors_packing
from safetensors.torch import load_file, save_file

from cpu_kernels.int4 import Int4ExpertStack, dequantize_int4, pack_int4
from hybrid import CheckpointError, Engine
from hybrid.config import ConfigError, ModelConfig
from hybrid.formats import FORMATS, Int4Weight, dequantize_int4 as dequantize_torch
from hybrid.placement import component_bytes, plan
from hybrid.presets import KIMI_K2_5, KIMI_K2_THINKING, MODEL_PRESETS, synthetic_config

INDEX = "model.safetensors.index.json"
EXPERT = "model.layers.1.mlp.experts.3.down_proj"


@pytest.fixture(scope="module")
def int4(checkpoint_factory) -> Path:
    return checkpoint_factory("formats_int4", fmt="int4")


@pytest.fixture(scope="module")
def k25(checkpoint_factory) -> Path:
    return checkpoint_factory("formats_k25", layout="k25")


def test_compressed_tensors_packing_is_what_we_read():
    """Codes packed by compressed-tensors itself: our unpacking, the kernels' byte view and the torch dequantizer
    agree with the library's own unpacking, on every code -8..7 (words with the top nibble set are negative)."""
    pack_to_int32, unpack_from_int32 = compressed_tensors_packing()
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (48, 256)).astype(np.int8)
    codes[0, :16] = np.arange(-8, 8)
    packed = pack_to_int32(torch.from_numpy(codes), 4)
    assert packed.dtype == torch.int32 and packed.shape == (48, 32) and (packed < 0).any()
    assert torch.equal(packed, torch.from_numpy(pack_int4(codes)))
    theirs = unpack_from_int32(packed, 4, torch.Size(codes.shape))
    assert torch.equal(theirs, torch.from_numpy(codes))

    scale = (torch.rand(48, 8) + 0.5).bfloat16()
    want = theirs.float() * scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(torch.from_numpy(dequantize_int4(packed, scale)), want)
    assert torch.equal(dequantize_torch(packed, scale), want)
    q, s = FORMATS["int4"].host_arrays(Int4Weight(packed, scale))  # what an expert stack holds
    assert q.shape == (48, 128) and s.dtype == np.uint16
    assert np.array_equal((q & 0xF).astype(np.int16) - 8, codes[:, 0::2])
    assert np.array_equal((q >> 4).astype(np.int16) - 8, codes[:, 1::2])


def test_int4_presets_have_the_published_sizes():
    """K2-Thinking: 24,772,608 bytes per expert, 570.8 GB routed, 11.9 GB read per token, ~23.4 GB bf16 rest."""
    for name in ("kimi-k2-thinking", "kimi-k2.5", "kimi-k2.6"):
        cfg = ModelConfig.from_dict(MODEL_PRESETS[name])
        p = plan(cfg, 24 << 30, 768 << 30, 32768, host_read_gbs=89.0)
        sizes = {c.name: c.nbytes for c in p.components}
        assert p.expert_bytes == 24_772_608 and sizes["routed experts"] == 24_772_608 * 384 * 60
        assert round(p.routed_bytes_per_token / 1e9, 2) == 11.89
        assert p.expected_decode_tps == pytest.approx(7.48, abs=0.01)
        assert sizes["embeddings"] and dict((c.name, c.device) for c in p.components)["embeddings"] == "host"
    fp8 = ModelConfig.from_dict(MODEL_PRESETS["kimi-k2-instruct"])
    assert plan(fp8, 24 << 30, 1200 << 30, 32768).expert_bytes == 3 * (2048 * 7168 + 16 * 56 * 4)


def test_gpu_weights_fp8_makes_room_on_a_small_card():
    cfg = ModelConfig.from_dict(KIMI_K2_THINKING)
    with pytest.raises(ValueError, match="--gpu-weights fp8"):
        plan(cfg, 20 << 30, 768 << 30, 32768)
    p = plan(cfg, 20 << 30, 768 << 30, 32768, gpu_weights="fp8")
    attention = {c.name: c.nbytes for c in p.components}["attention (MLA)"]
    assert 0.5 < attention / component_bytes(cfg)["attention (MLA)"] < 0.501  # 1 byte per weight + block scales


def test_kimi_k25_config_reads_the_text_config():
    cfg = ModelConfig.from_dict(KIMI_K2_5)
    assert cfg.tensor_prefix == "language_model." and cfg.rms_norm_eps == 1e-5 and cfg.rope_scaling.beta_fast == 32
    assert cfg.format_of("model.layers.1.mlp.experts.0.up_proj") == "int4"
    for module in ("model.layers.1.self_attn.kv_b_proj", "model.layers.1.mlp.shared_experts.down_proj",
                   "model.layers.0.mlp.gate_proj"):  # fmt: skip
        assert cfg.format_of(module) == "bf16"
    with pytest.raises(ConfigError, match="'text_config'"):
        ModelConfig.from_dict({k: v for k, v in KIMI_K2_5.items() if k != "text_config"})


def _group(raw: dict) -> dict:
    text = raw.get("text_config", raw)
    return text["quantization_config"]["config_groups"]["group_0"]


@pytest.mark.parametrize("change, field", [
    (lambda g, q: g["weights"].update(num_bits=8), "config_groups.group_0.weights.num_bits"),
    (lambda g, q: g["weights"].update(symmetric=False), "config_groups.group_0.weights.symmetric"),
    (lambda g, q: g["weights"].update(group_size=128), "config_groups.group_0.weights.group_size"),
    (lambda g, q: g["weights"].update(strategy="channel"), "config_groups.group_0.weights.strategy"),
    (lambda g, q: g.update(input_activations={"num_bits": 8}), "config_groups.group_0.input_activations"),
    (lambda g, q: q.update(format="float-quantized"), "quantization_config.format"),
    (lambda g, q: q.update(ignore=["re:("]), "quantization_config.ignore"),
])  # fmt: skip
def test_unsupported_int4_variants_name_the_field(change, field):
    for preset in (KIMI_K2_THINKING, KIMI_K2_5):
        raw = copy.deepcopy(preset)
        group = _group(raw)
        change(group, raw.get("text_config", raw)["quantization_config"])
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            ModelConfig.from_dict(raw)


def test_ignore_list_decides_what_is_int4():
    """Drop attention from `ignore` and attention is INT4 too: the schema asks the config, not a fixed rule."""
    raw = synthetic_config("tiny", fmt="int4")
    raw["quantization_config"]["ignore"].remove("re:.*self_attn.*")
    cfg = ModelConfig.from_dict(raw)
    assert cfg.format_of("model.layers.0.self_attn.o_proj") == "int4"


def test_int4_checkpoint_tensors(int4):
    index = json.loads((int4 / INDEX).read_text())["weight_map"]
    assert f"{EXPERT}.weight_packed" in index and f"{EXPERT}.weight_scale" in index
    assert "model.layers.1.self_attn.o_proj.weight" in index
    assert not any(n.endswith("weight_scale_inv") for n in index)
    tensors = load_file(str(int4 / index[f"{EXPERT}.weight_packed"]))
    assert tensors[f"{EXPERT}.weight_packed"].dtype == torch.int32
    assert tensors[f"{EXPERT}.weight_shape"].tolist() == [256, 96]
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    assert load_file(str(int4 / index[o_proj]))[o_proj].dtype == torch.bfloat16


def _damage(src: Path, dst: Path, name: str, value: torch.Tensor) -> Path:
    ckpt = Path(shutil.copytree(src, dst))
    shard = ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def test_int4_load_errors_name_file_and_tensor(int4, tmp_path):
    shard = _damage(int4, tmp_path / "a", f"{EXPERT}.weight_shape", torch.tensor([256, 64], dtype=torch.int32))
    with pytest.raises(CheckpointError) as e:
        Engine.from_pretrained(tmp_path / "a", progress=False)
    assert shard.name in str(e.value) and f"{EXPERT}.weight_shape" in str(e.value) and "[256, 96]" in str(e.value)
    shard = _damage(int4, tmp_path / "b", f"{EXPERT}.weight_scale", torch.ones(256, 4, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError) as e:
        Engine.from_pretrained(tmp_path / "b", progress=False)
    assert shard.name in str(e.value) and f"'{EXPERT}.weight_scale'" in str(e.value) and "[256, 4]" in str(e.value)


def test_k25_layout_loads_text_only_and_names_prefixed_tensors(k25, tmp_path, capsys):
    engine = Engine.from_pretrained(k25, progress=True)
    assert "skipping 3 tensors outside the text model" in capsys.readouterr().err
    assert engine.cfg.tensor_prefix == "language_model."
    stack = engine.model.blocks[1].ffn.experts.stack
    assert isinstance(stack, Int4ExpertStack) and stack.num_experts == engine.cfg.n_routed_experts
    name = f"language_model.{EXPERT}.weight_packed"
    _damage(k25, tmp_path / "bad", name, torch.zeros(256, 10, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=f"'{name}' has shape"):
        Engine.from_pretrained(tmp_path / "bad", progress=False)


def test_gpu_weights_fp8_requantizes_the_bf16_linears(int4):
    """--gpu-weights fp8: the bf16 linears become block-fp8 (routed experts stay INT4), and the engine computes exactly
    the model whose bf16 weights are replaced by their block-fp8 values (bench/gpu_weights_fp8.py measures how far
    that moves the logits)."""
    from conftest import relative_error

    from hybrid.fp8 import Fp8Weight, quantize

    fp8 = Engine.from_pretrained(int4, progress=False, gpu_weights="fp8")
    ref = Engine.from_pretrained(int4, progress=False)
    for block in ref.model.blocks:
        mlps = [block.ffn] if not hasattr(block.ffn, "router") else [block.ffn.shared]
        owners = [(block.attn, ("q_a", "q_b", "kv_a", "kv_b", "o"))] + [(m, ("gate", "up", "down")) for m in mlps]
        for owner, fields in owners:
            for field in fields:
                w = getattr(owner, field)
                assert isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
                setattr(owner, field, quantize(w).dequantize())  # fp32 values of the fp8 weights
    attn = fp8.model.blocks[1].attn
    assert isinstance(attn.o, Fp8Weight) and isinstance(fp8.model.blocks[0].ffn.gate, Fp8Weight)
    assert isinstance(fp8.model.blocks[1].ffn.experts.stack, Int4ExpertStack)
    ids = list(range(3, 43))
    assert relative_error(fp8.logits(ids), ref.logits(ids)) <= 1e-5


def test_int4_disk_tier_and_gpu_cache_give_the_same_tokens(int4, gpu):
    """INT4 experts through every expert path: RAM slots refilled from the shards (disk tier), the hot-expert cache
    on the device (Triton INT4 linear), the CPU kernels for the rest."""
    from conftest import assert_greedy_agrees

    from hybrid.placement import gpu_mem_for, host_mem_for

    cfg = ModelConfig.from_file(int4)
    full = Engine.from_pretrained(int4, progress=False)
    gpu_mem, host_mem = gpu_mem_for(cfg, 4, 256), host_mem_for(cfg, 8, 256, gpu=True)
    engine = Engine.from_pretrained(int4, device="cuda", gpu_mem=gpu_mem, host_mem=host_mem, max_context=256,
                                    progress=False)  # fmt: skip
    assert engine.plan.expert_slots == 8 and engine.gpu_cache_slots == 4
    assert isinstance(engine.tiers[1].stack, Int4ExpertStack)
    prompt = list(range(30, 70))
    ours, theirs = engine.logits(prompt), full.logits(prompt)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 2e-2
    tokens = list(engine.generate(prompt[:5], 8))
    cache = engine.model.blocks[1].ffn.experts.gpu_cache
    assert cache.swaps > 0 and cache.hit_rate > 0 and engine.tiers[1].stats.bytes_read > 0
    assert_greedy_agrees(tokens, full, prompt[:5], 8)
