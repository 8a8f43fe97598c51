"""K2 chat rendering (built-in vs the template rendered as transformers renders it), tool-call parsing, and the
reasoning of thinking models (the thinking template, the reasoning/content split, streamed and whole)."""

import pytest
from scripted import ANSWER, CALL_ID, REASONING, TOOL_CALL
from scripted import WEATHER as SCRIPTED_TOOL
from scripted import write_scripted
from transformers.utils.chat_template_utils import render_jinja_template

from hybrid.chat import (CHAT_TEMPLATE, THINKING_CHAT_TEMPLATE, ReasoningSplitter, deep_sort, has_thinking_switch,
                         load_template, parse_tool_calls, render_builtin, render_template, split_reasoning)  # fmt: skip
from hybrid.conversation import ChatSession, ThinkingSwitchError
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


# The thinking template: K2.5's shape (hybrid/chat.py says which choices it makes and why).
THINKING_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},  # answered: reasoning dropped
    {"role": "user", "content": "Weather in Beijing?"},
    {"role": "assistant", "content": "", "reasoning_content": "need the tool", "tool_calls": [CALL]},  # in progress
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny"},
]


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [None, True, False])
def test_thinking_template_renders_as_transformers_does(name, thinking):
    messages, tools = CONVERSATIONS[name]
    variables = {} if thinking is None else {"thinking": thinking}
    ours = render_template(THINKING_CHAT_TEMPLATE, messages, tools, **variables)
    sorted_tools = None if tools is None else deep_sort(tools)
    theirs = render_jinja_template([messages], tools=sorted_tools, chat_template=THINKING_CHAT_TEMPLATE,
                                   add_generation_prompt=True, **variables)[0][0]  # fmt: skip
    assert ours == theirs
    if not any(m["role"] == "assistant" for m in messages):  # messages and tools exactly as the K2 template has them
        assert render_template(THINKING_CHAT_TEMPLATE, messages, tools, False) == render_builtin(messages, tools, False)


def test_thinking_template_turns_and_switch():
    on = render_template(THINKING_CHAT_TEMPLATE, THINKING_TURNS)
    assert on.endswith("<|im_assistant|>assistant<|im_middle|><think>")  # the output starts inside the reasoning
    assert "<|im_middle|><think></think>Hello.<|im_end|>" in on and "greet back" not in on
    assert "<|im_middle|><think>need the tool</think><|tool_calls_section_begin|>" in on
    off = render_template(THINKING_CHAT_TEMPLATE, THINKING_TURNS, thinking=False)
    assert off.endswith("<|im_assistant|>assistant<|im_middle|><think></think>") and "need the tool" not in off
    assert render_template(THINKING_CHAT_TEMPLATE, THINKING_TURNS, thinking=True) == on


@pytest.mark.parametrize("template, switch", [
    (THINKING_CHAT_TEMPLATE, True),
    (CHAT_TEMPLATE, False),
    ("{%- if thinking is defined and thinking is false -%}<think></think>{%- else -%}<think>{%- endif -%}", True),
    ("{{ '<think>' if thinking }}", True),
    ("<|im_middle|><think></think>{{ content }}{# no thinking variable here #}", False),
    ("{%- if preserve_thinking -%}{%- endif -%}", False),
    (None, False),
])  # fmt: skip
def test_thinking_switch_is_read_from_the_template(template, switch):
    assert has_thinking_switch(template) is switch


SPLITS = [  # (text, the prompt opened the think block, reasoning, content)
    ("Just an answer.", False, "", "Just an answer."),
    ("  <think>plan</think>\n\nAnswer", False, "plan", "Answer"),
    ("plan</think>Answer", True, "plan", "Answer"),
    ("plan, cut by max_tokens", True, "plan, cut by max_tokens", ""),
    ("<think>plan, cut</thi", False, "plan, cut</thi", ""),
    ("Answer <think>not reasoning</think>", False, "", "Answer <think>not reasoning</think>"),
    ("<thin", False, "", "<thin"),
    ("  ", False, "", "  "),
    ("", True, "", ""),
    ("<think>a < b</think>x<y", False, "a < b", "x<y"),
    (f"plan{TOOL_CALL}", True, "plan", TOOL_CALL),  # tool calls inside the reasoning end it
    (f"<think>plan</think> {TOOL_CALL}", False, "plan", TOOL_CALL),
    (f"plan</think>Let me check.{TOOL_CALL}", True, "plan", f"Let me check.{TOOL_CALL}"),
]  # fmt: skip


@pytest.mark.parametrize("text, in_think, reasoning, content", SPLITS)
def test_split_reasoning(text, in_think, reasoning, content):
    assert split_reasoning(text, in_think) == (reasoning, content)
    if TOOL_CALL in content:  # the tool calls still parse from the content
        assert [c.id for c in parse_tool_calls(content)[1]] == [CALL_ID]


