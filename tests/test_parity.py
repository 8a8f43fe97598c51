"""Engine logits and generation against transformers' DeepseekV3ForCausalLM on the same checkpoints."""

import pytest
import torch
from conftest import prefill_then_decode_logits, relative_error
from reference import dequantized_copy, load_reference, native_fp8, reference_logits

from hybrid import Engine
from hybrid.model import KVCache

TOL = 1e-4  # max relative logit error, fp32 against fp32
GPU_TOL = 2e-2  # the GPU path (bf16 KV cache, Triton kernels; the stand-in where there is no GPU) against fp32
DS_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip

CONFIGS = {
    # Kimi-K2 routing (one group), K2's yarn, partial edge blocks (kv_a has 80 rows, q_b 192)
    "k2": {},
    # DeepSeek-V3 style: grouped top-k, 2 dense layers, DeepSeek's yarn (beta_fast 32), no q_lora
    "grouped": dict(n_group=4, topk_group=2, num_hidden_layers=4, first_k_dense_replace=2,
                    routed_scaling_factor=2.5, rope_scaling=DS_YARN, rope_theta=10000.0,
                    max_position_embeddings=163840, q_lora_rank=None),
    # no width a multiple of 128, several with partial blocks beyond the first (300 = 128 + 128 + 44)
    "odd": dict(hidden_size=200, intermediate_size=300, moe_intermediate_size=72, q_lora_rank=100, kv_lora_rank=48,
                qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=40, num_attention_heads=3,
                num_key_value_heads=3, n_routed_experts=12, num_experts_per_tok=3, vocab_size=700),
    # plain rope, no yarn
    "no_yarn": dict(rope_scaling=None, rope_theta=10000.0, max_position_embeddings=4096),
}  # fmt: skip


