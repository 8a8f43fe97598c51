"""A small byte-level BPE trainer and writer of K2-style tokenizer files (tiktoken.model, tokenizer_config.json).

Synthetic checkpoints need a real tokenizer in K2's format over a small vocabulary; this trains one on a tiny
built-in corpus and pads the rank table with filler tokens up to the size the config asks for.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from pathlib import Path

from .tokenizer import NAMED_SPECIALS, THINK_SPECIALS

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model reads tokens and writes tokens, one at a time.
Experts live in host memory and the attention lives on the graphics card; the two work side by side.
Hello! How are you today? I am fine, thank you. What is the weather like in Beijing? It is sunny and warm.
Numbers such as 1, 2, 3, 42, 128, 2048 and 7168 appear in configs. Memory bandwidth sets the speed of decoding.
Mixture of experts: a router picks eight experts for every token, and their outputs are summed with weights.
Once upon a time there was a small machine that wanted to run a very large model on a single workstation.
It learned to keep the hot experts close, to read the cold ones ahead of time, and never to waste a byte.
你好，世界。今天天气很好。我们一起学习语言模型。
def generate(prompt, max_tokens): return model.sample(prompt, temperature=0.7, top_p=0.9)
{"city": "Beijing", "unit": "celsius", "temperature": 21}
"""


def train_bpe(text: str, vocab_size: int) -> list[bytes]:
    """Byte-level BPE: the 256 single bytes, then the most frequent adjacent pair merged, repeatedly."""
    tokens = [bytes([b]) for b in range(256)]
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    seen = set(tokens)
    while len(tokens) < vocab_size:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merged = a + b
        if merged not in seen:
            tokens.append(merged)
            seen.add(merged)
        words = Counter({_merge(word, a, b, merged): n for word, n in words.items()})
    while len(tokens) < vocab_size:  # a real rank table has no gaps: pad with joins of learned tokens
        learned = tokens[256:] or tokens
        pairs_total = len(learned) ** 2
        for step in range(1, pairs_total + 1):
            a, b = divmod(step * 7919 % pairs_total, len(learned))  # a prime stride scatters the pairs
            tok = learned[a] + learned[b]
            if tok not in seen:
                tokens.append(tok)
                seen.add(tok)
                if len(tokens) == vocab_size:
                    break
    return tokens


def _merge(word: tuple, a: bytes, b: bytes, merged: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_tokenizer(directory: Path, num_base: int, text: str = CORPUS, thinking: bool = False) -> None:
    """Write tiktoken.model (`<base64> <rank>` per line) and tokenizer_config.json with K2's special names (and, for
    a thinking model, `<think>` / `</think>`)."""
    tokens = train_bpe(text, num_base)
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(tokens)]
    (directory / "tiktoken.model").write_text("".join(lines))
    decoder = {
        str(num_base + off): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": special}
        for off, (name, special) in sorted({**NAMED_SPECIALS, **(THINK_SPECIALS if thinking else {})}.items())
    }  # fmt: skip
    named = {off: name for off, (name, _) in NAMED_SPECIALS.items()}
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [named[o] for o in (2, 3, 4, 6, 7, 9, 10, 17)],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]",
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
