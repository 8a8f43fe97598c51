"""The planner's numbers for the published Kimi-K2 configs, its refusals, and `hybrid plan`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid.checkpoint import Checkpoint
from hybrid.config import ModelConfig
from hybrid.placement import GiB, PlanError, checkpoint_dtypes, component_bytes, parse_bytes, plan
from hybrid.presets import KIMI_K2_INSTRUCT, KIMI_K2_INSTRUCT_0905

K2 = ModelConfig.from_dict(KIMI_K2_INSTRUCT)
ROOT = Path(__file__).resolve().parents[1]


def test_k2_numbers_match_the_published_arithmetic():
    """shared/KIMI_K2.md section 6: routed 1014.93 GB, GPU-resident set 14.24 GB, KV 70,272 B/token, 21.14 GB/token."""
    p = plan(K2, 24 * GiB, 1100 * GiB, 32768, host_read_gbs=89.0)
    sizes = {c.name: c for c in p.components}
    assert sizes["routed experts"].nbytes == pytest.approx(1014.93e9, rel=1e-4)
    assert sizes["routed experts"].device == "host"
    assert p.bytes_on("gpu") - sizes["KV cache"].nbytes == pytest.approx(14.24e9, rel=1e-3)
    assert p.kv_bytes_per_token == 70_272 and sizes["KV cache"].nbytes == 70_272 * 32768
    assert p.routed_bytes_per_token == 44_050_944 * 8 * 60
    assert p.expected_decode_tps == pytest.approx(89e9 / 21.14e9, rel=1e-3)  # ~4.2 tokens/s, DESIGN.md
    assert p.gpu_free_for_expert_cache == 24 * GiB - p.bytes_on("gpu") - GiB


def test_k2_0905_has_the_same_weights_and_a_longer_context():
    cfg = ModelConfig.from_dict(KIMI_K2_INSTRUCT_0905)
    assert component_bytes(cfg) == component_bytes(K2)
    plan(cfg, 40 * GiB, 1100 * GiB, 262144)
    with pytest.raises(PlanError, match="exceeds the model's max_position_embeddings 131072"):
        plan(K2, 40 * GiB, 1100 * GiB, 262144)


def test_a_gpu_that_is_too_small_is_refused_with_the_shortfall():
    with pytest.raises(PlanError) as e:
        plan(K2, 16 * GiB, 1100 * GiB, 131072)
    msg = str(e.value)
    assert "KV cache for 131072 tokens 8.58 GiB" in msg and "short by 4.65 GiB" in msg and "16.00 GiB" in msg


def test_embeddings_move_to_host_when_the_gpu_is_tight():
    p = plan(K2, 13 * GiB, 1100 * GiB, 4096)
    assert {c.name: c.device for c in p.components}["embeddings"] == "host"
    assert any("embeddings stay in host RAM" in n for n in p.notes)
    assert p.gpu_free_for_expert_cache >= 0


def test_host_ram_below_the_experts_plans_slots_and_a_disk_tier():
    p = plan(K2, 24 * GiB, 600 * GiB, 8192, host_read_gbs=89, disk_read_gbs=12)
    per_layer = p.expert_bytes * 60
    assert p.expert_slots == 600 * GiB // per_layer == 243  # same slots in every MoE layer
    sizes = {c.name: c for c in p.components}
    assert sizes["routed experts"].device == "host" and sizes["routed experts"].nbytes == 243 * per_layer <= 600 * GiB
    assert sizes["routed (disk tier)"].device == "disk"
    assert sizes["routed experts"].nbytes + sizes["routed (disk tier)"].nbytes == pytest.approx(1014.93e9, rel=1e-4)
    assert any("243 of 384 experts per layer" in n for n in p.notes)
    # all in RAM: 89 / 21.14 tokens/s; half on a 12 GB/s disk: between 1 / (10.57/89 + 10.57/12) and 12 / 10.57
    assert p.tps_range(1.0)[0] == pytest.approx(p.expected_decode_tps)
    low, high = p.tps_range(0.5)
    assert low == pytest.approx(1 / (10.572e9 / 89e9 + 10.572e9 / 12e9), rel=1e-3)
    assert high == pytest.approx(12e9 / 10.572e9, rel=1e-3)
    with pytest.raises(PlanError, match="cannot hold even 8 experts per layer"):
        plan(K2, 24 * GiB, 10 * GiB, 8192)


def test_cpu_only_plans_count_everything_against_host_ram():
    p = plan(K2, 0, 1100 * GiB, None, gpu=False, kv_bytes=4)
    assert p.bytes_on("gpu") == 0 and p.context == 8192 and p.kv_bytes_per_token == 70_272 * 2
    assert p.expert_slots == 384 and p.bytes_on("host") == pytest.approx(14.24e9 + 1014.93e9 + 8192 * 140_544, rel=1e-3)
    with pytest.raises(PlanError, match="the non-expert part does not fit"):
        plan(K2, 0, 13 * GiB, None, gpu=False)  # 13.27 GiB of non-expert weights


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GiB and parse_bytes("1100 GiB") == 1100 * GiB
    assert parse_bytes("80GB") == 80_000_000_000 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(1024) == 1024
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")


def test_checkpoint_plans_read_headers_only(tiny, monkeypatch):
    def no_weights(self, name):
        raise AssertionError("the planner must not read weights")

    monkeypatch.setattr(Checkpoint, "get", no_weights)
    cfg = ModelConfig.from_file(tiny)
    dtypes = checkpoint_dtypes(tiny)
    assert component_bytes(cfg, dtypes) == component_bytes(cfg)  # the writer used K2's dtypes
    total = sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
    assert sum(component_bytes(cfg, dtypes).values()) <= total


def hybrid_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip


def test_cli_plan_table_json_and_refusal(tiny):
    r = hybrid_plan("--preset", "kimi-k2-instruct", "--gpu-mem", "24GiB", "--host-mem", "1100GiB", "--context",
                    "32768", "--host-read-gbs", "89")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "routed experts        host    945.23 GiB" in r.stdout and "at most 4.21 tokens/s" in r.stdout
    r = hybrid_plan("--model", str(tiny), "--gpu-mem", "2GiB", "--host-mem", "1GiB", "--context", "1024",
                    "--host-read-gbs", "20", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["context"] == 1024 and data["host_read_gbs"] == 20 and data["gpu_bytes"] > 0
    r = hybrid_plan("--preset", "kimi-k2-instruct", "--gpu-mem", "24GiB", "--host-mem", "600GiB", "--context",
                    "32768", "--host-read-gbs", "89", "--disk-read-gbs", "12")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "routed (disk tier)    disk    347.08 GiB" in r.stdout
    assert "     50%   1.00 .. 1.14" in r.stdout and "63%   1.25 .. 1.55  <- this plan" in r.stdout
    r = hybrid_plan("--preset", "kimi-k2-instruct", "--gpu-mem", "8GiB", "--host-mem", "1100GiB",
                    "--host-read-gbs", "89")  # fmt: skip
    assert r.returncode == 1 and "the GPU part does not fit" in r.stderr and "short by" in r.stderr
    r = hybrid_plan("--preset", "kimi-k2-instruct", "--gpu-mem", "lots", "--host-mem", "1TB", "--host-read-gbs", "9")
    assert r.returncode == 2 and "cannot read 'lots'" in r.stderr
