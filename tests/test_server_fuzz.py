"""Fuzzing `hybrid serve`'s request handling: one real server (tiny checkpoint, 256-token context, 6 MB body cap),
a few hundred hypothesis-made requests mutated from valid ones along the request schema's fields, then hand-written
nasty bodies. Never a 5xx, every error an OpenAI error body, no traceback in the server's log, and a normal request
still succeeds at the end. Generation is kept to a token or so, so the run takes seconds."""

import json
import socket
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import WEATHER
from test_server import HELLO, KEY, MODEL, httpx, start_server

from hybrid.api_schema import ChatCompletionRequest

CAP = 6_000_000  # --max-request-bytes
STATUSES: Counter = Counter()  # status histogram of everything sent here (pytest -s prints it)


@pytest.fixture(scope="module")
def fuzz(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    proc, base = start_server(tiny, max_queue=4, max_context=256, extra=("--max-request-bytes", str(CAP)), log=log)
    with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, log
    proc.terminate()
    proc.wait(timeout=30)
    print(f"\nfuzz status histogram: {dict(sorted(STATUSES.items()))}")


def check(r) -> None:
    """No 5xx; an error is exactly {"error": {"message", "type", "param", "code"}}."""
    STATUSES[r.status_code] += 1
    assert r.status_code < 500, r.text
    if r.status_code == 200:  # and no error in-band either
        if r.headers["content-type"].startswith("text/event-stream"):
            lines = r.text.splitlines()
            assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", r.text
            assert not any(line.startswith('data: {"error"') for line in lines), r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls"), r.text
        return
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)


# --- property-based: valid requests, mutated field by field --------------------------------------------------------

CALL = {"id": "functions.weather:0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "X"}'}}
BASES = [
    {"model": MODEL, "messages": HELLO, "max_tokens": 1},
    {"model": MODEL, "max_tokens": 1, "tools": [WEATHER], "tool_choice": "auto", "temperature": 0.5, "top_p": 0.9,
     "seed": 3, "stop": ["\n\n"], "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "Let me look."},
        {"role": "tool", "tool_call_id": CALL["id"], "content": "Sunny"}]},
    {"model": MODEL, "messages": HELLO, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True},
     "chat_template_kwargs": {"thinking": False}, "n": 1, "response_format": {"type": "text"}},
]  # fmt: skip
DELETE = object()
PATHS = [(name,) for name in ChatCompletionRequest.model_fields] + [
    ("unknown_field",), ("messages", 0), ("messages", 9), ("messages", 0, "role"), ("messages", 0, "content"),
    ("messages", 0, "name"), ("messages", 1, "content", 0), ("messages", 1, "content", 0, "type"),
    ("messages", 1, "content", 0, "text"), ("messages", 2, "tool_calls"), ("messages", 2, "tool_calls", 0),
    ("messages", 2, "tool_calls", 0, "id"), ("messages", 2, "tool_calls", 0, "function"),
    ("messages", 2, "tool_calls", 0, "function", "arguments"), ("messages", 2, "reasoning_content"),
    ("messages", 3, "tool_call_id"), ("tools", 0), ("tools", 0, "type"), ("tools", 0, "function", "name"),
    ("tools", 0, "function", "parameters"), ("tools", 0, "function", "parameters", "properties"),
    ("tool_choice", "function", "name"), ("stream_options", "include_usage"), ("chat_template_kwargs", "thinking"),
    ("response_format", "type"),
]  # fmt: skip
NASTY = [None, True, False, 0, -1, 1, 2, 21, 129, 1 << 63, -(1 << 63) - 1, 10**40, 0.5, -2.5, 1e300, "", "x", "none",
         "auto", "required", "text", "json_object", "function", "user", "tool", "\x00", "é\u2028😀", "\ud800",
         [], {}, [None], [[]], {"a": None}, {"type": "text"}, {"type": "function"}, [{"type": "function"}]]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def set_path(body: dict, path: tuple, value) -> None:
    """body[path] = value (or delete), making or replacing containers on the way."""
    node = body
    for key, nxt in zip(path, path[1:]):
        child = node[key] if isinstance(node, dict) and key in node or \
            isinstance(node, list) and isinstance(key, int) and key < len(node) else None  # fmt: skip
        if not isinstance(child, (dict, list)) or isinstance(nxt, int) != isinstance(child, list):
            child = [] if isinstance(nxt, int) else {}
            if isinstance(node, list):
                key = min(key, len(node))
                node[key:key + 1] = [child]
            else:
                node[key] = child
        node = node[min(key, len(node) - 1)] if isinstance(node, list) else node[key]
    last = path[-1]
    if isinstance(node, list):
        if value is DELETE:
            del node[last:last + 1]
        else:
            node[min(last, len(node)):min(last, len(node)) + 1] = [value]
    elif value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value


