"""Every Triton kernel launch the runtime makes compiles for real GPUs, here without one: Triton's own toolchain
builds the cubin for sm_80 (no fp8 instructions: the bit path and uint8 weights) and sm_90 (hardware fp8); the INT4
linear and the bf16-weight launches, which have no fp8, for both. bench/gpu_compile.py reports registers, spills and
shared memory for all of sm_80/86/89/90."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend (its bundled ptxas)")

from gpu_compile import compile_for, record_launches  # noqa: E402

LAUNCHES = record_launches()


def archs(launch) -> tuple[int, ...]:
    name, _, bound, _ = launch
    if name == "int4_linear_kernel" or bound.get("BF16"):  # one code path for Ampere and Hopper
        return (80, 90)
    return (80 if bound.get("HW_FP8") is False else 90,)  # the bit path is for sm_80/86; the rest run on Hopper too


def case_id(launch, arch: int) -> str:
    name, _, bound, _ = launch
    parts = [name, "bf16" if bound.get("BF16") else {None: "", True: "hw_fp8", False: "bits"}[bound.get("HW_FP8")]]
    parts.append(f"m{bound['BLOCK_M']}" if name == "int4_linear_kernel" else "")  # decode or prefill tiles
    parts.append("" if bound.get("EVEN_K", bound.get("EVEN_R", True)) else "ragged")
    return "-".join(p for p in parts if p) + f"-sm_{arch}"


CASES = [pytest.param(launch, arch, id=case_id(launch, arch)) for launch in LAUNCHES for arch in archs(launch)]


def test_the_recorded_launches_cover_every_kernel_and_both_fp8_paths():
    names = {name for name, *_ in LAUNCHES}
    assert names == {"fp8_linear_kernel", "fp8_linear_t_kernel", "mla_split_kernel", "mla_combine_kernel",
                     "int4_linear_kernel"}  # fmt: skip
    assert {b.get("HW_FP8") for n, _, b, _ in LAUNCHES if n == "fp8_linear_kernel"} == {True, False}
    int4 = [b for n, _, b, _ in LAUNCHES if n == "int4_linear_kernel"]
    assert {(b["BLOCK_M"], b["EVEN_K"]) for b in int4} == {(16, True), (16, False), (64, True)}  # decode, prefill
    bf16 = {(n, b.get("EVEN_K")) for n, _, b, _ in LAUNCHES if b.get("BF16")}  # bf16_linear, mla_decode's kv_b
    assert bf16 == {("fp8_linear_kernel", True), ("fp8_linear_kernel", False), ("fp8_linear_t_kernel", None)}


@pytest.mark.parametrize("launch, arch", CASES)
def test_each_launch_compiles_for_its_gpus(launch, arch):
    name, fn, bound, options = launch
    result = compile_for(fn, bound, options, arch)
    assert result["registers"] is not None and 0 < result["registers"] <= 255, result
    if name == "int4_linear_kernel" or bound.get("BF16"):  # tiles chosen not to spill (hybrid/gpu_kernels.py)
        assert result["stack_bytes"] == 0, result
