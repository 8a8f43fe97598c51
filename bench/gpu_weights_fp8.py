"""How far `--gpu-weights fp8` (bf16 linears requantized to block-fp8 at load) moves an INT4 model's outputs.

    python bench/gpu_weights_fp8.py            # the parity checkpoints' shapes (tiny, K2.5 layout) and "small"

For each synthetic INT4 checkpoint: the max relative logit error of the fp8 engine against the bf16 one (teacher
forced over a prompt), the share of positions whose argmax agrees, the greedy tokens generated before the first
divergence, and the per-weight relative RMS error of the requantization. Appends to bench/results/gpu_weights_fp8.jsonl.
Random-weight models are far more sensitive than trained ones (their router scores are near ties), so these numbers
bound what a user would see from above; the test suite checks the requantized engine is exact for its fp8 values.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from hybrid import Engine  # noqa: E402
from hybrid.fp8 import quantize  # noqa: E402
from hybrid.presets import synthetic_config  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402

CASES = {"tiny int4": ("tiny", "flat"), "tiny k25": ("tiny", "k25"), "small int4": ("small", "flat")}


def weight_rms_error(engine: Engine) -> float:
    """Relative RMS error of block-fp8 requantization over the bf16 linears of the first attention block."""
    attn = engine.model.blocks[0].attn
    errs = []
    for field in ("q_a", "q_b", "kv_a", "kv_b", "o"):
        w = getattr(attn, field).float()
        errs.append(float((quantize(w).dequantize() - w).norm() / w.norm()))
    return max(errs)


def measure(name: str, preset: str, layout: str, root: Path, prompt_len: int = 64, new: int = 32) -> dict:
    ckpt = write_checkpoint(root / name.replace(" ", "_"), synthetic_config(preset, fmt="int4", layout=layout),
                            progress=False)  # fmt: skip
    bf16 = Engine.from_pretrained(ckpt, progress=False)
    fp8 = Engine.from_pretrained(ckpt, progress=False, gpu_weights="fp8")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, bf16.cfg.vocab_size - 256, (prompt_len,), generator=g).tolist()
    a, b = bf16.logits(ids), fp8.logits(ids)
    ga, gb = list(bf16.generate(ids[:16], new)), list(fp8.generate(ids[:16], new))
    same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), new)
    return {"case": name, "max_rel_logit_error": float((a - b).abs().max() / a.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "greedy_tokens_equal_before_divergence": same, "greedy_tokens": new,
            "weight_rel_rms_error": weight_rms_error(bf16)}  # fmt: skip


def main() -> None:
    out = RESULTS / "gpu_weights_fp8.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        for name, (preset, layout) in CASES.items():
            record = {**measure(name, preset, layout, Path(tmp)), "machine": machine()}
            append_result(out, record)
            print(f"{name:12s} logits max rel err {record['max_rel_logit_error']:.3f}  argmax agree "
                  f"{record['argmax_agreement']:.0%}  greedy equal {record['greedy_tokens_equal_before_divergence']}/"
                  f"{record['greedy_tokens']}  weight rms err {record['weight_rel_rms_error']:.3f}")  # fmt: skip
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
