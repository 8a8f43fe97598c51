import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
# device="cuda" means the real GPU where there is one, else the stand-in (hybrid/device.py): the GPU tests always run
os.environ.setdefault("HYBRID_GPU_STANDIN", "0" if torch.cuda.is_available() else "1")

from hybrid.presets import synthetic_config  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error measure every parity test states its tolerance in."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def prefill_then_decode_logits(engine, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits [len(ids), vocab] from one prefill of ids[:prefill], then one decode step per remaining token (teacher
    forced): the decode kernels' numbers, comparable position by position with a full forward."""
    cache = engine._cache(len(ids))
    out = [engine.model.forward(torch.tensor(ids[:prefill]), 0, cache).float().cpu()]
    for pos in range(prefill, len(ids)):
        out.append(engine.model.forward(torch.tensor(ids[pos : pos + 1]), pos, cache).float().cpu())
    return torch.cat(out)


def assert_greedy_agrees(ours: list[int], reference_engine, prompt: list[int], steps: int, margin: float = 2e-2):
    """Greedy tokens equal the reference engine's, except after a step whose top-2 logits the reference itself
    separates by less than `margin` (relative): there bf16 rounding may legitimately pick the other token."""
    theirs = list(reference_engine.generate(prompt, steps))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is not None:
        top2 = reference_engine.logits(prompt + theirs[:first])[-1].topk(2).values
        assert float(top2[0] - top2[1]) < margin * float(top2.abs().max()), f"diverged at step {first}"


@pytest.fixture(scope="session")
def gpu():
    """The GPU the device="cuda" tests run on: CUDA, or the stand-in on machines without one."""
    from hybrid import device

    return device.get()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Write (once per session) a synthetic checkpoint for a preset plus config overrides."""
    made: dict[str, Path] = {}

    def make(name: str, preset: str = "tiny", shard_mb: float = 1.0, **overrides) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            write_checkpoint(out, synthetic_config(preset, **overrides), shard_bytes=int(shard_mb * 1e6),
                             progress=False)  # fmt: skip
            made[name] = out
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny")


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory) -> Path:
    """A K2.5-style thinking checkpoint (THINKING_CHAT_TEMPLATE, <think> specials) scripted to reason, answer and
    call a tool: from the generation prompt's <think> on, its greedy output is the script below (tests/scripted.py)."""
    from scripted import ANSWER, REASONING, TOOL_CALL, write_scripted

    from hybrid.chat import THINKING_CHAT_TEMPLATE

    script = f"<think>{REASONING}</think>{ANSWER}{TOOL_CALL}<|im_end|>"
    return write_scripted(tmp_path_factory.mktemp("thinking"), script, THINKING_CHAT_TEMPLATE)
