"""The hybrid step: the CPU-expert worker (submit / result), the streamed device-expert path and the choice between
them, the planner's defaults, and the GPU engine against the CPU engine (on CUDA, or on the stand-in)."""

import numpy as np
import pytest
import torch
from conftest import assert_greedy_agrees, prefill_then_decode_logits
from conftest import relative_error as logit_error
from test_cpu_kernels import make_stack, relative_error, route

from cpu_kernels import reference_moe
from cpu_kernels.int4 import reference_moe_int4
from hybrid import Engine
from hybrid.config import ModelConfig
from hybrid.cpu_experts import ExpertWorker, expert_flops
from hybrid.device import on_device
from hybrid.gpu_experts import MIN_STREAM_TOKENS, ExpertRates, HybridExperts, StreamedExperts, stream_is_faster
from hybrid.placement import GiB, PlanError, gpu_mem_for, plan
from hybrid.presets import KIMI_K2_INSTRUCT

TOL = 1e-5
GPU_TOL = 2e-2  # logits of the GPU path (bf16 KV cache) against the CPU fp32 path


@pytest.fixture(scope="module")
def stack():
    return make_stack(E=12, hidden=384, inter=256, seed=3)


@pytest.fixture(scope="module", params=["fp8", "int4"])
def any_stack(request, stack):
    """Both expert formats, with their float64 references: the GPU paths take the format from the stack."""
    if request.param == "fp8":
        return stack, reference_moe
    from test_int4_kernels import make_stack as make_int4_stack

    return make_int4_stack(E=12, hidden=384, inter=256, seed=3), reference_moe_int4


@pytest.fixture(scope="module", params=[True, False], ids=["thread", "inline"])
def worker(request):
    w = ExpertWorker(hidden=384, top_k=4, max_tokens=8, threaded=request.param)
    yield w
    w.close()


def inputs(T: int, seed: int):
    ids, weights = route(T, 12, 4, seed)
    x = np.random.default_rng(seed).standard_normal((T, 384)).astype(np.float32)
    return x, ids, weights


@pytest.mark.parametrize("T", [1, 3, 37])  # decode kernel, and a chunk that outgrows the staging buffers
def test_worker_results_match_the_float64_reference(stack, worker, T):
    x, ids, weights = inputs(T, T)
    pending = worker.submit(stack, torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(weights))
    out = pending.result().numpy()
    assert relative_error(out, reference_moe(x, ids, weights, stack)) <= TOL
    # the staging buffer is reused by the next job: an earlier result must not change under it
    kept = out.copy()
    worker.submit(stack, torch.from_numpy(x * 2), torch.from_numpy(ids), torch.from_numpy(weights)).result()
    assert np.array_equal(out, kept)


def test_worker_errors_reach_the_caller_and_the_worker_goes_on(stack, worker):
    x, ids, weights = inputs(2, 5)
    bad = ids.copy()
    bad[0, 0] = 99
    pending = worker.submit(stack, torch.from_numpy(x), torch.from_numpy(bad), torch.from_numpy(weights))
    with pytest.raises(RuntimeError, match="worker failed") as info:
        pending.result()
    assert "out of range" in str(info.value.__cause__)
    good = worker.submit(stack, torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(weights)).result()
    assert relative_error(good.numpy(), reference_moe(x, ids, weights, stack)) <= TOL


def test_an_uncollected_job_is_superseded_by_the_next_submit(stack, worker):
    """An interrupted step never collects its result; the next step must still work (and the stale result fail)."""
    x, ids, weights = inputs(2, 6)
    stale = worker.submit(stack, torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(weights))
    fresh = worker.submit(stack, torch.from_numpy(x * 3), torch.from_numpy(ids), torch.from_numpy(weights))
    assert relative_error(fresh.result().numpy(), reference_moe(x * 3, ids, weights, stack)) <= TOL
    with pytest.raises(RuntimeError, match="superseded"):
        stale.result()