def _streamed(pieces, in_think):
    """The split of the pieces fed one by one; each delta is checked to be the text fed that ends where the splitter
    says (reasoning_end / content_end: how stream() places the logprob entries)."""
    splitter, reasoning, content, fed = ReasoningSplitter(in_think), "", "", ""
    for piece in [*pieces, None]:
        fed += piece or ""
        r, c = splitter.feed(piece) if piece is not None else splitter.finish()
        assert r == "" or fed[splitter.reasoning_end - len(r) : splitter.reasoning_end] == r
        assert c == "" or fed[splitter.content_end - len(c) : splitter.content_end] == c
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("text, in_think", [(t, i) for t, i, _, _ in SPLITS] + [
    (" \n<think>\nstep one\n</think>\n\n  The answer.", False),
    ("<think>x</think></think><think>", False),
])  # fmt: skip
def test_streamed_split_equals_the_whole_split_at_every_cut(text, in_think):
    """Cut at every pair of places (every single cut included): the deltas add up to the split of the whole
    text, so no tag text, whole or partial, ever leaks into either field."""
    whole = split_reasoning(text, in_think)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _streamed([text[:i], text[i:j], text[j:]], in_think) == whole, (i, j)
    assert _streamed(list(text), in_think) == whole


def test_a_model_that_opens_its_own_think_block(tmp_path):
    """K2-Thinking's shape: the template has no switch and leaves <think> to the model, whose tool calls come
    inside the reasoning (no </think>): the engine's own tokens, split as they stream."""
    path = write_scripted(tmp_path, f"<|im_middle|><think>{REASONING}{TOOL_CALL}<|im_end|>", CHAT_TEMPLATE)
    session = ChatSession.open(path, max_context=512, progress=False)
    assert session.thinking and not session.thinking_switch
    ask = [{"role": "user", "content": "Weather in Beijing?"}]
    r = session.complete(ask, [SCRIPTED_TOOL], max_tokens=64, thinking=True)  # what it does anyway: fine
    assert (r.reasoning, r.content, r.finish_reason) == (REASONING, "", "tool_calls")
    assert [c.id for c in r.tool_calls] == [CALL_ID]
    with pytest.raises(ThinkingSwitchError, match="no thinking switch"):
        session.complete(ask, thinking=False)


def test_a_thinking_model_answers_inside_the_opened_block(thinking_model):
    session = ChatSession.open(thinking_model, max_context=512, progress=False)
    r = session.complete([{"role": "user", "content": "Hi"}], max_tokens=64)
    assert (r.reasoning, r.content, [c.id for c in r.tool_calls]) == (REASONING, ANSWER, [CALL_ID])
    off = session.complete([{"role": "user", "content": "Hi"}], max_tokens=64, thinking=False)
    assert (off.reasoning, off.content) == ("", ANSWER)


def test_a_thinking_model_answers_inside_the_opened_block_with_logprobs(thinking_model):
    """Reasoning and content each carry the logprob entries of their own tokens; the think tokens have none."""
    session = ChatSession.open(thinking_model, max_context=512, progress=False)
    r = session.complete([{"role": "user", "content": "Hi"}], max_tokens=64, top_logprobs=2)
    assert (r.reasoning, r.content, r.finish_reason) == (REASONING, ANSWER, "tool_calls")
    assert "".join(e["token"] for e in r.reasoning_logprobs) == REASONING
    assert "".join(e["token"] for e in r.logprobs) == ANSWER
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"] for e in r.logprobs)


# Prompt ids come from render_prompt + encode_prompt (control tokens only from the template); for conversations
# without special-token strings they must equal encoding the whole rendered prompt, as before.
@pytest.fixture(scope="module")
def thinking_tokenizer(tmp_path_factory):
    from hybrid.bpe import write_tokenizer
    from hybrid.config import ModelConfig
    from hybrid.presets import synthetic_config

    out = tmp_path_factory.mktemp("thinking_tokenizer")
    write_tokenizer(out, ModelConfig.from_dict(synthetic_config("tiny")).vocab_size - 256, thinking=True)
    return Tokenizer(out)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, THINKING_CHAT_TEMPLATE, None], ids=["k2", "thinking", "builtin"])
@pytest.mark.parametrize("thinking_tokens", [False, True])
def test_prompt_ids_equal_encoding_the_rendered_prompt(tiny, thinking_tokenizer, template, thinking_tokens):
    tok = thinking_tokenizer if thinking_tokens else Tokenizer(tiny)
    session = ChatSession(None, tok, template, 4096)
    cases = [*CONVERSATIONS.values(), (THINKING_TURNS, [WEATHER])]
    for (messages, tools), thinking in [(c, t) for c in cases for t in ([None, False] if session.thinking_switch else [None])]:  # noqa: E501
        variables = {} if thinking is None else {"thinking": thinking}
        rendered = render_builtin(messages, tools) if template is None else \
            render_template(template, messages, tools, **variables)  # fmt: skip
        assert session.prompt_ids(messages, tools, thinking) == tok.encode(rendered)