def _ids(vocab: int, n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab - 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return lambda name: tmp_path_factory.mktemp(f"ref_{name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, checkpoint_factory, reference_dir, gpu):
    """The CPU path within 1e-4 of transformers; the GPU path (its prefill, then its decode kernels step by step)
    within 2e-2 of both."""
    ckpt = checkpoint_factory(name, **CONFIGS[name])
    engine = Engine.from_pretrained(ckpt, progress=False)
    ref = load_reference(dequantized_copy(ckpt, reference_dir(name)))
    if engine.cfg.rope_scaling is not None:  # the reference really runs YaRN
        assert ref.config.rope_parameters["rope_type"] == "yarn"
    ids = _ids(engine.cfg.vocab_size, 48)
    ours, theirs = engine.logits(ids), reference_logits(ref, ids)
    assert ours.shape == (48, engine.cfg.vocab_size) and ours.dtype == torch.float32
    assert theirs.std() > 0.5  # non-degenerate logits
    err = relative_error(ours, theirs)
    print(f"{name}: max relative logit error {err:.2e}")
    assert err <= TOL

    on_gpu = Engine.from_pretrained(ckpt, device="cuda", progress=False, max_context=64)
    prefill = on_gpu.logits(ids)
    # decode kernels (Triton fp8 linears, MLA decode) step by step; over an fp32 cache, since a bf16 one moves
    # near-tie routing decisions of these random-weight models (test_greedy_generation_... covers bf16)
    on_gpu.kv_dtype = torch.float32
    stepwise = prefill_then_decode_logits(on_gpu, ids, 44)  # 4 decode steps: the interpreter is slow
    errors = [relative_error(a, b) for a in (prefill, stepwise) for b in (theirs, ours)]
    print(f"{name}: GPU path prefill / decode vs transformers {errors[0]:.1e} / {errors[2]:.1e}, "
          f"vs the CPU path {errors[1]:.1e} / {errors[3]:.1e}")  # fmt: skip
    assert max(errors) <= GPU_TOL


def test_transformers_own_fp8_dequantization_agrees(checkpoint_factory, reference_dir):
    """With 128-aligned widths transformers can dequantize the fp8 checkpoint itself: same numbers."""
    aligned = dict(moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=64,
                   qk_nope_head_dim=64, v_head_dim=64, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    ckpt = checkpoint_factory("aligned", **aligned)
    engine = Engine.from_pretrained(ckpt, progress=False)
    ref = load_reference(native_fp8(ckpt, reference_dir("aligned")))
    ids = _ids(engine.cfg.vocab_size, 32)
    assert relative_error(engine.logits(ids), reference_logits(ref, ids)) <= TOL


def test_greedy_generation_matches_transformers(tiny, reference_dir):
    engine = Engine.from_pretrained(tiny, progress=False)
    ref = load_reference(dequantized_copy(tiny, reference_dir("greedy")))
    prompt = _ids(engine.cfg.vocab_size, 12, seed=7)
    ours = list(engine.generate(prompt, 32))
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                       pad_token_id=0)  # fmt: skip
    assert ours == out[0, len(prompt):].tolist()
    assert len(set(ours)) > 8  # a real continuation, not one token repeated


def test_prefill_then_decode_equals_full_forward(tiny):
    """Absorbed decode against the latent cache gives the logits of the naive full causal forward."""
    engine = Engine.from_pretrained(tiny, progress=False)
    ids = _ids(engine.cfg.vocab_size, 24, seed=3)
    full = engine.logits(ids)
    cache = KVCache(engine.cfg, len(ids))
    steps = [engine.model.forward(torch.tensor(ids[:8]), 0, cache)]
    for pos in range(8, len(ids)):
        steps.append(engine.model.forward(torch.tensor(ids[pos : pos + 1]), pos, cache))
    assert relative_error(torch.cat(steps), full) <= TOL


INT4_LAYOUTS = {
    # K2-Thinking: flat kimi_k2 config, compressed-tensors INT4 routed experts, bf16 everything else
    "int4": dict(fmt="int4"),
    # K2.5+: kimi_k25 (text_config, language_model.* tensors, vision tensors to skip), K2.5's yarn and eps
    "k25": dict(layout="k25", rms_norm_eps=1e-5, rope_scaling=dict(DS_YARN, factor=64.0),
                max_position_embeddings=262144),
}


@pytest.mark.parametrize("layout", INT4_LAYOUTS)
def test_int4_checkpoints_match_transformers(layout, checkpoint_factory, reference_dir, gpu):
    """INT4 experts + bf16 linears, dequantized by compressed-tensors for the reference: logits within 1e-4 and the
    same greedy tokens on the CPU path; the GPU path's prefill and decode within 2e-2."""
    ckpt = checkpoint_factory(f"int4_{layout}", **INT4_LAYOUTS[layout])
    engine = Engine.from_pretrained(ckpt, progress=False)
    assert engine.cfg.quantization.method == "int4"
    ref = load_reference(dequantized_copy(ckpt, reference_dir(f"int4_{layout}")))
    ids = _ids(engine.cfg.vocab_size, 40, seed=5)
    ours, theirs = engine.logits(ids), reference_logits(ref, ids)
    assert theirs.std() > 0.5
    err = relative_error(ours, theirs)
    print(f"{layout}: max relative logit error {err:.2e}")
    assert err <= TOL

    prompt = ids[:12]
    greedy = list(engine.generate(prompt, 24))
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert greedy == out[0, len(prompt):].tolist() and len(set(greedy)) > 6

    on_gpu = Engine.from_pretrained(ckpt, device="cuda", progress=False, max_context=64)
    on_gpu.kv_dtype = torch.float32  # as in test_logits_match_transformers: bf16 latents move near-tie routing
    stepwise = prefill_then_decode_logits(on_gpu, ids, 34)  # 6 decode steps: the interpreter is slow
    errors = [relative_error(on_gpu.logits(ids), theirs), relative_error(stepwise, theirs)]
    print(f"{layout}: GPU path prefill / decode vs transformers {errors[0]:.1e} / {errors[1]:.1e}")
    assert max(errors) <= GPU_TOL
