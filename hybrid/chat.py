"""Kimi-K2's chat format: prompt rendering (the checkpoint's own template, else a built-in twin), tool calls and
the reasoning of thinking models (K2-Thinking, K2.5+: `<think>...</think>` before the answer or the tool calls).

Facts in shared/KIMI_K2.md section 4: no BOS, no newlines between turns, a tool_declare turn with compact
key-sorted JSON before the default system turn, `## Return of {id}` tool turns, and tool calls emitted as
<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
MEDIA = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"

# The template shipped with synthetic checkpoints: K2's current chat_template.jinja shape, written here from
# the documented format (shared/KIMI_K2.md 4.1). Rendered as transformers renders templates (trim_blocks,
# lstrip_blocks, its own `tojson`), it is byte-equal to `render_builtin` (tests/test_chat.py).
CHAT_TEMPLATE = """\
{%- macro render_content(msg) -%}
{%- set c = msg.get('content') -%}
{%- if c is string -%}{{ c }}
{%- elif c is iterable and c is not mapping -%}
{%- for part in c -%}
{%- if part.get('type') == 'text' -%}{{ part.get('text', '') }}
{%- elif part.get('type') in ('image', 'image_url') -%}<|media_start|>image<|media_content|><|media_pad|><|media_end|>
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- set role_name = message.get('name') or message['role'] -%}
{%- if message['role'] == 'user' -%}<|im_user|>{{ role_name }}<|im_middle|>
{%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{ role_name }}<|im_middle|>
{%- else -%}<|im_system|>{{ role_name }}<|im_middle|>
{%- endif -%}
{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
{{- render_content(message) -}}<|tool_calls_section_begin|>
{%- for tool_call in message['tool_calls'] -%}
{%- set arguments = tool_call['function']['arguments'] -%}
<|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>
{%- if arguments is string -%}{{ arguments }}{%- else -%}{{ arguments | tojson }}{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- elif message['role'] == 'tool' -%}## Return of {{ message.get('tool_call_id') }}
{{ render_content(message) }}
{%- else -%}{{ render_content(message) }}
{%- endif -%}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
"""

# The template for thinking models: CHAT_TEMPLATE plus think blocks the way K2.5's chat_template.jinja places them
# (as its public copies show; shared/KIMI_K2.md 8.6), written here, not copied. Assistant turns up to the last one
# that answered (no tool calls) keep only their content, behind an empty `<think></think>`; the later ones (the
# tool-call steps of the turn in progress) keep their `reasoning_content`, unless thinking is off. The generation
# prompt opens the think block (the output starts inside it); `thinking=false` closes it empty instead, so the model
# answers directly. Tools stay JSON as in K2's template (K2.5 declares them TypeScript-style).
THINKING_CHAT_TEMPLATE = """\
{%- macro render_content(msg) -%}
{%- set c = msg.get('content') -%}
{%- if c is string -%}{{ c }}
{%- elif c is iterable and c is not mapping -%}
{%- for part in c -%}
{%- if part.get('type') == 'text' -%}{{ part.get('text', '') }}
{%- elif part.get('type') in ('image', 'image_url') -%}<|media_start|>image<|media_content|><|media_pad|><|media_end|>
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set thinking_off = thinking is defined and thinking is false -%}
{%- set ns = namespace(last_answer=-1) -%}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' and not message.get('tool_calls') -%}
{%- set ns.last_answer = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- set role_name = message.get('name') or message['role'] -%}
{%- if message['role'] == 'user' -%}<|im_user|>{{ role_name }}<|im_middle|>
{%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{ role_name }}<|im_middle|>
{%- if loop.index0 > ns.last_answer and not thinking_off -%}<think>{{ message.get('reasoning_content') or '' }}</think>
{%- else -%}<think></think>
{%- endif -%}
{%- else -%}<|im_system|>{{ role_name }}<|im_middle|>
{%- endif -%}
{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
{{- render_content(message) -}}<|tool_calls_section_begin|>
{%- for tool_call in message['tool_calls'] -%}
{%- set arguments = tool_call['function']['arguments'] -%}
<|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>
{%- if arguments is string -%}{{ arguments }}{%- else -%}{{ arguments | tojson }}{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- elif message['role'] == 'tool' -%}## Return of {{ message.get('tool_call_id') }}
{{ render_content(message) }}
{%- else -%}{{ render_content(message) }}
{%- endif -%}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>
{%- if thinking_off -%}<think></think>{%- else -%}<think>{%- endif -%}
{%- endif -%}
"""
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"


class ChatFormatError(ValueError):
    """A conversation this format cannot express (the message says which message and why)."""


def deep_sort(value):
    """Sort dict keys at every level, as K2's tokenizer does to tools before rendering."""
    if isinstance(value, dict):
        return {k: deep_sort(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [deep_sort(v) for v in value]
    return value


def _content(message: dict) -> str:
    c = message.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, (list, tuple)):
        out = []
        for part in c:
            if part.get("type") == "text":
                out.append(part.get("text", ""))
            elif part.get("type") in ("image", "image_url"):
                out.append(MEDIA)
        return "".join(out)
    return ""


def render_builtin(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True, *,
                   sort_tools: bool = True) -> str:  # fmt: skip
    """The prompt for `messages`, identical to rendering CHAT_TEMPLATE; tools are deep-sorted first."""
    out = []
    if tools:
        tools = deep_sort(tools) if sort_tools else tools
        out.append(f"<|im_system|>tool_declare<|im_middle|>{json.dumps(tools, ensure_ascii=False, separators=(',', ':'))}<|im_end|>")  # noqa: E501
    for i, m in enumerate(messages):
        role = m.get("role")
        if role is None:
            raise ChatFormatError(f"message {i} has no 'role'")
        if i == 0 and role != "system":
            out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>")
        name = m.get("name") or role
        tag = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
        out.append(f"{tag}{name}<|im_middle|>")
        if role == "assistant" and m.get("tool_calls"):
            out.append(_content(m) + "<|tool_calls_section_begin|>")
            for call in m["tool_calls"]:
                args = call["function"]["arguments"]
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                out.append(f"<|tool_call_begin|>{call['id']}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
            out.append("<|tool_calls_section_end|>")
        elif role == "tool":
            out.append(f"## Return of {m.get('tool_call_id')}\n{_content(m)}")
        else:
            out.append(_content(m))
        out.append("<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(out)


def render_template(template: str, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, *, sort_tools: bool = True, **variables) -> str:  # fmt: skip
    """Render a checkpoint's own Jinja chat template the way transformers does (sandboxed, its `tojson`);
    `variables` are extra template variables (vLLM's chat_template_kwargs, e.g. thinking=False)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    tools = (deep_sort(tools) if sort_tools else tools) if tools else None
    return env.from_string(template).render(**variables, messages=messages, tools=tools,
                                            add_generation_prompt=add_generation_prompt)


def render_prompt(template: str | None, messages: list[dict], tools: list[dict] | None = None,
                  specials: Iterable[str] = (), add_generation_prompt: bool = True,
                  **variables) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The prompt (the checkpoint's template, else render_builtin) and the (start, end) spans in it of text from the
    caller's data that could make a control token: Tokenizer.encode_prompt encodes those as plain text.

    Control tokens belong to the template, not to users. Before rendering, in every string and dict key of messages,
    tools and variables (content, text parts, names, ids, tool-call arguments, tool results, reasoning_content,
    tool definitions), each `specials` string, and a string's start or end that is part of one (a special split
    over two content parts, `<|im_` + `end|>`, must not join), becomes a marker `[[NONCE:i]]`, NONCE random digits
    absent from the data: brackets, a colon and digits come through the template's `tojson` (either ensure_ascii),
    html escaping and case filters unchanged. After rendering, each marker becomes its text again and its span is
    returned: any special-token string overlapping a span is the user's, every other one the template's own.
    Other strings reach the template untouched (it may test roles, part types or schema types as it likes), so a
    conversation without such text renders byte for byte as before and encodes to the same ids as the whole
    rendered string: the text between two control tokens, template and user text alike, is one BPE run.
    (Markers for the special text only, not placeholders for whole strings: the template's code then sees the real
    values, and plain text keeps its BPE merges across the template/user boundary, e.g. `## Return of functions.f:0`.)
    """
    tools = deep_sort(tools) if tools else None
    guard = _Guard(specials)
    data = (messages, tools, variables)
    if not guard.needed(data):
        return _render(template, messages, tools, add_generation_prompt, variables), []
    guard.choose_nonce(repr(data))
    rendered = _render(template, guard(messages), guard(tools), add_generation_prompt, guard(variables))
    out, spans, pos, length = [], [], 0, 0
    for m in re.finditer(rf"\[\[{guard.nonce}:(\d+)\]\]", rendered):
        literal = guard.literals[int(m.group(1))]
        out.append(rendered[pos : m.start()])
        length += m.start() - pos
        out.append(literal)
        spans.append((length, length + len(literal)))
        length, pos = length + len(literal), m.end()
    out.append(rendered[pos:])
    return "".join(out), spans


class _Guard:
    """render_prompt's markers: guard(value) is a copy of value with every special-token string, and a string's
    start (end) that is a proper suffix (prefix) of one, replaced by a marker for that text."""

    def __init__(self, specials: Iterable[str]):
        names = sorted(set(specials), key=len, reverse=True)
        self.find = re.compile("|".join(map(re.escape, names))) if names else None
        self.heads = {n[:k] for n in names for k in range(1, len(n))}  # what may end a string and start a special
        self.tails = {n[k:] for n in names for k in range(1, len(n))}  # what may start a string and end a special
        self.longest = max(map(len, names), default=0)
        self.literals: list[str] = []
        self.index: dict[str, int] = {}
        self.nonce = ""

    def edges(self, s: str) -> tuple[int, int]:
        """Lengths of the longest start of `s` that ends a special and the longest end of the rest that starts one."""
        lead = next((k for k in range(min(len(s), self.longest), 0, -1) if s[:k] in self.tails), 0)
        rest = s[lead:]
        tail = next((k for k in range(min(len(rest), self.longest), 0, -1) if rest[-k:] in self.heads), 0)
        return lead, tail

    def needed(self, value) -> bool:
        if isinstance(value, str):
            return self.find is not None and (self.find.search(value) is not None or self.edges(value) != (0, 0))
        if isinstance(value, dict):
            return any(self.needed(k) or self.needed(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return any(self.needed(v) for v in value)
        return False

    def choose_nonce(self, seen: str) -> None:
        while (nonce := f"{secrets.randbelow(10**16):016d}") in seen:
            pass
        self.nonce = nonce

    def marker(self, literal: str) -> str:
        if literal not in self.index:
            self.index[literal] = len(self.literals)
            self.literals.append(literal)
        return f"[[{self.nonce}:{self.index[literal]}]]"

    def __call__(self, value):
        if isinstance(value, str):
            lead, tail = self.edges(value)
            middle = self.find.sub(lambda m: self.marker(m.group()), value[lead : len(value) - tail])
            return (self.marker(value[:lead]) if lead else "") + middle + \
                (self.marker(value[len(value) - tail :]) if tail else "")  # fmt: skip
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


def _render(template: str | None, messages, tools, add_generation_prompt: bool, variables: dict) -> str:
    if template is not None:
        return render_template(template, messages, tools, add_generation_prompt, sort_tools=False, **variables)
    return render_builtin(messages, tools, add_generation_prompt, sort_tools=False)


def load_template(directory: str | Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    config = directory / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def has_thinking_switch(template: str | None) -> bool:
    """Whether a chat template reads a `thinking` variable (K2.5+ templates; K2-Thinking's has none)."""
    return template is not None and re.search(r"\{[{%](?:(?![%}]\}).)*\bthinking\b", template, re.DOTALL) is not None


@dataclass(frozen=True)
class ToolCall:
    id: str  # functions.NAME:IDX, as K2 emits it
    name: str
    arguments: str  # the JSON text exactly as generated

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_SECTION = re.compile(r"<\|tool_calls_section_begin\|>(.*?)<\|tool_calls_section_end\|>", re.DOTALL)
_CALL = re.compile(
    r"<\|tool_call_begin\|>\s*(?P<id>[^<\s]+:\d+)\s*<\|tool_call_argument_begin\|>\s*(?P<args>.*?)\s*<\|tool_call_end\|>",
    re.DOTALL,
)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content before the section, tool calls). Anything malformed comes back as plain text, never an error."""
    start = text.find("<|tool_calls_section_begin|>")
    if start < 0:
        return text, []
    section = _SECTION.search(text, start)
    if section is None:
        return text, []
    body = section.group(1)
    calls = []
    for m in _CALL.finditer(body):
        call_id = m.group("id")
        name = call_id.split(":")[0].split(".")[-1]  # functions.get_weather:0 -> get_weather
        calls.append(ToolCall(call_id, name, m.group("args")))
    leftover = _CALL.sub("", body).strip()
    if not calls or leftover:
        return text, []
    return text[:start], calls


def split_reasoning(text: str, in_think: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a thinking model's output; tool calls stay in content for parse_tool_calls.

    A think block counts only at the start of the output (after whitespace), or from the first character when the
    prompt already opened it (`in_think`). Without `</think>` (cut by max_tokens) everything is reasoning; a
    tool-call section inside the block ends the reasoning there. Whitespace between `</think>` and the answer goes.
    """
    if not in_think:
        body = text.lstrip()
        if not body.startswith(THINK_OPEN):
            return "", text
        text = body[len(THINK_OPEN) :]
    end, section = text.find(THINK_CLOSE), text.find(SECTION_BEGIN)
    if section >= 0 and (end < 0 or section < end):
        return text[:section], text[section:]
    if end < 0:
        return text, ""
    return text[:end], text[end + len(THINK_CLOSE) :].lstrip()


def _partial_tag(text: str, tags: tuple[str, ...] = (THINK_CLOSE, SECTION_BEGIN)) -> int:
    """Length of the longest end of `text` that could still grow into a tag ending the reasoning."""
    return max((k for tag in tags for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


class ReasoningSplitter:
    """split_reasoning for text arriving in pieces: feed() returns (reasoning, content) deltas whose concatenation
    equals split_reasoning of the whole text, however it was cut. Text that may be part of a tag is held back.

    `tags` (open, close) replace `<think>` / `</think>`: a session whose tokenizer has them as special tokens feeds
    one-character stand-ins instead, so that only those tokens, never the same letters typed as text, delimit the
    reasoning. After each feed() / finish(), `reasoning_end` and `content_end` are where the text of the returned
    reasoning and content deltas ends, counted in characters of everything fed (for logprobs).
    """

    def __init__(self, in_think: bool = False, tags: tuple[str, str] = (THINK_OPEN, THINK_CLOSE)):
        self.state = "reasoning" if in_think else "start"  # -> "reasoning" -> "after" (</think> seen) -> "content"
        self.held = ""
        self.open, self.close = tags
        self.start = 0  # position of held[0] in everything fed
        self.reasoning_end = self.content_end = 0

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning = content = ""
        if self.state == "start":
            body = self.held.lstrip()
            if body.startswith(self.open):
                self.start += len(self.held) - len(body) + len(self.open)
                self.state, self.held = "reasoning", body[len(self.open) :]
            elif not self.open.startswith(body):  # cannot become a think block: no reasoning at all
                self.state = "content"
        if self.state == "reasoning":
            ends = [(i, tag) for tag in (self.close, SECTION_BEGIN) if (i := self.held.find(tag)) >= 0]
            if ends:
                i, tag = min(ends)
                reasoning = self.held[:i]
                self.start += i
                if tag == self.close:
                    self.state, self.held = "after", self.held[i + len(tag) :]
                    self.reasoning_end, self.start = self.start, self.start + len(tag)
                else:  # the tool-call section stays in the content, for parse_tool_calls
                    self.state, self.held = "content", self.held[i:]
                    self.reasoning_end = self.start
            else:
                keep = len(self.held) - _partial_tag(self.held, (self.close, SECTION_BEGIN))
                reasoning, self.held = self.held[:keep], self.held[keep:]
                self.start += keep
                self.reasoning_end = self.start
        if self.state == "after":
            body = self.held.lstrip()
            self.start += len(self.held) - len(body)
            self.held = body
            if self.held:
                self.state = "content"
        if self.state == "content":
            content, self.held = self.held, ""
            self.start += len(content)
            self.content_end = self.start
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The held-back text, at the end of the output or where a tool-call section starts (then on: content)."""
        held, state = self.held, self.state
        self.state, self.held = "content", ""
        self.start += len(held)
        if state == "reasoning":
            self.reasoning_end = self.start
            return held, ""
        if state == "after":
            return "", ""
        self.content_end = self.start
        return "", held