@st.composite
def requests(draw):
    body = json.loads(json.dumps(draw(st.sampled_from(BASES))))
    values = st.sampled_from(NASTY) | JSON | st.just(DELETE)
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=3)):
        set_path(body, path, value)
    ascii_escapes = draw(st.booleans())  # "\ud800" as an escape (valid JSON, no valid string) or as raw bytes
    raw = json.dumps(body, ensure_ascii=ascii_escapes).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
    content_type = draw(st.sampled_from(["application/json", "application/json", "text/plain", None,
                                         "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]))
    return raw, content_type


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(request=requests())
def test_fuzzed_requests_never_get_a_5xx(fuzz, request):
    raw, content_type = request
    headers = {"Content-Type": content_type} if content_type else {}
    r = fuzz[0].post("/v1/chat/completions", content=raw, headers=headers)
    check(r)


# --- hand-written ---------------------------------------------------------------------------------------------------

def deep(levels: int, leaf=None):
    for _ in range(levels):
        leaf = {"a": leaf}
    return leaf


def with_(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 1, **fields}


def tool(parameters) -> list:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def assistant(**fields) -> list:
    return [*HELLO, {"role": "assistant", **fields}, {"role": "user", "content": "And?"}]


NASTY_BODIES = {
    # deep nesting, in the body and in a tool's parameter schema
    "deep array": (b"[" * 100_000 + b"]" * 100_000, 400),
    "deep object": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 400),
    "deep ignored field": (with_(extra=deep(100)), 400),
    "deep tool schema": (with_(tools=tool({"type": "object", "properties": deep(40)})), 400),
    "huge tool schema": (with_(tools=tool({"type": "object", "enum": list(range(20_000))})), 400),
    "tool schema ok": (with_(tools=tool({"type": "object", "properties": deep(10)})), 200),
    # integers Python's int() refuses, and out-of-range ones
    "5000-digit max_tokens": (b'{"model":"tiny-k2","messages":[],"max_tokens":' + b"9" * 5000 + b"}", 400),
    "huge seed": (with_(seed=10**30), 400),
    "huge temperature": (with_(temperature=10**400), 400),
    "float max_tokens": (with_(max_tokens=1.0), 400),
    "NaN": (b'{"model":"tiny-k2","messages":[],"temperature":NaN}', 400),
    "Infinity": (b'{"model":"tiny-k2","messages":[],"temperature":Infinity}', 400),
    # stream_options that is not an object, include_usage that is not a boolean
    "stream_options string": (with_(stream=True, stream_options="yes"), 400),
    "stream_options list": (with_(stream=True, stream_options=[]), 400),
    "stream_options true": (with_(stream=True, stream_options=True), 400),
    "include_usage no": (with_(stream=True, stream_options={"include_usage": "no"}), 400),
    "stream_options not streaming": (with_(stream_options={"include_usage": True}), 400),
    # malformed tool_calls in an assistant message (the template crashed on these)
    "tool_calls string": (with_(messages=assistant(tool_calls="x")), 400),
    "tool_calls ints": (with_(messages=assistant(tool_calls=[1, 2])), 400),
    "tool_call no function": (with_(messages=assistant(tool_calls=[{"id": "a"}])), 400),
    "tool_call no id": (with_(messages=assistant(tool_calls=[{"function": {"name": "f", "arguments": "{}"}}])), 400),
    "tool_call dict arguments": (with_(messages=assistant(tool_calls=[{"id": "a", "function": {
        "name": "f", "arguments": {"x": 1}}}])), 400),  # fmt: skip
    "tool_call ok": (with_(messages=assistant(tool_calls=[{"id": "a", "function": {"name": "f", "arguments": "{}"}}])),
                     200),
    "tool message no id": (with_(messages=[*HELLO, {"role": "tool", "content": "x"}]), 400),
    # unencodable strings: lone surrogates (escaped and raw), invalid UTF-8, echoed non-ASCII
    "escaped lone surrogate model": (b'{"model":"\\udc80","messages":[]}', 400),
    "raw lone surrogate content": ('{"model":"tiny-k2","messages":[{"role":"user","content":"\ud800"}]}'.encode(
        "utf-8", "surrogatepass"), 400),  # fmt: skip
    "invalid utf-8": (b'{"model":"\xff\xfe","messages":[]}', 400),
    "non-ASCII model echoed": ({"model": "mödel-😀", "messages": HELLO}, 404),
    "surrogate pair ok": (b'{"model":"tiny-k2","max_tokens":1,"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}',
                          200),
    # not an object, or not JSON at all
    "empty": (b"", 400), "null": (b"null", 400), "list": (b"[]", 400), "string": (b'"hi"', 400),
    "trailing garbage": (json.dumps(with_()).encode() + b"}", 400),
    "messages null": (with_(messages=None), 400), "messages object": (with_(messages={}), 400),
    "message null": (with_(messages=[None]), 400),
    "content int": (with_(messages=[{"role": "user", "content": 1}]), 400),
    "unknown part": (with_(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400),
    # semantics: refused, not silently ignored; nulls are absent
    "n=2": (with_(n=2), 400), "n=0": (with_(n=0), 400), "json_object": (with_(response_format={"type": "json_object"}),
                                                                      400),
    "penalty": (with_(presence_penalty=0.5), 400), "logprobs string": (with_(logprobs="yes"), 400),
    "top_logprobs 21": (with_(logprobs=True, top_logprobs=21), 400), "top_logprobs alone": (with_(top_logprobs=1), 400),
    "null hides no sibling": (with_(max_completion_tokens=None, max_tokens=0), 400),
    "nulls everywhere": (with_(tools=None, stop=None, seed=None, n=None, user=None, stream_options=None), 200),
    "unknown fields ignored": (with_(foo={"bar": [1]}, reasoning_effort="low"), 200),
    "bad tool name": (with_(tools=[{"type": "function", "function": {"name": "a b"}}]), 400),
    "named tool not declared": (with_(tool_choice={"type": "function", "function": {"name": "g"}}), 400),
    "wrong model": (with_(model="gpt-9"), 404),
    # size: 5 MB is parsed and tokenized (then too long for the context); past the cap a 413
    "5 MB": (with_(messages=[{"role": "user", "content": "ab " * 1_700_000}]), 400),
    "over the cap, chunked": (iter([b" " * 1_000_000] * 6 + [b"  "]), 413),
}  # fmt: skip


@pytest.mark.parametrize("body, status", NASTY_BODIES.values(), ids=NASTY_BODIES.keys())
def test_nasty_bodies(fuzz, body, status):
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    r = fuzz[0].post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    check(r)
    assert r.status_code == status, r.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_the_content_type_is_not_checked(fuzz, content_type):
    """`curl -d` sends form-urlencoded: the body counts, not its label; a form body itself is not JSON."""
    r = fuzz[0].post("/v1/chat/completions", content=json.dumps(with_()), headers={"Content-Type": content_type or ""})
    check(r)
    assert r.status_code == 200
    form = fuzz[0].post("/v1/chat/completions", data={"model": MODEL})
    check(form)
    assert form.status_code == 400


def test_other_routes_and_methods(fuzz):
    c = fuzz[0]
    for r, status in [(c.get("/v1/chat/completions"), 405), (c.get("/nope"), 404), (c.delete("/health"), 405),
                      (c.post("/v1/models"), 405), (c.get("/v1/models", headers={"Authorization": "Bearer x"}), 401)]:
        check(r)
        assert r.status_code == status


def test_an_announced_body_over_the_cap_is_refused_before_it_comes(fuzz):
    host, port = fuzz[0].base_url.host, fuzz[0].base_url.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {CAP + 1}\r\n\r\n".encode())  # fmt: skip
        reply = b""
        while b"}}" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply, reply
    STATUSES[413] += 1


def test_the_server_is_sound_afterwards(fuzz):
    """Runs last: a normal request succeeds, streamed and not, and no request left a traceback in the log."""
    client, log = fuzz
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    s = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True})
    assert s.status_code == 200 and s.text.rstrip().endswith("data: [DONE]")
    t0 = time.time()  # the slot is freed just after the last event went out
    while client.get("/health").json()["in_flight"] and time.time() - t0 < 5:
        time.sleep(0.01)
    assert client.get("/health").json()["in_flight"] == 0
    text = log.read_text()
    assert "Traceback" not in text and "unexpected error" not in text, text[-3000:]
    assert STATUSES[200] > 20 and STATUSES[400] > 100 and not any(s >= 500 for s in STATUSES)
