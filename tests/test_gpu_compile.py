"""Every Triton kernel launch the runtime makes compiles for real GPUs, here without one: Triton's own toolchain
builds the cubin for sm_80 (no fp8 instructions: the bit path and uint8 weights) and sm_90 (hardware fp8).
bench/gpu_compile.py reports registers and spills for all of sm_80/86/89/90."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend (its bundled ptxas)")

from gpu_compile import compile_for, record_launches  # noqa: E402

LAUNCHES = record_launches()


def test_the_recorded_launches_cover_every_kernel_and_both_fp8_paths():
    names = {name for name, *_ in LAUNCHES}
    assert names == {"fp8_linear_kernel", "fp8_linear_t_kernel", "mla_split_kernel", "mla_combine_kernel"}
    assert {b.get("HW_FP8") for n, _, b, _ in LAUNCHES if n == "fp8_linear_kernel"} == {True, False}


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: f"{launch[0]}-{launch[2].get('HW_FP8', '')}")
def test_each_launch_compiles_for_its_gpus(launch):
    name, fn, bound, options = launch
    arch = 80 if bound.get("HW_FP8") is False else 90  # the bit path is for sm_80/86; the rest run on Hopper too
    result = compile_for(fn, bound, options, arch)
    assert result["registers"] is not None and 0 < result["registers"] <= 255, result
