"""transformers' DeepseekV3ForCausalLM on our checkpoints: the implementation nobody here wrote.

Two ways in:
- `dequantized_copy`: fp8 weights expanded to fp32 with torch's own `.float()` and the documented block-scale
  rule, written as a plain fp32 checkpoint. Works for any width (transformers' CPU fp8 dequantizer derives the
  block size from the scale grid and so mis-scales partial edge blocks, e.g. 192 rows with 2 row-blocks).
- `native_fp8`: the checkpoint as is, only model_type set to deepseek_v3, dequantized by transformers itself
  (FineGrainedFP8 + accelerate). Valid when every width is a multiple of 128.
INT4 checkpoints (K2-Thinking, K2.5) go through `dequantized_copy`: the codes are unpacked by compressed-tensors'
own `unpack_from_int32` and multiplied by the bf16 group scales in fp32; a kimi_k25 checkpoint becomes its text
model (text_config, `language_model.` stripped, vision tensors dropped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _reference_config(src: Path, keep_quant: bool) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    if cfg["model_type"] == "kimi_k25":
        cfg = cfg["text_config"]
    cfg["model_type"] = "deepseek_v3"  # transformers silently random-inits experts for kimi_k2 (DEVELOPERS.md)
    cfg.pop("auto_map", None)
    if not keep_quant:
        cfg.pop("quantization_config", None)
    return cfg


def dequantized_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    prefix = "language_model." if any(n.startswith("language_model.") for n in tensors) else ""
    out = {}
    for name, t in tensors.items():
        if name.endswith(("weight_scale_inv", "weight_scale", "weight_shape")) or not name.startswith(prefix):
            continue
        if name.endswith("weight_packed"):
            base = name[: -len("_packed")]
            shape = torch.Size(tensors[base + "_shape"].tolist())
            q = compressed_tensors_packing()[1](t, 4, shape).float()
            out[base[len(prefix):]] = q * tensors[base + "_scale"].float().repeat_interleave(32, dim=1)
        elif t.dtype == torch.float8_e4m3fn:
            s = tensors[name + "_scale_inv"]
            rows, cols = t.shape
            full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            out[name] = t.float() * full
        else:
            out[name[len(prefix):]] = t.float()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(_reference_config(src, keep_quant=False)))
    return dst


def compressed_tensors_packing():
    """compressed-tensors' own (pack_to_int32, unpack_from_int32)."""
    from compressed_tensors.compressors.pack_quantized import helpers

    return helpers.pack_to_int32, helpers.unpack_from_int32


def native_fp8(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.safetensors*"):
        if not (dst / f.name).exists():
            os.symlink(f.resolve(), dst / f.name)
    (dst / "config.json").write_text(json.dumps(_reference_config(src, keep_quant=True)))
    return dst


def load_reference(path: Path):
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.inference_mode()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()
