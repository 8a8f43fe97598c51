"""Loader errors name the file and the tensor; valid layouts load; tensors are zero-copy views of the files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybrid import CheckpointError, Engine
from hybrid.checkpoint import Checkpoint
from hybrid.config import ModelConfig
from hybrid.fp8 import dequantize, fp8_to_float, quantize
from hybrid.schema import expected_tensors, linear_specs, scale_shape
from hybrid.presets import KIMI_K2_INSTRUCT, synthetic_config

INDEX = "model.safetensors.index.json"
EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"


@pytest.fixture
def ckpt(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][name]


def edit(ckpt: Path, name: str, new: torch.Tensor | None, new_name: str | None = None) -> Path:
    """Rewrite the shard holding `name`: replace, drop (new=None) or add (new_name) a tensor; keep the index in step."""
    shard = shard_of(ckpt, name)
    tensors = load_file(str(shard))
    index = json.loads((ckpt / INDEX).read_text())
    if new_name:
        tensors[new_name] = new
        index["weight_map"][new_name] = shard.name
    elif new is None:
        del tensors[name]
        del index["weight_map"][name]
    else:
        tensors[name] = new
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (ckpt / INDEX).write_text(json.dumps(index))
    return shard


def load_error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        Engine.from_pretrained(ckpt, progress=False)
    return str(e.value)


def test_missing_shard(ckpt):
    shard = shard_of(ckpt, EXPERT)
    shard.unlink()
    msg = load_error(ckpt)
    assert shard.name in msg and "missing" in msg and "model.layers." in msg


def test_truncated_shard(ckpt):
    shard = shard_of(ckpt, EXPERT)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    msg = load_error(ckpt)
    assert shard.name in msg and "truncated" in msg and "tensor '" in msg


def test_garbage_header(ckpt):
    shard = shard_of(ckpt, EXPERT)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    msg = load_error(ckpt)
    assert shard.name in msg and "header" in msg


def test_wrong_shape(ckpt):
    shard = edit(ckpt, EXPERT, torch.zeros(256, 80, dtype=torch.float8_e4m3fn))
    msg = load_error(ckpt)
    assert shard.name in msg and EXPERT in msg and "[256, 80]" in msg and "[256, 96]" in msg


def test_wrong_dtype(ckpt):
    shard = edit(ckpt, EXPERT, torch.zeros(256, 96, dtype=torch.bfloat16))
    msg = load_error(ckpt)
    assert shard.name in msg and EXPERT in msg and "BF16" in msg and "F8_E4M3" in msg


def test_missing_scale(ckpt):
    shard = edit(ckpt, EXPERT + "_scale_inv", None)
    msg = load_error(ckpt)
    assert shard.name in msg and EXPERT + "_scale_inv" in msg and "no scale" in msg


def test_missing_tensor(ckpt):
    edit(ckpt, "model.layers.2.self_attn.kv_a_layernorm.weight", None)
    assert "'model.layers.2.self_attn.kv_a_layernorm.weight' is missing" in load_error(ckpt)


def test_unexpected_key(ckpt):
    shard = edit(ckpt, EXPERT, torch.zeros(4), new_name="model.layers.1.mlp.experts.99.down_proj.weight")
    msg = load_error(ckpt)
    assert shard.name in msg and "unexpected tensor 'model.layers.1.mlp.experts.99.down_proj.weight'" in msg


def test_index_and_shard_disagree(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = shard_of(ckpt, EXPERT).name
    (ckpt / INDEX).write_text(json.dumps(index))
    msg = load_error(ckpt)
    assert "model.norm.weight" in msg and "is listed in model.safetensors.index.json but not in this shard" in msg


def test_mtp_layer_is_skipped_only_when_declared(ckpt):
    """DeepSeek-V3 stores its MTP module as model.layers.<num_hidden_layers>; loaders skip it."""
    mtp = "model.layers.3.eh_proj.weight"
    edit(ckpt, EXPERT, torch.zeros(8, 8, dtype=torch.bfloat16), new_name=mtp)
    assert f"unexpected tensor '{mtp}'" in load_error(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    Engine.from_pretrained(ckpt, progress=False)


def test_single_file_checkpoint_gives_the_same_logits(tiny, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for shard in sorted(tiny.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    save_file(tensors, str(single / "model.safetensors"))
    shutil.copy(tiny / "config.json", single)
    ids = [5, 17, 300, 42]
    a = Engine.from_pretrained(single, progress=False).logits(ids)
    b = Engine.from_pretrained(tiny, progress=False).logits(ids)
    assert torch.equal(a, b)


def test_no_weights_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(synthetic_config("tiny")))
    assert "neither" in load_error(tmp_path)


def test_tensors_are_views_of_the_mapped_file(tiny):
    ck = Checkpoint(tiny)
    a, b = ck.get(EXPERT), ck.get(EXPERT)
    assert a.dtype == torch.float8_e4m3fn and a.data_ptr() == b.data_ptr()  # one mapping, no copies
    ref = load_file(str(shard_of(tiny, EXPERT)))[EXPERT]
    assert torch.equal(a.view(torch.uint8), ref.view(torch.uint8))


def test_fp8_decode_is_exact_on_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ours, torch_ref = fp8_to_float(codes), codes.float()
    nan = torch.isnan(torch_ref)
    assert nan.sum() == 2 and torch.isnan(ours[nan]).all()
    assert torch.equal(ours[~nan], torch_ref[~nan])


def test_dequantize_partial_edge_blocks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    fw = quantize(w)
    assert fw.scale.shape == (3, 2) == scale_shape((300, 200))
    dq = dequantize(fw.q, fw.scale)
    manual = torch.empty(300, 200)
    for i in range(300):
        for j in range(0, 200, 64):  # 64-wide slices never straddle a 128-block boundary
            manual[i, j : j + 64] = fw.q[i, j : j + 64].float() * fw.scale[i // 128, j // 128]
    assert torch.equal(dq, manual)
    assert float((dq - w).abs().max() / w.abs().max()) < 0.07  # e4m3 keeps 3 mantissa bits


def test_k2_tensor_inventory_matches_the_published_arithmetic():
    """shared/KIMI_K2.md 2.2 and 6: 139,583 tensors; 44,050,944 bytes per routed expert; ~1014.93 GB routed."""
    cfg = ModelConfig.from_dict(KIMI_K2_INSTRUCT)
    specs = expected_tensors(cfg)
    assert len(specs) == 139_583
    assert scale_shape(linear_specs(cfg)["model.layers.0.self_attn.kv_a_proj_with_mqa"]) == (5, 56)
    expert = [n for n in specs if n.startswith("model.layers.1.mlp.experts.0.")]
    nbytes = sum(torch.Size(specs[n].shape).numel() * (1 if specs[n].fp8 else 4) for n in expert)
    assert nbytes == 44_050_944
    assert nbytes * 384 * 60 == pytest.approx(1014.93e9, rel=1e-5)
