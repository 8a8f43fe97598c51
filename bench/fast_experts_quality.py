"""How far `--fast-experts` (the CPU decode kernels round the routed experts' activations) moves a model's outputs
from the exact path.

    python bench/fast_experts_quality.py                         # demo (trained), tiny fp8, tiny int4, tiny k25
    python bench/fast_experts_quality.py --cases demo --new 16   # the trained model only, shorter

Fast mode rounds the activations the routed experts' decode kernels read: to bf16 for fp8 experts (vdpbf16ps), to
int8 per 32-element group for INT4 experts (VNNI or AVX2). Prefill (more than 4 tokens per step) stays exact, so every
number here comes from decode steps: each prompt is prefilled up to its last token, then the last prompt token and
the exact engine's greedy continuation are fed one token at a time (teacher forced: both engines see the same
tokens). Over those decoded positions, fast engine against exact engine (same checkpoint, device "cpu"):

  - max relative logit error: max|fast - exact| / max|exact| per position, worst position;
  - KL(exact || fast) of the next-token distributions (softmax of the float64 logits), mean and max;
  - argmax agreement: the share of positions whose argmax is the same;
  - free running: of `--new` greedy tokens per prompt, how many are identical before the first divergence.

The demo model's replies end well before `--new` tokens; after its end-of-turn token it babbles off its training
distribution, where near-tied router scores appear. So for it the same numbers are also given over the replies alone
(the positions up to the one predicting the first <|im_end|>), with how many free-running replies are identical.

Cases: "demo" is the trained demo model (hybrid.demo, fp8 experts; checkpoints/demo when it exists, else trained
into a temporary directory, ~40 s), prompted with the chat prompts of its transcripts. "tiny fp8", "tiny int4" and
"tiny k25" are random-weight checkpoints of the parity tests' shapes (fp8 experts; INT4 experts, flat K2-Thinking
and nested K2.5 layouts, the latter with K2.5's yarn and norm eps as in tests/test_parity.py), prompted with random
tokens. Random-weight models have near-tied logits and router
scores, so any rounding flips argmaxes and expert choices there: their greedy agreement is a pessimistic bound on
what a trained model shows. The fast logits must differ from the exact ones somewhere (else the flag is not reaching
the kernels): the script fails if they are identical. Appends to bench/results/fast_experts_quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, append_result, machine  # noqa: E402

from hybrid import Engine  # noqa: E402
from hybrid.presets import synthetic_config  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# K2.5's text-config values, as tests/test_parity.py INT4_LAYOUTS (without them "tiny k25" is "tiny int4" renested)
K25 = dict(rms_norm_eps=1e-5, rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
           max_position_embeddings=262144)  # fmt: skip
SYNTHETIC = {"tiny fp8": ("tiny", "fp8", "flat", {}), "tiny int4": ("tiny", "int4", "flat", {}),
             "tiny k25": ("tiny", "int4", "k25", K25)}  # fmt: skip
CASES = ["demo", *SYNTHETIC]


def decode_logits(engine: Engine, ids: list[int], prefill: int) -> torch.Tensor:
    """float64 logits [len(ids) - prefill, vocab] of positions prefill.., each from a one-token decode step after a
    prefill of ids[:prefill] (as tests/conftest.py prefill_then_decode_logits): the fast kernels' numbers."""
    cache = engine._cache(len(ids))
    engine.model.forward(torch.tensor(ids[:prefill]), 0, cache, last_only=True)
    rows = [engine.model.forward(torch.tensor(ids[pos : pos + 1]), pos, cache).double().cpu()
            for pos in range(prefill, len(ids))]  # fmt: skip
    return torch.cat(rows)


def engines_and_prompts(case: str, tmp: Path, prompts: int) -> tuple[Engine, Engine, list[list[int]], str, set]:
    """(exact, fast, prompts, experts format, end-of-turn ids: none for the random-weight models) for a case."""
    options = dict(progress=False, prefix_cache_mem=0)  # no reuse of latents across prompts: each one measured alone
    if case == "demo":
        from hybrid.conversation import ChatSession
        from hybrid.demo import TRANSCRIPTS, WEATHER_TOOL, train, uses_tools

        path = ROOT / "checkpoints" / "demo"
        if not (path / "config.json").exists():
            path = train(tmp / "demo", log=lambda *a: None)
        session = ChatSession.open(path, **options)
        ids = [session.prompt_ids(m, [WEATHER_TOOL] if uses_tools(m, r) else None) for m, r in TRANSCRIPTS]
        return session.engine, Engine.from_pretrained(path, fast_experts=True, **options), ids, "fp8", session.stop_ids
    preset, fmt, layout, overrides = SYNTHETIC[case]
    path = write_checkpoint(tmp / case.replace(" ", "_"), synthetic_config(preset, fmt=fmt, layout=layout, **overrides),
                            progress=False)  # fmt: skip
    exact = Engine.from_pretrained(path, **options)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, exact.cfg.vocab_size - 256, (16,), generator=g).tolist() for _ in range(prompts)]
    return exact, Engine.from_pretrained(path, fast_experts=True, **options), ids, fmt, set()


