"""Checkpoints whose greedy output is a script, for thinking-model tests (a random-weight model never emits <think>).

Every output projection (attention o_proj, MLP and expert down_proj) is zero, so the last hidden state is the
current token's embedding and the model is a bigram table: lm_head maps each token of the script to the next one.
Engine, tokenizer, chat template and server all run for real; only the weights are chosen. The tokenizer gets
K2.5's `<think>`/`</think>` specials in tokenizer_config.json, as the real checkpoints have them.
"""

from pathlib import Path

import torch

from hybrid.bpe import write_tokenizer
from hybrid.checkpoint import DTYPES
from hybrid.config import ModelConfig
from hybrid.presets import synthetic_config
from hybrid.synthetic import write_checkpoint
from hybrid.tokenizer import Tokenizer

MARGIN = 16.0  # the successor's logit; the others stay within a few units of 0

REASONING = "The quick brown fox jumps over the lazy dog"
ANSWER = "It is sunny and warm"
CALL_ID, ARGUMENTS = "functions.weather:0", '{"city": "Beijing"}'
TOOL_CALL = f"<|tool_calls_section_begin|><|tool_call_begin|>{CALL_ID}<|tool_call_argument_begin|>{ARGUMENTS}" \
            "<|tool_call_end|><|tool_calls_section_end|>"  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def write_scripted(out: Path, script: str, chat_template: str) -> Path:
    """A tiny checkpoint that, whatever the prompt, continues greedily from the prompt's last token along `script`
    (text whose tokens must all differ: a bigram table cannot tell two occurrences apart)."""
    config = synthetic_config("tiny")
    cfg = ModelConfig.from_dict(config)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, cfg.vocab_size - 256, thinking=True)  # as write_checkpoint writes them: the ids we need
    ids = Tokenizer(out).encode(script)
    assert len(set(ids)) == len(ids), f"script repeats a token: {ids}"
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    head = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    for token, successor in zip(ids, ids[1:]):  # rms_norm(e) ~ e, and e . e ~ hidden_size
        head[successor] += MARGIN * embed[token] / cfg.hidden_size

    def tensors(name, spec):
        dtype = DTYPES[spec.dtypes[0]]
        if name == "model.embed_tokens.weight":
            return embed.to(dtype)
        if name == "lm_head.weight":
            return head.to(dtype)
        if name.endswith(("norm.weight", "weight_scale_inv")):
            return torch.ones(spec.shape, dtype=dtype)
        return torch.zeros(spec.shape, dtype=dtype)  # every fp8 linear, so attention and MLPs add nothing

    write_checkpoint(out, config, progress=False, tensors=tensors, chat_template=chat_template, thinking_tokens=True)
    return out
