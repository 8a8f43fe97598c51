"""`hybrid chat`: a terminal chat on one engine, streamed, with /commands and tokens/s after each answer.
A thinking model's reasoning is shown dimmed (on a terminal) before its answer."""

from __future__ import annotations

import signal
import sys
import threading
import time

from .conversation import ChatSession, ContextLengthError

HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset),
/think on|off (thinking models whose chat template has the switch), /stats (context and speed), /exit.
End a line with \\ to continue it, or put \"\"\" alone on a line to start and end a multi-line message.
Ctrl-C stops an answer; Ctrl-D or /exit leaves."""
DIM, RESET = "\x1b[2m", "\x1b[0m"


class ChatLoop:
    def __init__(self, session: ChatSession, out=sys.stdout, max_tokens: int = 1024, temperature: float = 0.6,
                 top_p: float = 1.0, tools: list[dict] | None = None):  # fmt: skip
        self.session, self.out, self.tools = session, out, tools
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.system: str | None = None
        self.thinking: bool | None = None  # None: the chat template's default
        self.color = out.isatty()
        self.messages: list[dict] = []
        self.last: dict = {}

    def print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def read_message(self) -> str | None:
        """One user message (possibly multi-line); None at end of input."""
        lines: list[str] = []
        block = False
        while True:
            try:
                line = input("... " if lines or block else ">>> ")
            except EOFError:
                return None if not lines else "\n".join(lines)
            if line.strip() == '"""':
                if block:
                    return "\n".join(lines)
                block = True
                continue
            if block:
                lines.append(line)
            elif line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                return "\n".join(lines)

    def command(self, text: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages = []
            self.print("[conversation cleared]")
        elif name == "/system":
            self.system, self.messages = arg.strip() or None, []
            self.print(f"[system prompt {'set' if self.system else 'cleared'}; conversation cleared]")
        elif name == "/think":
            if not self.session.thinking_switch:
                self.print("[this model's chat template has no thinking switch]")
            elif arg.strip() in ("on", "off"):
                self.thinking = arg.strip() == "on"
                self.print(f"[thinking {arg.strip()}]")
            else:
                self.print("[usage: /think on|off]")
        elif name == "/stats":
            prompt = len(self.session.prompt_ids(self.history(), self.tools, self.thinking))
            self.print(f"[{len(self.messages)} messages, {prompt} prompt tokens of {self.session.max_context}; "
                       f"last answer: {self.last or 'none'}]")  # fmt: skip
            if self.session.engine.tier_report():
                self.print(f"[experts: {self.session.engine.tier_report()}]")
            if self.session.engine.prefix_cache is not None:
                self.print(f"[{self.session.engine.prefix_cache.report()}]")
        else:
            self.print(HELP)
        return True

    def history(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def answer(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.session.check_context(self.history(), self.tools, self.max_tokens, self.thinking)
        except ContextLengthError as e:  # the chat goes on: the message is dropped, the user told why
            self.messages.pop()
            self.print(f"[{e}; /reset to start over]")
            return
        parts, reasoning, calls, finish, usage = [], [], [], "stopped", {}
        t0 = time.perf_counter()
        # Ctrl-C asks the generation to stop at the next token; a KeyboardInterrupt would be lost when it lands
        # in a finalizer (Python ignores exceptions there), and it could not reach a running kernel anyway
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            for ev in self.session.stream(ids, max_tokens=self.max_tokens, temperature=self.temperature,
                                          top_p=self.top_p, cancel=stop):  # fmt: skip
                if ev.kind == "reasoning":
                    reasoning.append(ev.text)
                    self.print(f"{DIM}{ev.text}{RESET}" if self.color else ev.text, end="")
                elif ev.kind == "content":
                    if reasoning and not parts:  # the answer starts on its own line, under the reasoning
                        self.print()
                    parts.append(ev.text)
                    self.print(ev.text, end="")
                elif ev.kind == "tool_call":
                    calls.append(ev.tool_call)
                    gap = "\n" if parts or reasoning or len(calls) > 1 else ""
                    self.print(f"{gap}[tool call {ev.tool_call.name}({ev.tool_call.arguments})]", end="")
                else:
                    finish, usage = ev.finish_reason, ev.usage
        finally:
            signal.signal(signal.SIGINT, previous)
        if finish == "cancelled":
            finish = "stopped"
            self.print("\n[stopped]", end="")
        end = time.perf_counter()
        reply = {"role": "assistant", "content": "".join(parts)}
        if reasoning:  # the template decides whether it goes back to the model (K2.5: only in a tool-call turn)
            reply["reasoning_content"] = "".join(reasoning)
        if calls:
            reply["tool_calls"] = [c.to_openai() for c in calls]
        self.messages.append(reply)
        n = usage.get("completion_tokens", len(parts))
        tps = n / (end - t0) if end > t0 else 0.0  # prompt processing included: what the user waited for
        self.last = {"tokens": n, "tokens_per_s": round(tps, 1), "finish": finish}
        self.print(f"\n[{n} tokens, {tps:.1f} tokens/s, {finish}]")

    def run(self) -> int:
        tools = f", tools: {', '.join(t['function']['name'] for t in self.tools)}" if self.tools else ""
        self.print(f"hybrid chat: {self.session.engine.path}{tools}  (/help for commands)")
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.print("\n[Ctrl-D or /exit to leave]")
                continue
            if text is None:
                self.print()
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text.strip()):
                    return 0
                continue
            self.answer(text)
