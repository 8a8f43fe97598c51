"""One chat turn on the engine: render K2's prompt, generate, and turn tokens into text, reasoning and tool-call
events.

Shared by `hybrid chat` and `hybrid serve`; both consume `ChatSession.stream()` events.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .chat import (THINK_CLOSE, THINK_OPEN, ReasoningSplitter, ToolCall, has_thinking_switch, load_template,
                   parse_tool_calls, render_prompt)  # fmt: skip
from .engine import Engine
from .tokenizer import StreamDecoder, Tokenizer


class ContextLengthError(ValueError):
    """Prompt plus max_tokens exceeds the context the engine was opened with."""


class ThinkingSwitchError(ValueError):
    """Thinking asked on or off where the model's chat template cannot switch it."""


@dataclass
class Event:
    kind: str  # "reasoning" | "content" | "tool_call" | "done"
    text: str = ""
    tool_call: ToolCall | None = None
    index: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "cancelled"
    usage: dict = field(default_factory=dict)
    logprobs: list[dict] | None = None  # "content" / "reasoning" events when stream(top_logprobs=...) asked for them


MAX_TOP_LOGPROBS = 20
# Stand-ins fed to the reasoning splitter for the `<think>` / `</think>` special tokens: lone surrogates, which no
# decoded text contains, so only those tokens delimit the reasoning and a stray one is simply dropped.
THINK_TOKEN_OPEN, THINK_TOKEN_CLOSE = "\ud800", "\ud801"


@dataclass
class ChatResult:
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: dict
    reasoning: str = ""
    logprobs: list[dict] | None = None  # per content token, with top_logprobs (see ChatSession.stream)
    reasoning_logprobs: list[dict] | None = None  # the same for the reasoning tokens


