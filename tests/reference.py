"""transformers' DeepseekV3ForCausalLM on our checkpoints: the implementation nobody here wrote.

Two ways in:
- `dequantized_copy`: fp8 weights expanded to fp32 with torch's own `.float()` and the documented block-scale
  rule, written as a plain fp32 checkpoint. Works for any width (transformers' CPU fp8 dequantizer derives the
  block size from the scale grid and so mis-scales partial edge blocks, e.g. 192 rows with 2 row-blocks).
- `native_fp8`: the checkpoint as is, only model_type set to deepseek_v3, dequantized by transformers itself
  (FineGrainedFP8 + accelerate). Valid when every width is a multiple of 128.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _reference_config(src: Path, keep_quant: bool) -> dict:
    cfg = json.loads((src / "config.json").read_text())
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
    out = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[name + "_scale_inv"]
            rows, cols = t.shape
            full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            out[name] = t.float() * full
        else:
            out[name] = t.float()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(_reference_config(src, keep_quant=False)))
    return dst


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
