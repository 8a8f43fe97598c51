"""Kimi-K2's chat format: prompt rendering (the checkpoint's own template, else a built-in twin) and tool calls.

Facts in shared/KIMI_K2.md section 4: no BOS, no newlines between turns, a tool_declare turn with compact
key-sorted JSON before the default system turn, `## Return of {id}` tool turns, and tool calls emitted as
<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

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


def render_builtin(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt for `messages`, identical to rendering CHAT_TEMPLATE; tools are deep-sorted first."""
    out = []
    if tools:
        out.append(f"<|im_system|>tool_declare<|im_middle|>{json.dumps(deep_sort(tools), ensure_ascii=False, separators=(',', ':'))}<|im_end|>")  # noqa: E501
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
                    add_generation_prompt: bool = True) -> str:  # fmt: skip
    """Render a checkpoint's own Jinja chat template the way transformers does (sandboxed, its `tojson`)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    tools = deep_sort(tools) if tools else None
    return env.from_string(template).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


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
