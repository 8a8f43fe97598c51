"""`hybrid serve` as a real process on loopback, driven by the official openai client (and raw HTTP for bad input)."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from scripted import ANSWER, ARGUMENTS, CALL_ID, REASONING, WEATHER

try:  # the HTTP client the openai package itself uses
    import httpx2 as httpx
except ImportError:
    import httpx

from hybrid.conversation import ChatSession

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "tiny-k2"
HELLO = [{"role": "user", "content": "Hello there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, max_queue: int, max_context: int, model_name: str = MODEL, extra: tuple = (),
                 log: Path | None = None):  # fmt: skip
    """`hybrid serve` in a subprocess on a free loopback port; returns (process, base URL) once /health answers.
    Its output goes to a pipe, or to the file `log` (a server answering many requests would fill the pipe)."""
    port = free_port()
    cmd = [sys.executable, "-m", "hybrid.cli", "serve", "--model", str(checkpoint), "--port", str(port),
           "--api-key", KEY, "--max-queue", str(max_queue), "--max-context", str(max_context),
           "--model-name", model_name, *extra]  # fmt: skip
    out = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text() if log else proc.stdout.read()}")
    else:
        proc.kill()
        pytest.fail("server did not come up")
    return proc, base


@pytest.fixture(scope="module")
def server(tiny):
    proc, base = start_server(tiny, max_queue=4, max_context=512)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def one_slot_server(tiny):
    """A server whose queue holds one request, with room for a long (several seconds) generation."""
    proc, base = start_server(tiny, max_queue=1, max_context=8192)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny):
    """The same checkpoint in-process: what the server must reproduce."""
    return ChatSession.open(tiny, max_context=512, progress=False)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_completion_matches_the_engine(client, local):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    expected = local.complete(HELLO, max_tokens=12, temperature=0.0)
    assert r.choices[0].message.content == expected.content and r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(local.prompt_ids(HELLO)) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_gives_the_same_text(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_developer_role_is_the_system_role(client, local):
    dev = [{"role": "developer", "content": "Be brief."}, *HELLO]
    r = client.chat.completions.create(model=MODEL, messages=dev, max_tokens=6, temperature=0)
    sys_msgs = [{"role": "system", "content": "Be brief."}, *HELLO]
    assert r.choices[0].message.content == local.complete(sys_msgs, max_tokens=6, temperature=0.0).content
    assert r.usage.prompt_tokens == len(local.prompt_ids(sys_msgs))


def test_sampling_parameters_and_stop(client):
    a = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    b = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0).choices[0]
    stop = full.message.content[3:5]
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full.message.content[: full.message.content.index(stop)]


def post(server, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} if key else {}
    return httpx.post(f"{server}/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers=headers, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    "body, raw, status, param",
    [
        (None, b"{not json", 400, None),
        ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, None, 400, "temperature"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, None, 400, "max_tokens"),
        ({"model": MODEL, "messages": []}, None, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages"),
        ({"model": "gpt-9", "messages": HELLO}, None, 404, "model"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": 600}, None, 400, "messages"),  # over the 512 context
        ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function", "function": {"description": "x"}}]},
         None, 400, "tools"),
        ({"model": MODEL, "messages": HELLO, "stop": [3]}, None, 400, "stop"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "x", "reasoning_content": 5}]},
         None, 400, "messages"),
        ({"model": MODEL, "messages": HELLO, "chat_template_kwargs": {"thinking": True}},
         None, 400, "chat_template_kwargs"),  # this model's template cannot think
        ({"model": MODEL, "messages": HELLO, "stream": True, "stream_options": "yes"}, None, 400, "stream_options"),
        ({"model": MODEL, "messages": HELLO, "stream": True, "stream_options": {"include_usage": "no"}},
         None, 400, "stream_options"),
        ({"model": MODEL, "messages": [{"role": "assistant", "tool_calls": [{"id": "x"}]}]}, None, 400, "messages"),
        ({"model": MODEL, "messages": HELLO, "max_completion_tokens": None, "max_tokens": 0}, None, 400, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "n": 2}, None, 400, "n"),
        ({"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}}, None, 400, "response_format"),
        ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, None, 400, "top_logprobs"),
        (None, b'{"model": "tiny-k2", "seed": ' + b"9" * 5000 + b"}", 400, None),
        (None, b"[" * 100_000 + b"]" * 100_000, 400, None),
        (None, b'{"model": "\\ud800", "messages": []}', 400, None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, raw, status, param):
    r = post(server, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_context_overflow_has_the_openai_code(server):
    r = post(server, {"model": MODEL, "messages": HELLO, "max_tokens": 600})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_api_key_is_required(server):
    assert post(server, {"model": MODEL, "messages": HELLO}, key=None).status_code == 401
    for header in (f"bearer {KEY}", f"BEARER  {KEY}"):  # the scheme is case-insensitive
        r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1},
                       headers={"Authorization": header}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
    basic = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert basic.status_code == 401 and basic.json()["error"]["type"] == "authentication_error"
    r = post(server, {"model": MODEL, "messages": HELLO}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_two_concurrent_clients_both_finish(client, local):
    expected = local.complete(HELLO, max_tokens=8, temperature=0.0).content
    results = [None, None]

    def ask(i):
        results[i] = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].message.content for r in results] == [expected, expected]


def test_a_full_queue_answers_429_and_a_disconnect_frees_its_slot(one_slot_server):
    server = one_slot_server
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8000, "stream": True, "temperature": 0}
    with httpx.Client(timeout=60) as c:
        req = c.build_request("POST", f"{server}/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        stream = c.send(req, stream=True)
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ") and next(lines) == ""
        assert '"content"' in next(lines)  # generation is under way
        busy = post(server, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        assert busy.headers["retry-after"] == "1"
        stream.close()  # disconnect mid-stream
    t0 = time.time()
    while httpx.get(f"{server}/health").json()["in_flight"] and time.time() - t0 < 10:
        time.sleep(0.02)
    freed = time.time() - t0
    assert freed < 2.0, f"slot freed only after {freed:.1f} s"  # the 8000-token generation was cut short
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_a_non_streaming_client_that_hangs_up_stops_its_generation(one_slot_server):
    server = one_slot_server
    body = {"model": MODEL, "messages": HELLO, "temperature": 0}  # no max_tokens: the rest of the 8192 context
    with pytest.raises(httpx.TimeoutException):  # hangs up after 1 s, mid-generation
        httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1)
    t0 = time.time()
    while httpx.get(f"{server}/health").json()["in_flight"] and time.time() - t0 < 10:
        time.sleep(0.02)
    freed = time.time() - t0
    assert freed < 2.0, f"slot freed only after {freed:.1f} s"
    ok = post(server, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_max_tokens_left_out_is_the_rest_of_the_context(server, local):
    long = [{"role": "user", "content": "Hello there, " * 60}]
    prompt = len(local.prompt_ids(long))
    assert 200 < prompt < 512  # refused before: a missing max_tokens reserved 512
    r = post(server, {"model": MODEL, "messages": long, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens"] == prompt
    assert r["usage"]["total_tokens"] == 512 or r["choices"][0]["finish_reason"] == "stop"
    full = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "Hello there, " * 200}]})
    assert full.status_code == 400 and full.json()["error"]["code"] == "context_length_exceeded"


def test_null_is_the_same_as_absent(server):
    body = {"model": MODEL, "messages": HELLO, "max_completion_tokens": None, "max_tokens": 3, "temperature": 0,
            "stop": None, "tools": None, "seed": None, "stream": None, "response_format": None}
    r = post(server, body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def test_openapi_publishes_the_request_schema(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    schemas = spec["components"]["schemas"]
    fields = set(schemas["ChatCompletionRequest"]["properties"])
    assert {"model", "messages", "tools", "logprobs", "stream_options"} <= fields
    assert {"Message", "Tool", "ToolCall"} <= set(schemas)


def test_health_answers_while_a_5mb_request_is_prepared(server):
    """Parsing, rendering and tokenizing run off the event loop: /health stays fast meanwhile."""
    text = "Lorem ipsum dolor sit amet. " * 180_000
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]})
    assert len(big) > 5_000_000
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", post(server, None, raw=big)))
    worker.start()
    latencies = []
    with httpx.Client(timeout=10) as c:
        while worker.is_alive():
            t = time.perf_counter()
            assert c.get(f"{server}/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.01)
    worker.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 5 and max(latencies) < 0.1, f"/health took up to {max(latencies) * 1e3:.0f} ms"


def test_unexpected_errors_are_openai_errors_and_logged(caplog):
    """In-process, on a session whose prompt rendering fails: a 500 with an OpenAI body, and a log line."""
    import asyncio

    from hybrid.server import Server, create_app

    class Broken:
        max_context, thinking = 512, False

        def prompt_ids(self, *args):
            raise RuntimeError("boom")

    async def ask():
        transport = httpx.ASGITransport(app=create_app(Server(Broken(), MODEL)), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})

    r = asyncio.run(ask())
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "RuntimeError" in caplog.text


def test_a_model_without_reasoning_answers_as_before(server):
    plain = post(server, {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0}).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]
    off = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0,
           "chat_template_kwargs": {"thinking": False}}
    assert post(server, off).json()["choices"] == plain["choices"]  # what it does anyway: accepted, no change


# A thinking model (K2.5's template shape), scripted: from the prompt's <think> it reasons, answers, calls a tool.
ASK = [{"role": "user", "content": "Weather in Beijing?"}]
THINKING_OFF = {"chat_template_kwargs": {"thinking": False}}


@pytest.fixture(scope="module")
def thinker(thinking_model):
    proc, base = start_server(thinking_model, max_queue=4, max_context=1024, model_name="thinker")
    yield base, openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    proc.terminate()
    proc.wait(timeout=30)


def ask_thinker(client, **kwargs):
    return client.chat.completions.create(model="thinker", messages=ASK, tools=[WEATHER], temperature=0, **kwargs)


def test_reasoning_content_is_apart_from_content_and_tool_calls(thinker):
    r = ask_thinker(thinker[1])
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == (REASONING, ANSWER, "tool_calls")
    assert [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls] == [(CALL_ID, "weather", ARGUMENTS)]
    # the tool-call step goes back as clients send it, reasoning_content included, and the chat goes on
    tool = {"role": "tool", "tool_call_id": CALL_ID, "content": "Sunny"}
    again = thinker[1].chat.completions.create(model="thinker", messages=ASK + [m.model_dump(exclude_none=True), tool],
                                               tools=[WEATHER], temperature=0)  # fmt: skip
    assert again.choices[0].message.reasoning_content == REASONING


def test_streamed_reasoning_comes_as_reasoning_content_deltas(thinker):
    deltas = [c.choices[0].delta for c in ask_thinker(thinker[1], stream=True) if c.choices]
    kinds = [("reasoning" if getattr(d, "reasoning_content", None) else "content" if d.content else "tool")
             for d in deltas[1:-1]]  # fmt: skip
    assert kinds == sorted(kinds, key=["reasoning", "content", "tool"].index)  # reasoning, answer, tool call
    assert kinds.count("reasoning") > 1  # streamed as generated, not at the end
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert [c.id for d in deltas for c in d.tool_calls or []] == [CALL_ID]


def test_thinking_off_through_chat_template_kwargs(thinker):
    m = ask_thinker(thinker[1], extra_body=THINKING_OFF).choices[0].message
    assert (m.reasoning_content, m.content, [c.id for c in m.tool_calls]) == (None, ANSWER, [CALL_ID])
    streamed = [c.choices[0].delta for c in ask_thinker(thinker[1], stream=True, extra_body=THINKING_OFF) if c.choices]
    assert not any(getattr(d, "reasoning_content", None) for d in streamed)
    assert "".join(d.content or "" for d in streamed) == ANSWER


def test_reasoning_cut_by_max_tokens_is_all_reasoning(thinker):
    r = ask_thinker(thinker[1], max_tokens=3)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == ("The quick brown", "", "length")


@pytest.mark.parametrize("kwargs", ["thinking", {"thinking": "off"}, {"enable_thinking": False}, [False]])
def test_bad_chat_template_kwargs(thinker, kwargs):
    r = post(thinker[0], {"model": "thinker", "messages": ASK, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


def test_cached_tokens_for_a_multi_turn_exchange(tiny, local):
    """A fresh server: turn 1 reuses nothing; turn 2 reuses what turn 1 prompted and generated, up to where the
    re-rendered history differs, and says so in usage.prompt_tokens_details (message and final stream chunk)."""
    proc, base = start_server(tiny, max_queue=2, max_context=512)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        turn1 = [{"role": "system", "content": "You keep a ledger."}, *HELLO]
        r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=10, temperature=0)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        p1 = local.prompt_ids(turn1)
        generated = list(local.engine.generate(p1, 10, stop_ids=local.stop_ids))
        turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "And tomorrow?"}]  # fmt: skip
        p2, held = local.prompt_ids(turn2), p1 + generated[:-1]  # the last generated token never ran
        shared = next((i for i, (a, b) in enumerate(zip(p2, held)) if a != b), min(len(p2), len(held)))
        assert shared >= len(p1)
        stream = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4, temperature=0, stream=True,
                                                stream_options={"include_usage": True})  # fmt: skip
        assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == shared
        r3 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4, temperature=0)
        assert r3.usage.prompt_tokens_details.cached_tokens == len(p2) - 1  # the same prompt again
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "from the prefix cache" in out  # the server's log line


# logprobs last: they need ChatSession.stream(top_logprobs=...)
def test_logprobs_in_both_response_forms(client):
    ask = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0}
    assert client.chat.completions.create(**ask).choices[0].logprobs is None
    r = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.refusal is None and 0 < len(lp.content) <= r.usage.completion_tokens
    assert bytes(b for e in lp.content for b in e.bytes).decode(errors="replace") == r.choices[0].message.content
    for e in lp.content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)  # greedy took the likeliest
    chunks = [c for c in client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True) if c.choices]
    for c in chunks:  # each chunk carries the logprobs of its own delta
        assert (c.choices[0].logprobs is not None) == bool(c.choices[0].delta.content)
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in lp.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in lp.content], abs=1e-4)
    zero = client.chat.completions.create(**ask, logprobs=True).choices[0].logprobs.content
    assert [e.token for e in zero] == [e.token for e in lp.content] and all(e.top_logprobs == [] for e in zero)


def test_logprobs_of_a_thinking_model(thinker):
    """Reasoning tokens' logprobs go under `reasoning_content`, beside OpenAI's `content`."""
    body = {"model": "thinker", "messages": ASK, "tools": [WEATHER], "temperature": 0, "logprobs": True}
    choice = post(thinker[0], body).json()["choices"][0]
    lp, m = choice["logprobs"], choice["message"]
    assert "".join(e["token"] for e in lp["content"]) == m["content"] == ANSWER
    assert "".join(e["token"] for e in lp["reasoning_content"]) == m["reasoning_content"] == REASONING
    lines = post(thinker[0], {**body, "stream": True}).text.splitlines()
    chunks = [json.loads(line[6:])["choices"] for line in lines if line.startswith("data: {")]
    streamed = [c[0]["logprobs"] or {} for c in chunks if c]
    assert "".join(e["token"] for lp in streamed for e in lp.get("reasoning_content") or []) == REASONING
    assert "".join(e["token"] for lp in streamed for e in lp.get("content") or []) == ANSWER