def test_the_path_choice_follows_the_measured_rates(stack, worker, gpu):
    T, k = 128, 4
    flops, nbytes = expert_flops(stack, T * k), 10 * stack.expert_bytes()
    # the CPU needs flops / rate seconds; the copy path needs the bytes of the 10 distinct experts over PCIe
    slow_pcie = ExpertRates(cpu_flops_per_s=flops / 1.0, pcie_bytes_per_s=nbytes / 2.0)
    fast_pcie = ExpertRates(cpu_flops_per_s=flops / 1.0, pcie_bytes_per_s=nbytes / 0.5)
    assert not stream_is_faster(T, k, 10, stack, slow_pcie)
    assert stream_is_faster(T, k, 10, stack, fast_pcie)

    always_stream = ExpertRates(cpu_flops_per_s=1.0, pcie_bytes_per_s=1e30)
    device_worker = ExpertWorker(hidden=384, top_k=4, device=gpu, max_tokens=8)
    layer = HybridExperts(stack, device_worker, StreamedExperts(stack, gpu), always_stream)
    for T in (MIN_STREAM_TOKENS - 1, MIN_STREAM_TOKENS):
        x, ids, weights = inputs(T, T)
        out = layer(*(gpu.to(torch.from_numpy(a)) for a in (x, ids, weights)))
        assert layer.last_path == ("cpu" if T < MIN_STREAM_TOKENS else "device")
        assert relative_error(out.cpu().numpy(), reference_moe(x, ids, weights, stack)) <= TOL
    device_worker.close()


def test_plan_picks_the_longest_context_that_fits_and_places_tensors():
    k2 = ModelConfig.from_dict(KIMI_K2_INSTRUCT)
    p = plan(k2, 20 * GiB, 1100 * GiB, None)
    assert 80_000 < p.context < k2.max_position_embeddings and 0 <= p.gpu_free_for_expert_cache < p.kv_bytes_per_token
    with pytest.raises(PlanError, match="short by"):
        plan(k2, 20 * GiB, 1100 * GiB, p.context + 1)
    assert plan(k2, 80 * GiB, 1100 * GiB, None).context == k2.max_position_embeddings
    assert p.device_of("model.layers.3.mlp.experts.17.up_proj.weight") == "host"
    assert p.device_of("model.layers.3.self_attn.kv_b_proj.weight_scale_inv") == "gpu"
    assert p.device_of("model.layers.3.mlp.shared_experts.down_proj.weight") == "gpu"


# ---- the GPU path: on CUDA where there is one, else on the stand-in (hybrid/device.py) ----


@pytest.fixture(scope="module")
def gpu_engine(tiny, gpu):
    """4 of 16 experts per layer fit the hot-expert cache: each step splits its experts between GPU and CPU."""
    gpu_mem = gpu_mem_for(ModelConfig.from_file(tiny), 4, 512)
    return Engine.from_pretrained(tiny, device="cuda", gpu_mem=gpu_mem, progress=False, max_context=512)


def test_gpu_engine_matches_the_cpu_engine(tiny, gpu, gpu_engine):
    cpu = Engine.from_pretrained(tiny, progress=False)
    attn = gpu_engine.model.blocks[0].attn
    assert on_device(attn.q_b.q) and on_device(attn.kv_b.scale) and gpu_engine.kv_dtype == torch.bfloat16
    assert gpu.is_pinned(gpu_engine.model.blocks[1].ffn.experts.stack.gate)
    assert gpu_engine.worker.threaded  # the routed experts run beside the device work
    assert gpu_engine.gpu_cache_slots == 4
    ids = list(range(5, 60))
    a, b = gpu_engine.logits(ids), cpu.logits(ids)
    assert logit_error(a, b) <= GPU_TOL
    assert_greedy_agrees(list(gpu_engine.generate([7, 8, 9], 8)), cpu, [7, 8, 9], 8)  # 32 steps: test_demo


