"""The trained demo model: greedy decoding reproduces its transcripts, and a full tool-call round trip works
through `hybrid serve` with the official openai client (the strongest end-to-end check the suite has)."""

import json

import openai
import pytest
import torch
from test_server import start_server

from hybrid.conversation import ChatSession
from hybrid.demo import TRANSCRIPTS, WEATHER_TOOL, train, uses_tools


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return train(tmp_path_factory.mktemp("demo"), log=lambda *a: None)


@pytest.mark.parametrize("i", range(len(TRANSCRIPTS)))
def test_greedy_decoding_gives_the_trained_answers(demo, i):
    messages, reply = TRANSCRIPTS[i]
    session = ChatSession.open(demo, progress=False)
    r = session.complete(messages, tools=[WEATHER_TOOL] if uses_tools(messages, reply) else None, max_tokens=80,
                         temperature=0.0)  # fmt: skip
    if isinstance(reply, str):
        assert (r.content, r.tool_calls, r.finish_reason) == (reply, [], "stop")
    else:
        assert r.finish_reason == "tool_calls" and r.content == ""
        assert [c.to_openai() for c in r.tool_calls] == [reply]


def test_the_gpu_path_decodes_the_same_tokens_on_the_trained_model(demo):
    """The well-conditioned case for the GPU path (bf16 KV cache, Triton decode kernels; the stand-in without a
    GPU): the trained model's greedy tokens equal the CPU path's for 24 steps, every step by a clear margin."""
    from hybrid import Engine, ModelConfig
    from hybrid.placement import gpu_mem_for

    cpu = ChatSession.open(demo, progress=False)
    gpu_mem = gpu_mem_for(ModelConfig.from_file(demo), 0, 512)  # routed experts all on the CPU worker
    gpu = Engine.from_pretrained(demo, device="cuda", gpu_mem=gpu_mem, progress=False, max_context=512)
    prompt = cpu.prompt_ids(TRANSCRIPTS[0][0])
    ours = list(cpu.engine.generate(prompt, 24))  # most of the 25-token reply
    top2 = cpu.engine.logits(prompt + ours[:-1])[len(prompt) - 1 :].topk(2).values
    assert float(((top2[:, 0] - top2[:, 1]) / top2[:, 0].abs()).min()) > 2e-2
    assert list(gpu.generate(prompt, 24)) == ours


def test_fast_experts_keep_the_trained_answers(demo):
    """The fast mode (rounded expert activations in decode) reaches the kernels, where the CPU has them: its decode
    logits differ from the exact ones, yet every trained reply comes out the same (bench/fast_experts_quality.py
    has the numbers)."""
    from conftest import prefill_then_decode_logits

    from cpu_kernels import fp8_simd

    exact = ChatSession.open(demo, progress=False)
    fast = ChatSession.open(demo, progress=False, fast_experts=True)
    for messages, reply in TRANSCRIPTS:
        tools = [WEATHER_TOOL] if uses_tools(messages, reply) else None
        a, b = (s.complete(messages, tools=tools, max_tokens=80, temperature=0.0) for s in (exact, fast))
        assert (b.content, b.tool_calls, b.finish_reason) == (a.content, a.tool_calls, a.finish_reason)
    ids = exact.prompt_ids(TRANSCRIPTS[0][0])
    ids += list(exact.engine.generate(ids, 8))
    la, lb = (prefill_then_decode_logits(s.engine, ids, len(ids) - 8) for s in (exact, fast))
    assert (not torch.equal(la, lb)) == fp8_simd.FAST
    assert float((la - lb).abs().max() / la.abs().max()) < 1e-2


@pytest.fixture(scope="module")
def demo_client(demo):
    proc, base = start_server(demo, max_queue=4, max_context=1024, model_name="demo")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="test-key", max_retries=0, timeout=120)
    proc.terminate()
    proc.wait(timeout=30)


def test_tool_call_round_trip_through_the_server(demo_client):
    messages = [{"role": "user", "content": "What is the weather in Beijing?"}]
    first = demo_client.chat.completions.create(model="demo", messages=messages, tools=[WEATHER_TOOL], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:0", "get_weather", {"city": "Beijing"})  # fmt: skip
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "name": "get_weather",
         "content": json.dumps({"weather": "Sunny", "temperature": 21})},
    ]  # fmt: skip
    final = demo_client.chat.completions.create(model="demo", messages=messages, tools=[WEATHER_TOOL], temperature=0)
    assert final.choices[0].message.content == "It is sunny in Beijing today, 21 degrees."
    assert final.choices[0].finish_reason == "stop"


def test_streamed_tool_call(demo_client):
    stream = demo_client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL],
        temperature=0, stream=True)  # fmt: skip
    calls = [tc for chunk in stream for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id == "functions.get_weather:0"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_plain_answers_through_the_server(demo_client):
    r = demo_client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Who are you?"}],
                                            temperature=0)  # fmt: skip
    assert r.choices[0].message.content == TRANSCRIPTS[2][1]
