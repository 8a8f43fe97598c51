"""The prefix KV cache: a request that starts like an earlier one prefills only its new tokens, with the same
results as a cold start; budgets evict, the disk tier survives restarts, bad files are never used."""

import warnings

import pytest
import torch
from conftest import relative_error

from hybrid import Engine
from hybrid.config import ModelConfig
from hybrid.placement import gpu_mem_for, host_mem_for

TOL = 1e-5  # warm against cold, CPU fp32: the same math, reassociated


@pytest.fixture(scope="module")
def cold(tiny):
    return Engine.from_pretrained(tiny, progress=False, prefix_cache_mem=0)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 700, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("shared", [1, 16, 23, 40])  # chunk of 16: prefixes ending on, inside and past a chunk
def test_warm_equals_cold_for_shared_prefixes(tiny, cold, shared):
    warm = Engine.from_pretrained(tiny, progress=False)
    warm.PREFILL_CHUNK = cold.PREFILL_CHUNK = 16
    first = prompt(shared) + prompt(9, seed=1)
    second = prompt(shared) + prompt(30, seed=2)  # same `shared` tokens, then different ones
    assert relative_error(warm.next_token_logits(first), cold.next_token_logits(first)) <= TOL
    assert warm.last_cached_tokens == 0
    ours = warm.next_token_logits(second)
    assert warm.last_cached_tokens == shared
    assert relative_error(ours, cold.next_token_logits(second)) <= TOL
    assert list(warm.generate(second, 10)) == list(cold.generate(second, 10))
    assert warm.last_cached_tokens == len(second) - 1  # the whole prompt but its last token


def test_a_conversation_reuses_its_generated_tokens(tiny, cold):
    warm = Engine.from_pretrained(tiny, progress=False)
    turn1 = prompt(50)
    reply = list(warm.generate(turn1, 12))
    turn2 = turn1 + reply[:-1] + prompt(20, seed=3)  # the reply's last token never ran, so it is not cached
    tokens = list(warm.generate(turn2, 12))
    assert warm.last_cached_tokens == len(turn1) + len(reply) - 1
    assert tokens == list(cold.generate(turn2, 12))


def test_interleaved_conversations_both_hit_and_a_new_system_prompt_misses(tiny):
    warm = Engine.from_pretrained(tiny, progress=False)
    a, b = prompt(40, seed=4), prompt(40, seed=5)
    for ids in (a, b):
        warm.next_token_logits(ids)
    for ids in (a, b):
        warm.next_token_logits(ids + [7, 8])
        assert warm.last_cached_tokens == len(ids)
    changed = [a[0], (a[1] + 1) % 700] + a[2:]  # differs at the second token: shares one
    warm.next_token_logits(changed)
    assert warm.last_cached_tokens == 1
    assert warm.prefix_cache.stats.hit_tokens == 81


def test_a_tiny_budget_evicts_and_stays_correct(tiny, cold):
    per_token = 3 * (64 + 16) * 4  # layers x (kv_lora_rank + rope dim) x fp32
    warm = Engine.from_pretrained(tiny, progress=False, prefix_cache_mem=60 * per_token)
    a, b = prompt(50, seed=6), prompt(50, seed=7)
    warm.next_token_logits(a)
    warm.next_token_logits(b)  # a is least recently used: evicted
    assert warm.prefix_cache.nbytes <= 60 * per_token and warm.prefix_cache.stats.evicted_tokens == 50
    ours = warm.next_token_logits(a + [3])
    assert warm.last_cached_tokens == 0
    assert relative_error(ours, cold.next_token_logits(a + [3])) <= TOL
    warm.next_token_logits(b + [3])
    assert warm.last_cached_tokens == 0  # b went when a came back


def test_the_disk_tier_survives_a_restart_and_ignores_bad_files(tiny, cold, tmp_path):
    ids = prompt(60, seed=8)
    first = Engine.from_pretrained(tiny, progress=False, prefix_cache_dir=tmp_path)
    first.next_token_logits(ids)
    first.close_prefix_cache()
    files = sorted(tmp_path.glob("*.kvp"))
    assert len(files) == 1

    second = Engine.from_pretrained(tiny, progress=False, prefix_cache_dir=tmp_path)
    ours = second.next_token_logits(ids + [5])
    assert second.last_cached_tokens == 60 and second.prefix_cache.stats.disk_loads == 1
    assert relative_error(ours, cold.next_token_logits(ids + [5])) <= TOL

    data = bytearray(files[0].read_bytes())
    data[-10] ^= 0xFF  # one flipped latent byte
    files[0].write_bytes(bytes(data))
    third = Engine.from_pretrained(tiny, progress=False, prefix_cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        ours = third.next_token_logits(ids + [5])
    assert third.last_cached_tokens == 0
    assert relative_error(ours, cold.next_token_logits(ids + [5])) <= TOL


def test_files_of_another_model_are_ignored(tiny, checkpoint_factory, tmp_path):
    mine = Engine.from_pretrained(tiny, progress=False, prefix_cache_dir=tmp_path)
    mine.next_token_logits(prompt(30))
    mine.close_prefix_cache()
    (tmp_path / "garbage.kvp").write_bytes(b"HYBRIDKV" + b"\xff" * 20)
    other = checkpoint_factory("prefix_other", num_hidden_layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine.from_pretrained(other, progress=False, prefix_cache_dir=tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "garbage.kvp" in messages and "different model" in messages
    engine.next_token_logits(prompt(30) + [1])
    assert engine.last_cached_tokens == 0


def test_gpu_path_with_tiers_hits_and_agrees(tiny, gpu):
    """The GPU engine (stand-in without CUDA): bf16 latents cached in host RAM, copied back on a hit; with expert
    tiers and the hot-expert cache on."""
    cfg = ModelConfig.from_file(tiny)
    kwargs = dict(device="cuda", gpu_mem=gpu_mem_for(cfg, 4, 256), host_mem=host_mem_for(cfg, 8, 256, gpu=True),
                  max_context=256, progress=False)  # fmt: skip
    warm = Engine.from_pretrained(tiny, prefix_cache_mem="64MiB", **kwargs)
    cold = Engine.from_pretrained(tiny, prefix_cache_mem=0, **kwargs)
    assert warm.tiers and warm.prefix_cache is not None
    history = prompt(80, seed=9)
    warm.next_token_logits(history)
    ids = history + [11, 12, 13]
    ours, theirs = warm.next_token_logits(ids), cold.next_token_logits(ids)
    assert warm.last_cached_tokens == 80
    assert relative_error(ours, theirs) <= 2e-2  # bf16 cache: the cold prefill keeps the chunk's latents in fp32