def test_gpu_decode_steps_match_the_cpu_engine_step_by_step(tiny, gpu_engine):
    """Teacher-forced decode (Triton fp8 linears and MLA decode over the bf16 cache) against the CPU fp32 path."""
    cpu = Engine.from_pretrained(tiny, progress=False)
    ids = [(i * 53) % 900 for i in range(36)]
    assert logit_error(prefill_then_decode_logits(gpu_engine, ids, 30), cpu.logits(ids)) <= GPU_TOL


def test_gpu_streamed_experts_and_worker_match_the_reference(any_stack, gpu):
    stack, reference_moe = any_stack
    x, ids, weights = inputs(96, 11)
    args = tuple(gpu.to(torch.from_numpy(a)) for a in (x, ids, weights))
    streamed = StreamedExperts(stack, gpu)(*args).cpu().numpy()
    ref = reference_moe(x, ids, weights, stack)
    assert relative_error(streamed, ref) <= TOL
    w = ExpertWorker(hidden=384, top_k=4, device=gpu, max_tokens=16)  # grows to 96 on the way
    out = w.submit(stack, *args).result()
    assert on_device(out) and relative_error(out.cpu().numpy(), ref) <= TOL
    w.close()


def test_gpu_long_prefill_path_gives_the_same_logits(gpu_engine):
    ids = [(i * 37) % 700 for i in range(300)]
    base = gpu_engine.logits(ids)
    layers = gpu_engine.model.blocks[1:]
    saved = [b.ffn.experts.rates for b in layers]
    try:
        for block in layers:
            block.ffn.experts.rates = ExpertRates(cpu_flops_per_s=1.0, pcie_bytes_per_s=1e30)  # force streaming
        streamed = gpu_engine.logits(ids)
        assert gpu_engine.model.blocks[1].ffn.experts.last_path == "device"
    finally:
        for block, rates in zip(layers, saved):
            block.ffn.experts.rates = rates
    assert logit_error(streamed, base) <= 1e-3


def test_synthetic_weights_made_in_memory_equal_the_written_checkpoint(tiny):
    from hybrid.presets import synthetic_config
    from hybrid.synthetic import SyntheticTensors

    cfg = ModelConfig.from_dict(synthetic_config("tiny"))
    in_memory = Engine.from_tensors(cfg, SyntheticTensors(cfg), progress=False)
    on_disk = Engine.from_pretrained(tiny, progress=False)
    ids = list(range(20, 50))
    assert torch.equal(in_memory.logits(ids), on_disk.logits(ids))


def test_gpu_cache_computes_hot_experts_and_keeps_the_numbers(any_stack, gpu):
    """Admission by score, split of assignments between the GPU and the CPU worker, same outputs."""
    stack, reference_moe = any_stack
    from hybrid.gpu_cache import GpuExpertCache

    cache = GpuExpertCache(stack, 12, slots=3, device=gpu)
    worker = ExpertWorker(hidden=384, top_k=4, device=gpu, max_tokens=8)
    layer = HybridExperts(stack, worker, gpu_cache=cache)
    rng = np.random.default_rng(0)
    for step in range(12):
        T = 1 if step % 3 else 5
        x = rng.standard_normal((T, 384)).astype(np.float32)
        skew = np.array([0.3, 0.25, 0.15] + [0.3 / 9] * 9)  # experts 0-2 are hot
        ids = np.stack([rng.choice(12, size=4, replace=False, p=skew) for _ in range(T)]).astype(np.int64)
        weights = rng.random((T, 4)).astype(np.float32)
        out = layer(*(gpu.to(torch.from_numpy(a)) for a in (x, ids, weights)))
        assert relative_error(out.cpu().numpy(), reference_moe(x, ids, weights, stack)) <= TOL
    assert set(cache.expert_in) >= {0, 1} and cache.swaps >= 3 and cache.hit_rate > 0.2
    worker.close()


def test_swap_budget_limits_admissions_across_layers():
    from hybrid.gpu_cache import SwapBudget

    budget = SwapBudget(per_step=2 / 60)  # two swaps per 60-layer token
    granted = sum(budget.take() for _ in range(60 * 10))
    assert granted == 20
