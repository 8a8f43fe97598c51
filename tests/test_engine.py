"""Engine API behaviour: sampling, stopping, input checks; tokenizer files; the command-line tools."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid import Engine
from hybrid.engine import sample
from hybrid.tokenizer import NAMED_SPECIALS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_pretrained(tiny, progress=False)


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine):
    prompt = [10, 20, 30, 40]
    a = list(engine.generate(prompt, 24, temperature=1.0, seed=123))
    b = list(engine.generate(prompt, 24, temperature=1.0, seed=123))
    c = list(engine.generate(prompt, 24, temperature=1.0, seed=124))
    greedy = list(engine.generate(prompt, 24))
    assert a == b and len(a) == 24
    assert a != c and a != greedy


def test_generate_stops_on_stop_ids_and_respects_max_new_tokens(engine):
    greedy = list(engine.generate([1, 2, 3], 16))
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    assert list(engine.generate([1, 2, 3], 16, stop_ids=[stop_at])) == greedy[: first + 1]
    assert list(engine.generate([1, 2, 3], 0)) == []
    assert list(engine.generate([1, 2, 3], 1)) == greedy[:1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, -5.0])
    g = torch.Generator().manual_seed(0)
    # probabilities 0.507, 0.459, 0.025, ...: top_p 0.5 keeps {0}, top_p 0.6 keeps {0, 1}
    assert {sample(logits, 1.0, 0.5, g) for _ in range(100)} == {0}
    assert {sample(logits, 1.0, 0.6, g) for _ in range(200)} == {0, 1}
    assert len({sample(logits, 1.0, 1.0, g) for _ in range(400)}) >= 3


def test_bad_ids_are_refused(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.logits([])
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        engine.logits([1, 1024])
    with pytest.raises(ValueError):
        next(engine.generate([-1], 4))


def test_unknown_or_missing_devices_are_refused_clearly(tiny, monkeypatch):
    for bad in ("mps", "gpu0"):
        with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
            Engine.from_pretrained(tiny, device=bad, progress=False)
    with pytest.raises(ValueError, match="runs on the CPU only"):
        Engine.from_pretrained(tiny, device="cuda", experts="reference", progress=False)
    if not torch.cuda.is_available():
        monkeypatch.setenv("HYBRID_GPU_STANDIN", "0")
        with pytest.raises(ValueError, match="no CUDA device"):
            Engine.from_pretrained(tiny, device="cuda", progress=False)


def test_max_context_bounds_prompt_plus_new_tokens(tiny):
    small = Engine.from_pretrained(tiny, progress=False, max_context=16)
    assert len(list(small.generate(list(range(10)), 6))) == 6
    with pytest.raises(ValueError, match="exceed this engine's context of 16"):
        next(small.generate(list(range(10)), 7))


def test_tokenizer_files_follow_k2(tiny):
    tok = Tokenizer(tiny)
    cfg = json.loads((tiny / "config.json").read_text())
    assert tok.vocab_size == cfg["vocab_size"] and tok.num_base == cfg["vocab_size"] - 256
    for offset, (name, _) in NAMED_SPECIALS.items():
        assert tok.special[name] == tok.num_base + offset
    assert tok.special["<|reserved_token_%d|>" % (tok.num_base + 5)] == tok.num_base + 5
    assert (tok.bos_id, tok.eos_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    text = "Hello, world!<|im_end|> 你好，世界 x=42\n"
    ids = tok.encode(text)
    assert tok.special["<|im_end|>"] in ids and tok.decode(ids) == text
    assert tok.special["<|im_end|>"] not in tok.encode(text, allow_special=False)
    assert tok.decode(tok.encode(text, allow_special=False)) == text
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(tok.num_base + 11)]["special"] is False  # tool tokens are not special


def test_long_runs_are_cut_like_k2_and_still_round_trip(tiny):
    from hybrid.tokenizer import _pieces

    tok = Tokenizer(tiny)
    text = "a" * 30_000 + " " * 60_000 + "end"
    pieces = list(_pieces(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 30_000, 25_000, 10_003]  # no run of one class beyond 25,000
    assert tok.decode(tok.encode(text)) == text
    assert list(_pieces("")) == [""] and tok.encode("") == []


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_generate_prints_text_and_speed(tiny):
    r = run("-m", "hybrid.cli", "generate", "--model", str(tiny), "--prompt", "Hello there", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello there") and "tokens/s" in r.stderr
    # a host budget far below the experts (the disk tier) prints the same text
    from test_tiers import host_budget

    small = run("-m", "hybrid.cli", "generate", "--model", str(tiny), "--prompt", "Hello there", "--max-new-tokens",
                "8", "--host-mem", str(host_budget(tiny, 4)))  # fmt: skip
    assert small.returncode == 0, small.stderr
    assert small.stdout == r.stdout and "note: host RAM holds 4 of 16 experts per layer" in small.stderr
    assert "RAM hit rate" in small.stderr and "MB read from disk per step" in small.stderr
    assert "RAM hit rate" not in r.stderr
    refused = run("-m", "hybrid.cli", "generate", "--model", str(tiny), "--prompt", "x", "--host-mem", "1MiB")
    assert refused.returncode == 2 and "does not fit" in refused.stderr and "Traceback" not in refused.stderr


def test_cli_reports_a_bad_checkpoint_without_a_traceback(tmp_path):
    r = run("-m", "hybrid.cli", "generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_make_checkpoint_script(tmp_path):
    cfg = json.loads((Path(__file__).parent / "data" / "odd_config.json").read_text())
    (tmp_path / "in.json").write_text(json.dumps(cfg))
    r = run("scripts/make_checkpoint.py", "--config", str(tmp_path / "in.json"), "--out", str(tmp_path / "c"),
            "--layers", "2", "--seed", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    written = json.loads((tmp_path / "c" / "config.json").read_text())
    assert written["num_hidden_layers"] == 2 and written["hidden_size"] == cfg["hidden_size"]
    logits = Engine.from_pretrained(tmp_path / "c", progress=False).logits([1, 2, 3])
    assert logits.shape == (3, cfg["vocab_size"]) and torch.isfinite(logits).all()


def test_engine_uses_the_cpu_kernels_and_matches_the_reference_loop(tiny):
    from hybrid.gpu_experts import HybridExperts
    from hybrid.profile import PROFILE

    fast = Engine.from_pretrained(tiny, progress=False)
    slow = Engine.from_pretrained(tiny, progress=False, experts="reference")
    assert isinstance(fast.model.blocks[1].ffn.experts, HybridExperts)
    ids = list(range(3, 40))
    PROFILE.start()
    a = fast.logits(ids)
    phases = PROFILE.stop()
    b = slow.logits(ids)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    # the routed experts ran on the worker thread, once per MoE layer, overlapped with the shared expert
    assert PROFILE.calls["experts (CPU)"] == 2 and PROFILE.calls["shared expert"] == 2
    assert phases["experts (CPU)"] > 0 and fast.model.blocks[1].ffn.experts.last_path == "cpu"


def test_released_expert_pages_still_read_back_correctly(tiny):
    """After the copy into the expert stack the file pages are dropped; the mapping must still read the file."""
    from hybrid.checkpoint import Checkpoint

    ck = Checkpoint(tiny)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    before = ck.get(name).view(torch.uint8).clone()
    ck.release(name)
    assert torch.equal(ck.get(name).view(torch.uint8), before)
