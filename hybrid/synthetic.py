"""Write synthetic checkpoints in exactly Kimi-K2's published layout (names, dtypes, shards, index, tokenizer).

Weights are random but well-conditioned (unit-scale activations, spread router scores), deterministic per
(seed, tensor name), and generated tensor by tensor so even K2-width layers never need the whole model in RAM.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .bpe import write_tokenizer
from .chat import CHAT_TEMPLATE, THINKING_CHAT_TEMPLATE
from .checkpoint import DTYPES, tensor_nbytes
from .config import ModelConfig
from .fp8 import FP8_MAX
from .formats import Spec
from .schema import expected_tensors

CODE_TABLE_SIZE = 1 << 16
CODE_STD = FP8_MAX / 4  # fp8 codes drawn from N(0, CODE_STD), clamped at +-448 (4 sigma)
INT4_CODE_STD = math.sqrt((16**2 - 1) / 12)  # INT4 codes uniform over -8..7
_LINEAR = re.compile(r"_proj(_with_mqa)?\.weight$")
VISION_TENSORS = {  # K2.5's vision tower and projector, a few stand-ins: the text runtime must skip them
    "vision_tower.patch_embed.proj.weight": (64, 3, 14, 14), "vision_tower.encoder.blocks.0.attn.qkv.weight": (192, 64),
    "mm_projector.proj.0.weight": (256, 64),
}  # fmt: skip


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _normal_codes(seed: int) -> torch.Tensor:
    g = _generator(seed, "fp8-code-table")
    return (torch.randn(CODE_TABLE_SIZE, generator=g) * CODE_STD).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def make_tensor(name: str, spec: Spec, specs: dict[str, Spec], cfg: ModelConfig, seed: int,
                codes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The synthetic value of one checkpoint tensor."""
    g = _generator(seed, name)
    dtype = DTYPES[spec.dtypes[0]]
    h = cfg.hidden_size
    if spec.fp8:  # fp8 codes from a normal table: fast enough for K2-width layers
        idx = torch.randint(0, CODE_TABLE_SIZE, spec.shape, generator=g)
        return codes[idx].view(torch.float8_e4m3fn)
    if spec.kind == "int4":  # random words: every nibble uniform over the 16 codes, -8 included
        return torch.randint(-(1 << 31), 1 << 31, spec.shape, generator=g, dtype=torch.int64).to(torch.int32)
    if spec.kind == "int4_shape":
        packed = specs[name[: -len("shape")] + "packed"].shape
        return torch.tensor([packed[0], packed[1] * 8], dtype=dtype)
    if name.endswith(("weight_scale_inv", "weight_scale")):  # weight std 1/sqrt(fan_in), with per-block jitter
        base = name.rsplit(".", 1)[0]
        if name.endswith("_inv"):
            fan_in, code_std = specs[f"{base}.weight"].shape[1], CODE_STD
        else:
            fan_in, code_std = specs[f"{base}.weight_packed"].shape[1] * 8, INT4_CODE_STD
        jitter = torch.exp(0.25 * torch.randn(spec.shape, generator=g))
        return (jitter / (math.sqrt(fan_in) * code_std)).to(dtype)
    if _LINEAR.search(name):  # a bf16 linear (INT4 checkpoints keep everything but the routed experts in bf16)
        return (torch.randn(spec.shape, generator=g) / math.sqrt(spec.shape[1])).to(dtype)
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(spec.shape, generator=g)).to(dtype)
    if name.endswith("e_score_correction_bias"):
        return (0.02 * torch.randn(spec.shape, generator=g)).to(dtype)
    if name in VISION_TENSORS or name == "model.embed_tokens.weight":
        return torch.randn(spec.shape, generator=g).to(dtype)
    if name == "lm_head.weight" or name.endswith("mlp.gate.weight"):
        return (2.0 * torch.randn(spec.shape, generator=g) / math.sqrt(h)).to(dtype)
    raise KeyError(f"no synthetic rule for tensor '{name}'")


def _layer_key(name: str) -> tuple[int, str]:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)), name
    return (-1 if "embed_tokens" in name else 1 << 30), name


def write_checkpoint(out: str | Path, config: dict, seed: int = 0, shard_bytes: int = 4 << 30,
                     progress: bool = True, tensors=None, tokenizer_text: str | None = None,
                     chat_template: str | None = None, thinking_tokens: bool | None = None) -> Path:  # fmt: skip
    """Write config.json, sharded safetensors + index, tokenizer files and chat_template.jinja; returns the directory.

    chat_template defaults to K2-Instruct's for fp8 configs and the thinking template (K2.5's switch) for INT4 ones;
    the tokenizer gets `<think>` / `</think>` when the template uses them (or thinking_tokens says so).

    tensors(name, spec) -> tensor supplies the weights (default: the synthetic rules of make_tensor);
    tokenizer_text is the corpus the BPE vocabulary is learned from (default: a small built-in one).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(config)
    specs = expected_tensors(cfg)
    names = sorted(specs, key=_layer_key)
    if cfg.tensor_prefix:  # kimi_k25: the text model nested under its prefix, beside a vision tower
        specs.update({name: Spec(shape, ("BF16",)) for name, shape in VISION_TENSORS.items()})
        names += list(VISION_TENSORS)
    stored = {name: name if name in VISION_TENSORS else cfg.tensor_prefix + name for name in names}

    shards: list[list[str]] = [[]]
    size = 0
    for name in names:  # plan shards up front: K2 names them model-000NN-of-000MM
        nbytes = tensor_nbytes(specs[name].dtypes[0], specs[name].shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    codes = _normal_codes(seed)
    weight_map, total = {}, 0
    bar = tqdm(total=len(names), desc=f"writing {out.name}", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:06d}.safetensors"
        shard_tensors = {}
        for name in shard:
            t = tensors(name, specs[name]) if tensors else make_tensor(name, specs[name], specs, cfg, seed, codes)
            shard_tensors[stored[name]] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[stored[name]] = fname
            bar.update()
        save_file(shard_tensors, str(out / fname), metadata={"format": "pt"})
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if chat_template is None:
        chat_template = THINKING_CHAT_TEMPLATE if cfg.quantization.method == "int4" else CHAT_TEMPLATE
    thinking = "<think>" in chat_template if thinking_tokens is None else thinking_tokens
    text = {"text": tokenizer_text} if tokenizer_text else {}
    write_tokenizer(out, cfg.vocab_size - 256, **text, thinking=thinking)
    (out / "chat_template.jinja").write_text(chat_template)
    return out


class SyntheticTensors:
    """The same synthetic weights, made on demand instead of read from disk (a TensorSource for benchmarks at full
    K2 width on boxes whose disk cannot hold the files)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg, self.seed, self.specs, self.codes = cfg, seed, expected_tensors(cfg), _normal_codes(seed)

    def get(self, name: str) -> torch.Tensor:
        return make_tensor(name, self.specs[name], self.specs, self.cfg, self.seed, self.codes)

    def release(self, name: str) -> None:
        pass