def measure(case: str, tmp: Path, new: int, prompts: int) -> dict:
    t0 = time.perf_counter()
    exact, fast, ids, fmt, stop = engines_and_prompts(case, tmp, prompts)
    rel, kl, agree, margins, answer, equal_before, answers_same = [], [], [], [], [], [], 0
    max_abs = 0.0
    for prompt in ids:
        greedy = list(exact.generate(prompt, new))
        free = list(fast.generate(prompt, new))
        equal_before.append(next((i for i, (a, b) in enumerate(zip(greedy, free)) if a != b), new))
        # the reply proper: positions up to the one predicting the first end-of-turn token (all without one)
        end = next((i + 1 for i, t in enumerate(greedy) if t in stop), new)
        answer.append(torch.arange(new) < end)
        answers_same += equal_before[-1] >= end
        forced = prompt + greedy[:-1]  # row i predicts greedy[i]
        e, f = decode_logits(exact, forced, len(prompt) - 1), decode_logits(fast, forced, len(prompt) - 1)
        assert e.argmax(-1).tolist() == greedy, "teacher-forced exact logits do not reproduce generate()"
        max_abs = max(max_abs, float((f - e).abs().max()))
        rel.append((f - e).abs().amax(-1) / e.abs().amax(-1))
        le, lf = torch.log_softmax(e, -1), torch.log_softmax(f, -1)
        kl.append((le.exp() * (le - lf)).sum(-1))
        agree.append(e.argmax(-1) == f.argmax(-1))
        top2 = e.topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]) / top2[:, 0].abs())
    if max_abs == 0.0:
        raise AssertionError(f"{case}: fast and exact logits are identical: fast_experts is not reaching the kernels")
    rel, kl, agree, margins, answer = (torch.cat(v) for v in (rel, kl, agree, margins, answer))
    in_answer = {}
    if stop:  # the trained model is on its training distribution only up to the end of its reply
        in_answer = {"answer_positions": int(answer.sum()), "answer_max_rel_logit_error": float(rel[answer].max()),
                     "answer_kl_max": float(kl[answer].max()),
                     "answer_argmax_agreement": float(agree[answer].double().mean()),
                     "answers_identical_free_running": answers_same}  # fmt: skip
    return {"case": case, "experts_format": fmt, "prompts": len(ids), "decoded_positions": len(rel),
            "max_rel_logit_error": float(rel.max()), "mean_rel_logit_error": float(rel.mean()),
            "median_rel_logit_error": float(rel.median()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "argmax_agreement": float(agree.double().mean()),
            "greedy_tokens": new, "greedy_equal_before_divergence": equal_before,
            "greedy_prompts_identical": sum(n == new for n in equal_before),
            "min_top2_margin_exact": float(margins.min()), **in_answer,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    p.add_argument("--new", type=int, default=32, help="decoded positions (and free-running greedy tokens) per prompt")
    p.add_argument("--prompts", type=int, default=4, help="random prompts per random-weight case")
    p.add_argument("--out", type=Path, default=RESULTS / "fast_experts_quality.jsonl")
    args = p.parse_args()
    info = machine()
    print(f"{info['cpu']}, {info['threads']} threads")
    print(f"{'case':10s}{'experts':>8}{'positions':>10}{'max rel err':>12}{'median':>10}{'KL mean':>10}{'KL max':>10}"
          f"{'argmax':>8}  greedy equal before divergence (per prompt, of {args.new})")  # fmt: skip
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            r = measure(case, Path(tmp), args.new, args.prompts)
            append_result(args.out, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **r, "machine": info})
            records.append(r)
            print(f"{case:10s}{r['experts_format']:>8}{r['decoded_positions']:>10}{r['max_rel_logit_error']:>12.2e}"
                  f"{r['median_rel_logit_error']:>10.1e}{r['kl_mean']:>10.1e}{r['kl_max']:>10.1e}"
                  f"{r['argmax_agreement']:>8.1%}  "
                  f"{' '.join(map(str, r['greedy_equal_before_divergence']))}")  # fmt: skip
            if "answer_positions" in r:
                print(f"{'  replies':10s}{'':>8}{r['answer_positions']:>10}{r['answer_max_rel_logit_error']:>12.2e}"
                      f"{'':>20}{r['answer_kl_max']:>10.1e}{r['answer_argmax_agreement']:>8.1%}  "
                      f"{r['answers_identical_free_running']}/{r['prompts']} replies identical")  # fmt: skip
    print(f"appended to {args.out}")
    keys = ("max_rel_logit_error", "median_rel_logit_error", "kl_mean", "kl_max", "argmax_agreement",
            "greedy_prompts_identical", "prompts", "answer_max_rel_logit_error", "answers_identical_free_running")
    summary = {r["case"]: {k: r[k] for k in keys if k in r} for r in records}
    print(json.dumps({"bench": "fast_experts_quality", "cpu": info["cpu"], "results": summary}))


if __name__ == "__main__":
    main()
