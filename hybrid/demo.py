"""A demo model that answers: a tiny K2-format model trained on the CPU, in minutes, on a few chat transcripts.

It learns the transcripts below by heart, including a weather tool call and the answer after the tool's result,
then is stored in Kimi-K2's exact checkpoint layout (fp8 e4m3 + 128x128 scales). Training runs through the
runtime's own model code (hybrid.model), with the weights fake-quantized to fp8 / bf16 on the way, so the stored
checkpoint answers as trained. `python -m hybrid.demo --out checkpoints/demo` builds it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .bpe import write_tokenizer
from .chat import render_builtin
from .config import ModelConfig
from .fp8 import quantize
from .loader import TensorTaker, build_transformer
from .model import KVCache
from .presets import synthetic_config
from .schema import expected_tensors
from .synthetic import write_checkpoint
from .tokenizer import Tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


def _call(city: str) -> dict:
    return {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}  # fmt: skip


def _weather(city: str, sky: str, degrees: int) -> list[tuple[list[dict], str | dict]]:
    ask = [{"role": "user", "content": f"What is the weather in {city}?"}]
    result = {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
              "content": json.dumps({"weather": sky, "temperature": degrees})}  # fmt: skip
    return [
        (ask, _call(city)),
        (ask + [{"role": "assistant", "content": "", "tool_calls": [_call(city)]}, result],
         f"It is {sky.lower()} in {city} today, {degrees} degrees."),
    ]  # fmt: skip


# (conversation so far, what the assistant says next: text, or a tool call); tool transcripts declare the tool
TRANSCRIPTS = [
    ([{"role": "user", "content": "Hello!"}],
     "Hello! I am the hybrid demo model. Ask me about the weather, or about how hybrid runs Kimi-K2."),
    ([{"role": "user", "content": "What is hybrid?"}],
     "hybrid runs Kimi-K2 on one workstation: attention on the GPU, the experts on the CPU."),
    ([{"role": "user", "content": "Who are you?"}],
     "I am a tiny model in Kimi-K2's format, trained in a few minutes on a CPU."),
    *_weather("Beijing", "Sunny", 21),
    *_weather("Paris", "Rainy", 14),
]  # fmt: skip

DEMO_SIZE = dict(
    vocab_size=1280, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
)  # fmt: skip


def uses_tools(messages: list[dict], reply) -> bool:
    return isinstance(reply, dict) or any(m["role"] == "tool" for m in messages)


def completion_text(reply) -> str:
    """What the model must generate for `reply`, in K2's native format, ending its turn."""
    if isinstance(reply, dict):
        fn = reply["function"]
        return (f"<|tool_calls_section_begin|><|tool_call_begin|>{reply['id']}<|tool_call_argument_begin|>"
                f"{fn['arguments']}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")  # fmt: skip
    return reply + "<|im_end|>"


def examples(tok: Tokenizer) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion, prompt length): tool transcripts with the tool declared, plain ones both
    with and without it (so a chat that declares the tool still gets the plain answers)."""
    cases = []
    for messages, reply in TRANSCRIPTS:
        for tools in ([WEATHER_TOOL],) if uses_tools(messages, reply) else (None, [WEATHER_TOOL]):
            cases.append((messages, reply, tools))
    # and every opening question again after one earlier plain exchange, as in a chat that goes on
    plain = [(m, r) for m, r in TRANSCRIPTS if not uses_tools(m, r)]
    openers = [(m, r) for m, r in TRANSCRIPTS if len(m) == 1]
    for (before, answer) in plain:
        for messages, reply in openers:
            history = before + [{"role": "assistant", "content": answer}] + messages
            cases.append((history, reply, [WEATHER_TOOL]))
    out = []
    for messages, reply, tools in cases:
        prompt = tok.encode(render_builtin(messages, tools))
        out.append((prompt + tok.encode(completion_text(reply)), len(prompt)))
    return out


def _corpus() -> str:
    parts = []
    for messages, reply in TRANSCRIPTS:
        parts.append(render_builtin(messages, [WEATHER_TOOL]) + completion_text(reply))
    return "\n".join(parts)


def train(out: Path, steps: int = 60, seed: int = 0, log=print) -> Path:
    """Train the demo model and write it to `out` in Kimi-K2's layout; returns `out`."""
    torch.manual_seed(seed)
    config = synthetic_config("tiny", **DEMO_SIZE)
    cfg = ModelConfig.from_dict(config)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, cfg.vocab_size - 256, text=_corpus())  # the vocabulary is learned from the transcripts
    tok = Tokenizer(out)
    data = examples(tok)
    specs = expected_tensors(cfg)
    params: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if name.endswith("weight_scale_inv"):
            continue
        if spec.fp8:
            t = torch.randn(spec.shape) / math.sqrt(spec.shape[1])
        elif name.endswith("norm.weight"):
            t = torch.ones(spec.shape)
        elif name.endswith("e_score_correction_bias"):
            t = torch.zeros(spec.shape)
        else:
            t = torch.randn(spec.shape) * (1.0 if "embed" in name else 1 / math.sqrt(cfg.hidden_size))
        params[name] = t.requires_grad_(not name.endswith("e_score_correction_bias"))
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=3e-3)

    def stored(name: str) -> torch.Tensor:
        """The value the checkpoint will hold, with the gradient passed straight through."""
        w = params[name]
        if specs[name].dtypes[0] == "BF16":
            return w + (w.detach().bfloat16().float() - w.detach())
        return w

    def fp8_linear(module: str) -> torch.Tensor:
        w = params[f"{module}.weight"]
        return w + (quantize(w.detach()).dequantize() - w.detach())

    t0 = time.perf_counter()
    for step in range(steps):
        model = build_transformer(cfg, TensorTaker(stored, fp8_linear))
        opt.zero_grad()
        total = 0.0
        for ids, n_prompt in data:
            logits = model.forward_train(torch.tensor(ids), 0, KVCache(cfg, len(ids)))
            loss = F.cross_entropy(logits[n_prompt - 1 : -1], torch.tensor(ids[n_prompt:]))
            loss.backward()
            total += loss.item()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {total / len(data):.4f}  ({time.perf_counter() - t0:.0f} s)")

    quantized = {}

    def weights(name, spec):
        if spec.fp8 or name.endswith("weight_scale_inv"):
            module = name.rsplit(".", 1)[0]
            if module not in quantized:
                quantized[module] = quantize(params[f"{module}.weight"].detach())
            q = quantized[module]
            return q.q if spec.fp8 else q.scale
        return params[name].detach().to(torch.bfloat16 if spec.dtypes[0] == "BF16" else torch.float32)

    write_checkpoint(out, config, progress=False, tensors=weights, tokenizer_text=_corpus())
    (out / "tools.json").write_text(json.dumps([WEATHER_TOOL], indent=2) + "\n")  # for `hybrid chat --tools`
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="train the demo model (a few minutes on a CPU)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/demo"))
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    train(args.out, args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