class ChatSession:
    """Engine + tokenizer + the checkpoint's chat format. Not thread-safe: one generation at a time."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, template: str | None, max_context: int):
        self.engine, self.tokenizer, self.template, self.max_context = engine, tokenizer, template, max_context
        sp = tokenizer.special
        self.stop_ids = {i for i in (sp.get("<|im_end|>"), sp.get("[EOS]")) if i is not None}
        self.section_begin = sp["<|tool_calls_section_begin|>"]
        self.section_end = sp["<|tool_calls_section_end|>"]
        self.call_end = sp["<|tool_call_end|>"]
        self.think_tokens = {sp[THINK_OPEN]: THINK_TOKEN_OPEN, sp[THINK_CLOSE]: THINK_TOKEN_CLOSE} \
            if THINK_OPEN in sp and THINK_CLOSE in sp else {}  # fmt: skip
        # a thinking model (K2-Thinking, K2.5+): its output is split into reasoning and content
        self.thinking = THINK_OPEN in sp or (template is not None and THINK_OPEN in template)
        self.thinking_switch = has_thinking_switch(template)

    @classmethod
    def open(cls, path: str | Path, max_context: int | None = None, progress: bool = True,
             **engine_options) -> "ChatSession":  # fmt: skip
        """engine_options: device, gpu_mem, host_mem, gpu_weights, prefix_cache_mem, prefix_cache_dir, fast_experts (see
        Engine.from_pretrained)."""
        engine = Engine.from_pretrained(path, progress=progress, max_context=max_context, **engine_options)
        limit = max_context or min(engine.max_context, 8192)
        return cls(engine, Tokenizer(path), load_template(path), limit)

    def template_variables(self, thinking: bool | None) -> dict:
        """The template's `thinking` variable for a requested mode (None: the template's default). Asking a model
        without the switch for what it does anyway is fine; asking it for the opposite is a ThinkingSwitchError."""
        if thinking is None or (thinking == self.thinking and not self.thinking_switch):
            return {}
        if not self.thinking_switch:
            raise ThinkingSwitchError(f"this model's chat template has no thinking switch; it always "
                                      f"{'thinks' if self.thinking else 'answers without thinking'}")  # fmt: skip
        return {"thinking": thinking}

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None,
                   thinking: bool | None = None) -> list[int]:  # fmt: skip
        """The prompt's token ids: control tokens only where the template put them; a special-token string inside
        the messages or tools (a forged `<|im_end|><|im_system|>...`) stays plain text (chat.render_prompt)."""
        variables = self.template_variables(thinking)
        text, plain = render_prompt(self.template, messages, tools, self.tokenizer.special, **variables)
        return self.tokenizer.encode_prompt(text, plain)

    def check_context(self, messages: list[dict], tools: list[dict] | None, max_tokens: int,
                      thinking: bool | None = None) -> list[int]:  # fmt: skip
        """The prompt's token ids, or ContextLengthError if prompt + max_tokens cannot fit."""
        ids = self.prompt_ids(messages, tools, thinking)
        if len(ids) + max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context of {self.max_context}"
            )
        return ids

    def stream(self, ids: list[int], max_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] = (), cancel: threading.Event | None = None,
               top_logprobs: int | None = None) -> Iterator[Event]:  # fmt: skip
        """Generate after the prompt `ids` (from check_context) and turn the tokens into events.

        Control tokens never reach the text: a generated special or reserved token is dropped (`<think>` and
        `</think>` specials only delimit the reasoning), and a tool-call section yields its complete calls as
        "tool_call" events and nothing else: a section that does not parse (malformed, or cut by max_tokens or a
        stop) gives only the calls completed before the cut, never its raw markup or argument fragments as content.

        top_logprobs (0..20, None = off): every "content" and "reasoning" event carries `logprobs`, one entry per
        generated token of its text in OpenAI's ChatCompletionTokenLogprob shape, from the model's distribution
        (log_softmax of the raw logits, whatever the temperature). An entry's "token" is the text the token added
        to the output (a character split across tokens belongs to the token that completes it; the first has "")
        and "bytes" its own bytes, so the entries' tokens concatenate to the text. An entry goes with the first
        event whose text overlaps the token's (a token that adds no text: with the next character's event), so a
        token cut by the events (held back for a stop string) goes with the event of its first visible character.
        Tokens no event shows anything of have no entry: control tokens, the tail cut at a stop string, think tags
        spelled as text and the whitespace the reasoning split trims around them.
        """
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must lie in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        text = StreamDecoder(self.tokenizer)
        # a prompt ending in <think> (K2.5's generation prompt) has the output start inside the reasoning; the
        # last 8 tokens hold it even spelled out byte by byte, plus a newline
        split, tags = None, set(self.think_tokens.values())
        if self.thinking:
            in_think = self.tokenizer.decode(ids[-8:]).rstrip().endswith(THINK_OPEN)
            markers = (THINK_TOKEN_OPEN, THINK_TOKEN_CLOSE) if tags else (THINK_OPEN, THINK_CLOSE)
            split = ReasoningSplitter(in_think, markers)
        entries: deque = deque()  # (where the token's text starts and ends in all text fed, its logprob entry)
        fed = 0  # characters past the stop-string check so far (the splitter counts the same)

        def take(start: int, end: int) -> list[dict] | None:
            """The entries of the tokens up to `end` that overlap [start, end), an event's text; the others show
            nothing."""
            if top_logprobs is None:
                return None
            out = []
            while entries and entries[0][0] < end:
                a, b, entry = entries.popleft()
                if max(b, a + 1) > start:
                    out.append(entry)
            return out

        def released(piece: str, end: bool = False) -> Iterator[Event]:
            """Events for text past the stop-string check; `end` also releases what the splitter holds back."""
            nonlocal fed
            fed += len(piece)
            if split is None:
                reasoning, content, r_end, c_end = "", piece, 0, fed
            else:
                reasoning, content = split.feed(piece)
                if end:
                    more = split.finish()
                    reasoning, content = reasoning + more[0], content + more[1]
                r_end, c_end = split.reasoning_end, split.content_end
            r_start, c_start = r_end - len(reasoning), c_end - len(content)
            for tag in tags:  # a stray think token: dropped
                reasoning, content = reasoning.replace(tag, ""), content.replace(tag, "")
            if reasoning:
                yield Event("reasoning", text=reasoning, logprobs=take(r_start, r_end))
            if content:
                yield Event("content", text=content, logprobs=take(c_start, c_end))

        pending = ""  # content held back while it could still turn into a stop string
        hold = max((len(s) for s in stop), default=1) - 1
        section: list[int] | None = None  # token ids of a tool-call section being generated
        calls_sent, count, finish = 0, 0, "length"
        for token in self.engine.generate(ids, max_tokens, temperature, top_p, seed, self.stop_ids):
            count += 1
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if token in self.stop_ids:
                finish = "stop"
                break
            if section is None and token == self.section_begin:
                yield from released(pending, end=True)  # text before the tool calls goes out first
                pending = ""
                section = [token]
                continue
            if section is not None:
                section.append(token)
                if token in (self.call_end, self.section_end):  # a call completed: send it at once
                    body = self.tokenizer.decode(section)
                    _, calls = parse_tool_calls(body if token == self.section_end else body + "<|tool_calls_section_end|>")
                    for call in calls[calls_sent:]:
                        yield Event("tool_call", tool_call=call, index=calls_sent)
                        calls_sent += 1
                continue
            if self.tokenizer.is_special(token):  # a control token is no text; think tokens go to the splitter
                piece = self.think_tokens.get(token, "") if split is not None else ""
            else:
                piece = text(token)
                if top_logprobs is not None:
                    at = fed + len(pending)
                    entries.append((at, at + len(piece), self._logprob(token, piece, top_logprobs)))
            pending += piece
            hit = [i for i in (pending.find(s) for s in stop) if i >= 0]
            if hit:  # a stop string: keep what came before it, drop it and the rest
                pending, finish = pending[: min(hit)], "stop"
                break
            if len(pending) > hold:
                yield from released(pending[: len(pending) - hold])
                pending = pending[len(pending) - hold :]
        if finish != "stop":
            pending += text.flush()
        yield from released(pending, end=True)
        if calls_sent and finish != "cancelled":
            finish = "tool_calls"
        usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count,
                 "prompt_tokens_details": {"cached_tokens": self.engine.last_cached_tokens if count else 0}}
        yield Event("done", finish_reason=finish, usage=usage)

    def _logprob(self, token: int, text: str, top: int) -> dict:
        """The ChatCompletionTokenLogprob entry of a sampled token, from the logits it was drawn from."""
        logprobs = torch.log_softmax(self.engine.last_logits.double(), dim=-1)
        entry = {"token": text, "logprob": float(logprobs[token]), "bytes": list(self.tokenizer.token_bytes(token))}
        values, order = logprobs.topk(top) if top else (logprobs[:0], [])
        entry["top_logprobs"] = [self._alternative(int(i), float(v)) for v, i in zip(values, order)]
        return entry

    def _alternative(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def complete(self, messages: list[dict], tools: list[dict] | None = None, max_tokens: int = 512,
                 thinking: bool | None = None, **kwargs) -> ChatResult:  # fmt: skip
        content, reasoning, calls = [], [], []
        logprobs = None if kwargs.get("top_logprobs") is None else {"content": [], "reasoning": []}
        for ev in self.stream(self.check_context(messages, tools, max_tokens, thinking), max_tokens, **kwargs):
            if ev.kind == "content":
                content.append(ev.text)
            elif ev.kind == "reasoning":
                reasoning.append(ev.text)
            elif ev.kind == "tool_call":
                calls.append(ev.tool_call)
            else:
                return ChatResult("".join(content), calls, ev.finish_reason, ev.usage, "".join(reasoning),
                                  *((None, None) if logprobs is None else (logprobs["content"], logprobs["reasoning"])))
            if logprobs is not None and ev.logprobs is not None:
                logprobs[ev.kind] += ev.logprobs
        raise AssertionError("stream ended without a done event")
