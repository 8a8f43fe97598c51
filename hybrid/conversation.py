"""One chat turn on the engine: render K2's prompt, generate, and turn tokens into text, reasoning and tool-call
events.

Shared by `hybrid chat` and `hybrid serve`; both consume `ChatSession.stream()` events.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .chat import (THINK_OPEN, ReasoningSplitter, ToolCall, has_thinking_switch, load_template, parse_tool_calls,
                   render_builtin, render_template)  # fmt: skip
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


@dataclass
class ChatResult:
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: dict
    reasoning: str = ""


class ChatSession:
    """Engine + tokenizer + the checkpoint's chat format. Not thread-safe: one generation at a time."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, template: str | None, max_context: int):
        self.engine, self.tokenizer, self.template, self.max_context = engine, tokenizer, template, max_context
        sp = tokenizer.special
        self.stop_ids = {i for i in (sp.get("<|im_end|>"), sp.get("[EOS]")) if i is not None}
        self.section_begin = sp["<|tool_calls_section_begin|>"]
        self.section_end = sp["<|tool_calls_section_end|>"]
        self.call_end = sp["<|tool_call_end|>"]
        # a thinking model (K2-Thinking, K2.5+): its output is split into reasoning and content
        self.thinking = THINK_OPEN in sp or (template is not None and THINK_OPEN in template)
        self.thinking_switch = has_thinking_switch(template)

    @classmethod
    def open(cls, path: str | Path, max_context: int | None = None, progress: bool = True,
             **engine_options) -> "ChatSession":  # fmt: skip
        """engine_options: device, gpu_mem, host_mem, gpu_weights, prefix_cache_mem, prefix_cache_dir (see
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
        variables = self.template_variables(thinking)
        if self.template is not None:
            text = render_template(self.template, messages, tools, **variables)
        else:
            text = render_builtin(messages, tools)
        return self.tokenizer.encode(text)

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
               seed: int | None = None, stop: list[str] = (),
               cancel: threading.Event | None = None) -> Iterator[Event]:  # fmt: skip
        """Generate after the prompt `ids` (from check_context) and turn the tokens into events."""
        text = StreamDecoder(self.tokenizer)
        # a prompt ending in <think> (K2.5's generation prompt) has the output start inside the reasoning; the
        # last 8 tokens hold it even spelled out byte by byte, plus a newline
        split = None
        if self.thinking:
            split = ReasoningSplitter(self.tokenizer.decode(ids[-8:]).rstrip().endswith(THINK_OPEN))

        def released(piece: str, end: bool = False) -> Iterator[Event]:
            """Events for text past the stop-string check; `end` also releases what the splitter holds back."""
            reasoning, content = split.feed(piece) if split else ("", piece)
            if split and end:
                more = split.finish()
                reasoning, content = reasoning + more[0], content + more[1]
            if reasoning:
                yield Event("reasoning", text=reasoning)
            if content:
                yield Event("content", text=content)

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
            pending += text(token)
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
        if section is not None and calls_sent == 0:  # malformed section: hand it back as text
            yield Event("content", text=self.tokenizer.decode(section))
        if calls_sent and finish != "cancelled":
            finish = "tool_calls"
        usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count,
                 "prompt_tokens_details": {"cached_tokens": self.engine.last_cached_tokens if count else 0}}
        yield Event("done", finish_reason=finish, usage=usage)

    def complete(self, messages: list[dict], tools: list[dict] | None = None, max_tokens: int = 512,
                 thinking: bool | None = None, **kwargs) -> ChatResult:  # fmt: skip
        content, reasoning, calls = [], [], []
        for ev in self.stream(self.check_context(messages, tools, max_tokens, thinking), max_tokens, **kwargs):
            if ev.kind == "content":
                content.append(ev.text)
            elif ev.kind == "reasoning":
                reasoning.append(ev.text)
            elif ev.kind == "tool_call":
                calls.append(ev.tool_call)
            else:
                return ChatResult("".join(content), calls, ev.finish_reason, ev.usage, "".join(reasoning))
        raise AssertionError("stream ended without a done event")
