"""`hybrid chat` driven through a pseudo-terminal, as a person would: type, read the stream, press Ctrl-C."""

import os
import pty
import re
import select
import sys
import time
from pathlib import Path

import pytest
from scripted import ANSWER, ARGUMENTS, REASONING

ROOT = Path(__file__).resolve().parents[1]


class Terminal:
    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is its controlling terminal, so Ctrl-C becomes SIGINT
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, *argv])
        self.buffer = ""

    def read_until(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while not re.search(pattern, self.buffer):
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen so far:\n{self.buffer[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {pattern!r}:\n{self.buffer[-2000:]}")
                self.buffer += data.decode("utf-8", "replace").replace("\r\n", "\n")
        m = re.search(pattern, self.buffer)
        seen, self.buffer = self.buffer[: m.end()], self.buffer[m.end() :]
        return seen

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already gone and reaped
            pass
        os.close(self.fd)


@pytest.fixture
def term(tiny):
    t = Terminal(["-m", "hybrid.cli", "chat", "--model", str(tiny), "--temperature", "0", "--max-tokens", "12"])
    t.read_until(r">>> ")
    yield t
    t.close()


def test_a_chat_session(term):
    term.type("Hello there\n")
    answer = term.read_until(r"\[12 tokens, [0-9.]+ tokens/s, length\]\n>>> ")
    assert "Hello there" in answer  # the typed line echoes, then the streamed answer and its speed
    term.type("/stats\n")
    assert re.search(r"\[2 messages, \d+ prompt tokens of \d+", term.read_until(r">>> "))
    term.type('"""\nfirst line\nsecond line\n"""\n')  # a multi-line message
    term.read_until(r"tokens/s, length\]\n>>> ")
    term.type("/stats\n")  # the second turn prefilled only the new message: the first turn's tokens were reused
    hit = re.search(r"prefix cache: ([0-9,]+) of ([0-9,]+) prompt tokens reused", term.read_until(r">>> "))
    assert hit and int(hit.group(1).replace(",", "")) > 20
    term.type("/think off\n")
    assert "[this model's chat template has no thinking switch]" in term.read_until(r">>> ")
    term.type("/system Be brief.\n")
    assert "[system prompt set; conversation cleared]" in term.read_until(r">>> ")
    term.type("/reset\n")
    assert "[conversation cleared]" in term.read_until(r">>> ")
    term.type("/exit\n")
    deadline = time.time() + 30
    while time.time() < deadline:
        pid, status = os.waitpid(term.pid, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    pytest.fail("chat did not exit on /exit")


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tiny):
    t = Terminal(["-m", "hybrid.cli", "chat", "--model", str(tiny), "--temperature", "0", "--max-tokens", "100000",
                  "--max-context", "100100"])  # fmt: skip
    try:
        t.read_until(r">>> ")
        t.type("tell me everything\n")
        t.read_until(r"tell me everything\n.+", timeout=60)  # the answer has started streaming
        time.sleep(0.5)
        t.type("\x03")  # Ctrl-C
        t.read_until(r"\[stopped\]\n\[\d+ tokens, [0-9.]+ tokens/s, stopped\]\n>>> ", timeout=60)
        t.type("/stats\n")
        assert "2 messages" in t.read_until(r">>> ")
    finally:
        t.close()


def test_a_message_over_the_context_is_refused_and_the_chat_goes_on(tiny):
    t = Terminal(["-m", "hybrid.cli", "chat", "--model", str(tiny), "--temperature", "0", "--max-tokens", "8",
                  "--max-context", "120"])  # fmt: skip
    try:
        t.read_until(r">>> ")
        t.type("word " * 200 + "\n")
        t.read_until(r"exceeds the context of 120; /reset to start over\]\n>>> ")
        t.type("Hi\n")
        t.read_until(r"\[8 tokens, [0-9.]+ tokens/s, length\]\n>>> ")
        t.type("/stats\n")
        assert "2 messages" in t.read_until(r">>> ")  # the refused message was not kept
    finally:
        t.close()


def test_reasoning_is_dimmed_and_think_switches_it_off(thinking_model):
    t = Terminal(["-m", "hybrid.cli", "chat", "--model", str(thinking_model), "--temperature", "0"])
    try:
        t.read_until(r">>> ")
        t.type("Weather in Beijing?\n")
        answer = t.read_until(r"tool_calls\]\n>>> ")
        assert "".join(re.findall(r"\x1b\[2m(.*?)\x1b\[0m", answer)) == REASONING  # every piece of it dimmed
        plain = re.sub(r"\x1b\[[0-9]*m", "", answer)
        assert f"{REASONING}\n{ANSWER}\n[tool call weather({ARGUMENTS})]" in plain
        t.type("/think off\n")
        assert "[thinking off]" in t.read_until(r">>> ")
        t.type("And now?\n")
        answer = t.read_until(r"tool_calls\]\n>>> ")
        assert "\x1b[2m" not in answer and f"And now?\n{ANSWER}\n[tool call" in answer
        t.type("/think maybe\n")
        assert "[usage: /think on|off]" in t.read_until(r">>> ")
    finally:
        t.close()
