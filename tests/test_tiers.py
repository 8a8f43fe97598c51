"""Expert tiers and the prefetcher: outputs never depend on the budget, the tiers stay inside it, and a shard that
breaks mid-run fails the request that needed it, clearly, without breaking the engine."""

import json
import shutil
import tracemalloc

import pytest
import torch

from conftest import assert_greedy_agrees

from hybrid import Engine
from hybrid.config import ModelConfig
from hybrid.placement import gpu_mem_for, host_mem_for
from hybrid.tiers import ExpertReadError

PROMPT = list(range(30, 70))  # 40 tokens: the prefill chunk touches every expert (more than the slots)


def host_budget(checkpoint, slots: int, context: int | None = None) -> int:
    """host_mem that leaves exactly `slots` experts per MoE layer after the non-expert part (CPU-only plan)."""
    return host_mem_for(ModelConfig.from_file(checkpoint), slots, context)


@pytest.fixture(scope="module")
def full(tiny):
    return Engine.from_pretrained(tiny, progress=False)


@pytest.mark.parametrize("slots", [8, 4])  # half the experts; exactly top-k
def test_tokens_and_logits_do_not_depend_on_the_budget(tiny, full, slots):
    small = Engine.from_pretrained(tiny, progress=False, host_mem=host_budget(tiny, slots))
    assert small.plan.expert_slots == slots and set(small.tiers) == {1, 2}
    a, b = small.logits(PROMPT), full.logits(PROMPT)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5  # prefill: experts in rounds of `slots`
    for prefetch in (True, False):
        small.prefetcher.enabled = prefetch
        assert list(small.generate(PROMPT[:5], 24)) == list(full.generate(PROMPT[:5], 24))
    stats = small.tiers[1].stats
    assert stats.misses > 0 and stats.bytes_read >= stats.misses * small.plan.expert_bytes


def test_tier_allocations_stay_inside_the_budget(tiny):
    tracemalloc.start()
    try:
        engine = Engine.from_pretrained(tiny, progress=False, host_mem=host_budget(tiny, 6))
        slots_bytes = 6 * engine.plan.expert_bytes * len(engine.tiers)

        def tier_allocations() -> int:
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*hybrid/tiers.py")])
            return sum(s.size for s in snap.statistics("filename"))

        assert slots_bytes <= tier_allocations() <= slots_bytes + 64 * 1024  # the slots, plus small bookkeeping
        list(engine.generate(PROMPT, 16))
        assert tier_allocations() <= slots_bytes + 64 * 1024  # reads land in the slots: nothing else grows
    finally:
        tracemalloc.stop()
    routed_in_ram = {c.name: c.nbytes for c in engine.plan.components}["routed experts"]
    assert sum(t.nbytes for t in engine.tiers.values()) == routed_in_ram == slots_bytes
    assert engine.plan.bytes_on("host") <= engine.plan.host_budget
    for tier in engine.tiers.values():
        resident = tier.expert_in[tier.expert_in >= 0]
        assert len(resident) <= tier.slots and all(tier.slot_of[e] == s for s, e in enumerate(tier.expert_in) if e >= 0)


def test_prefetcher_counts_its_predictions(tiny):
    engine = Engine.from_pretrained(tiny, progress=False, host_mem=host_budget(tiny, 8))
    list(engine.generate(PROMPT[:3], 32))
    first, second = engine.tiers[1].stats, engine.tiers[2].stats
    # layer 1 is predicted from layer 0's attention, layer 2 from layer 1's: one prediction per step each
    assert first.predicted > 0 and second.predicted > 0
    for s in (first, second):
        assert 0 <= s.precision <= 1 and 0 < s.recall <= 1
        assert s.hits + s.waits + s.misses == s.used_when_predicted


