"""K2 chat rendering (built-in vs the template rendered as transformers renders it) and tool-call parsing."""

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from hybrid.chat import CHAT_TEMPLATE, deep_sort, load_template, parse_tool_calls, render_builtin, render_template
from hybrid.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get weather",
           "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}  # fmt: skip
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}  # fmt: skip

CONVERSATIONS = {
    "plain": ([{"role": "user", "content": "Hello!"}], None),
    "own system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "你好，世界"}], None),
    "tools round trip": ([{"role": "user", "content": "Weather in Beijing?"},
                          {"role": "assistant", "content": "", "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
                           "content": '{"weather": "Sunny"}'},
                          {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "x\ny"}], [WEATHER]),
    "parallel calls, dict args, text first": (
        [{"role": "user", "content": "two cities"},
         {"role": "assistant", "content": "Checking.", "tool_calls": [
             CALL, {"id": "functions.get_weather:1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "东京", "unit": "c"}}}]}], [WEATHER]),
    "content parts": ([{"role": "user", "content": [{"type": "text", "text": "see "}, {"type": "image_url"},
                                                     {"type": "text", "text": " this"}]},
                       {"role": "assistant", "content": []}], None),
}  # fmt: skip


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_builtin_renderer_is_byte_equal_to_the_template(name, generation_prompt):
    messages, tools = CONVERSATIONS[name]
    ours = render_builtin(messages, tools, add_generation_prompt=generation_prompt)
    sorted_tools = None if tools is None else deep_sort(tools)  # K2's tokenizer sorts before rendering
    theirs = render_jinja_template([messages], tools=sorted_tools, chat_template=CHAT_TEMPLATE,
                                   add_generation_prompt=generation_prompt)[0][0]  # fmt: skip
    assert ours == theirs
    assert render_template(CHAT_TEMPLATE, messages, tools, generation_prompt) == ours


def test_the_documented_example_prompt():
    """shared/KIMI_K2.md 4.2, with the parameters elided there filled in."""
    prompt = render_builtin([{"role": "user", "content": "Weather in Beijing?"}], [WEATHER])
    assert prompt == (
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Get weather","name":"get_weather",'
        '"parameters":{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}},'
        '"type":"function"}]<|im_end|><|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by '
        "Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>Weather in Beijing?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )


def test_rendered_prompts_tokenize_to_k2_specials(tiny):
    tok = Tokenizer(tiny)
    ids = tok.encode(render_builtin([{"role": "user", "content": "Hi"}]))
    for name in ("<|im_system|>", "<|im_middle|>", "<|im_end|>", "<|im_user|>", "<|im_assistant|>"):
        assert tok.special[name] in ids
    assert ids[0] == tok.special["<|im_system|>"]  # no BOS
    assert load_template(tiny) == CHAT_TEMPLATE


def test_parse_single_and_parallel_calls():
    out = ("<|tool_calls_section_begin|><|tool_call_begin|> functions.get_weather:0 <|tool_call_argument_begin|> "
           '{"city": "Beijing"} <|tool_call_end|><|tool_calls_section_end|>')  # fmt: skip
    content, calls = parse_tool_calls(out)
    assert content == "" and len(calls) == 1
    assert calls[0].to_openai() == {"id": "functions.get_weather:0", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}  # fmt: skip
    two = ("Let me check.<|tool_calls_section_begin|>"
           '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "A"}<|tool_call_end|>'
           '<|tool_call_begin|>functions.search.web:1<|tool_call_argument_begin|>{\n  "q": "b\\nc"\n}<|tool_call_end|>'
           "<|tool_calls_section_end|>")  # fmt: skip
    content, calls = parse_tool_calls(two)
    assert content == "Let me check."
    assert [(c.id, c.name) for c in calls] == [("functions.get_weather:0", "get_weather"), ("functions.search.web:1", "web")]
    assert calls[1].arguments == '{\n  "q": "b\\nc"\n}'  # arguments spanning lines, kept verbatim


@pytest.mark.parametrize("text", [
    "no tools here",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}",  # cut off
    "<|tool_calls_section_begin|>garbage<|tool_calls_section_end|>",
    "<|tool_calls_section_begin|><|tool_call_begin|>no_index<|tool_call_argument_begin|>{}<|tool_call_end|>"
    "<|tool_calls_section_end|>",
])  # fmt: skip
def test_malformed_sections_come_back_as_text(text):
    assert parse_tool_calls(text) == (text, [])
