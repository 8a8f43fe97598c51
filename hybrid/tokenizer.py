"""Kimi-K2 tokenizer: tiktoken BPE over the checkpoint's `tiktoken.model`, K2's split pattern, 256 specials."""

from __future__ import annotations

import base64
import bisect
import codecs
import json
import re
from pathlib import Path
from typing import Sequence

import tiktoken

NUM_RESERVED_SPECIAL = 256
# K2's pre-tokenizer (tokenization_kimi.py): Han runs first, then a GPT-4o-like split. `&&` is class intersection.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])  # fmt: skip

# Offsets from the first special id (163584 in K2) to K2's named special tokens (tokenizer_config.json).
NAMED_SPECIALS = {
    0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True), 3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True), 6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
    9: ("[EOT]", True), 10: ("<|im_system|>", True), 11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False), 13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False), 15: ("<|tool_call_end|>", False), 17: ("<|im_middle|>", True),
    254: ("[UNK]", True), 255: ("[PAD]", True),
}  # fmt: skip
THINK_SPECIALS = {22: ("<think>", False), 23: ("</think>", False)}  # K2-Thinking / K2.5's 163606 and 163607


def load_ranks(path: Path) -> dict[bytes, int]:
    """`<base64 token> <rank>` per line. Read directly: tiktoken's loader caches by path and would serve stale ranks."""
    ranks = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
    return ranks


class Tokenizer:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        ranks = load_ranks(directory / "tiktoken.model")
        self.num_base = len(ranks)
        names = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            decoder = json.loads(config_path.read_text()).get("added_tokens_decoder", {})
            names = {int(i): entry["content"] for i, entry in decoder.items()}
        self.special = {
            names.get(i, f"<|reserved_token_{i}|>"): i for i in range(self.num_base, self.num_base + NUM_RESERVED_SPECIAL)
        }
        self.model = tiktoken.Encoding(name=directory.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special)  # fmt: skip
        self.bos_id, self.eos_id = self.special.get("[BOS]"), self.special.get("[EOS]")
        # as tiktoken finds special-token strings (no name is a prefix of another, so the order does not matter)
        self.special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)))

    @property
    def vocab_size(self) -> int:
        return self.num_base + NUM_RESERVED_SPECIAL

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Special-token strings in the text become specials unless allow_special is False (as K2's tokenizer).

        Like K2's tokenizer, the text is cut into 400,000-character windows and then into runs of at most
        25,000 consecutive whitespace or non-whitespace characters (tiktoken's regex is slow on longer runs).
        """
        ids: list[int] = []
        for piece in _pieces(text):
            if allow_special:
                ids += self.model.encode(piece, allowed_special="all")
            else:
                ids += self.model.encode(piece, disallowed_special=())
        return ids

    def encode_prompt(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """encode(text), except that special-token strings overlapping a `plain` (start, end) span encode as ordinary
        text, in one BPE run with the text around them (chat.render_prompt returns the spans the messages' own text
        put there). Same windows as encode and tiktoken's own search, so with no spans the ids are encode(text)."""
        if not plain:
            return self.encode(text)
        spans = sorted(plain)
        starts = [a for a, _ in spans]

        def user_typed(a: int, b: int) -> bool:
            i = bisect.bisect_left(starts, b) - 1  # the last span starting before b
            return i >= 0 and spans[i][1] > a

        ids: list[int] = []
        for offset, end in _spans(text):
            piece, run, find = text[offset:end], 0, 0
            while (m := self.special_re.search(piece, find)) is not None:
                if user_typed(offset + m.start(), offset + m.end()):
                    find = m.start() + 1  # as tiktoken skips a special it may not use
                    continue
                ids += self.model.encode_ordinary(piece[run : m.start()])
                ids.append(self.special[m.group()])
                run = find = m.end()
            ids += self.model.encode_ordinary(piece[run:])
        return ids

    def is_special(self, token: int) -> bool:
        """A control token: named (`<|im_middle|>`, `<think>`, ...) or `<|reserved_token_N|>`."""
        return token >= self.num_base

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (a special's name for a special)."""
        return self.model.decode_single_token_bytes(token)

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)


WINDOW_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def _spans(text: str):
    """(start, end) of the pieces K2's tokenizer encodes one by one."""
    for w in range(0, max(len(text), 1), WINDOW_CHARS):
        window = text[w : w + WINDOW_CHARS]
        start, run, prev = 0, 0, None
        for i, ch in enumerate(window):
            space = ch.isspace()
            run = run + 1 if space == prev else 1
            prev = space
            if run > MAX_RUN_CHARS:
                yield w + start, w + i
                start, run = i, 1
        yield w + start, w + len(window)


def _pieces(text: str):
    for a, b in _spans(text):
        yield text[a:b]


class StreamDecoder:
    """Token-by-token text for streaming: holds back bytes of a character split across tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.model = tokenizer.model
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self.utf8.decode(self.model.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