def test_a_broken_shard_fails_the_request_and_the_engine_recovers(tiny, tmp_path, full):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    engine = Engine.from_pretrained(ckpt, progress=False, host_mem=host_budget(tiny, 4))
    expected = list(full.generate(PROMPT[:5], 8))
    assert list(engine.generate(PROMPT[:5], 8)) == expected
    shard = engine.tiers[2].infos["model.layers.2.mlp.experts.9.up_proj.weight"].file
    saved = shard.read_bytes()
    shard.write_bytes(saved[: len(saved) // 2])  # truncated under the running engine
    with pytest.raises(ExpertReadError, match=rf"{shard.name}: tensor 'model\.layers\.2\.mlp\.experts\.\d+\..*"):
        for _ in range(4):  # some steps may still hit RAM; a long prefill needs every expert
            engine.logits(PROMPT)
    shard.unlink()
    with pytest.raises(ExpertReadError, match="cannot open shard"):
        engine.logits(PROMPT)
    shard.write_bytes(saved)
    assert list(engine.generate(PROMPT[:5], 8)) == expected
    assert torch.isfinite(engine.logits(PROMPT)).all()


def test_a_broken_shard_fails_one_server_request_and_the_server_goes_on(tiny, tmp_path):
    import openai
    from test_server import KEY, MODEL, start_server

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    proc, base = start_server(ckpt, max_queue=2, max_context=512, extra=("--host-mem", str(host_budget(tiny, 4, 512))))
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]

        def ask():
            return client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=4, temperature=0)

        first = ask().choices[0].message.content
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        shard = ckpt / index["model.layers.2.mlp.experts.15.down_proj.weight"]
        saved = shard.read_bytes()
        shard.write_bytes(saved[:4096])  # every tensor of this shard is gone now
        with pytest.raises(openai.InternalServerError) as info:
            for _ in range(4):
                ask()
        assert shard.name in str(info.value) and "truncated shard" in str(info.value)
        shard.write_bytes(saved)
        assert ask().choices[0].message.content == first and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_gpu_engine_with_disk_tier_and_hot_cache_matches_the_cpu_engine(tiny, full, gpu):
    """The GPU path (CUDA, or the stand-in): pinned tier slots, the hot-expert cache in device memory and the
    prefetcher together; hot experts admitted only from RAM, computed on the device, same tokens."""
    cfg = ModelConfig.from_file(tiny)
    gpu_mem, host_mem = gpu_mem_for(cfg, 4, 256), host_mem_for(cfg, 8, 256, gpu=True)
    engine = Engine.from_pretrained(tiny, device="cuda", gpu_mem=gpu_mem, host_mem=host_mem, max_context=256,
                                    progress=False)  # fmt: skip
    assert engine.plan.expert_slots == 8 and engine.gpu_cache_slots == 4 and engine.prefetcher is not None
    assert all(gpu.is_pinned(t.stack.gate) for t in engine.tiers.values())
    ours, theirs = engine.logits(PROMPT), full.logits(PROMPT)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 2e-2
    tokens = list(engine.generate(PROMPT[:5], 8))
    cache = engine.model.blocks[1].ffn.experts.gpu_cache
    assert cache.swaps > 0 and cache.hit_rate > 0
    assert_greedy_agrees(tokens, full, PROMPT[:5], 8)


def test_a_step_needing_slots_that_prefetches_hold_waits_or_cancels_and_reads_the_right_experts(tiny, monkeypatch):
    """Every slot taken by in-flight (slow) mispredicted prefetches: the step must still get exactly its experts."""
    import time

    import numpy as np

    from cpu_kernels.moe import dequantize_np
    from hybrid import tiers as tiers_module
    from hybrid.checkpoint import Checkpoint
    from hybrid.cpu_experts import stack_experts
    from hybrid.loader import TensorTaker

    ckpt = Checkpoint(tiny)
    take = TensorTaker(ckpt.get)
    template = stack_experts([take.mlp("model.layers.1.mlp.experts.0")])
    slow = tiers_module.read_tensor_into

    def slow_read(info, dst):
        time.sleep(0.02)
        slow(info, dst)

    monkeypatch.setattr(tiers_module, "read_tensor_into", slow_read)
    io = tiers_module.IoPools(prefetch_threads=1, demand_threads=2)
    tier = tiers_module.LayerTier(1, 16, 4, template, ckpt.tensors, io)
    tier.prefetch([0, 1, 2, 3])  # one runs, three wait in the queue
    tier.ensure([12, 13, 14, 15])  # none of them predicted
    assert sorted(tier.expert_in.tolist()) == [12, 13, 14, 15] and not tier.pending
    assert tier.stats.cancelled >= 1 and tier.stats.misses == 4
    for e in (12, 15):
        q = ckpt.get(f"model.layers.1.mlp.experts.{e}.down_proj.weight").view(torch.uint8).numpy().view(np.int8)
        s = ckpt.get(f"model.layers.1.mlp.experts.{e}.down_proj.weight_scale_inv").numpy()
        slot = tier.slot_of[e]
        assert np.array_equal(dequantize_np(tier.stack.down[slot], tier.stack.down_s[slot]), dequantize_np(q, s))
