"""Compile every Triton kernel launch the runtime makes for real GPU targets, without a GPU: Triton's own
toolchain (LLVM, ptxas) builds the cubin for a named compute capability, and its cuobjdump reads the registers
and the stack (spill) bytes per thread. Catches what the interpreter cannot: a kernel that does not compile for
sm_80 (no fp8 types there) or sm_90, and register pressure that would spill on the GPU.

    python bench/gpu_compile.py [--archs 80 86 89 90] [--out bench/results/gpu_compile.jsonl]

The launches are recorded from the launchers themselves (hybrid/gpu_kernels.py) run once through the
interpreter on small inputs, so the signatures and constexprs compiled are exactly the ones the runtime passes.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HYBRID_GPU_STANDIN"] = "1"  # record the launches on the CPU, whatever this machine has
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HW_FP8_ARCH = 89  # sm_89+ converts e4m3 in hardware; older targets get the bit path (and uint8 weights)


def record_launches() -> list[tuple[str, object, dict, dict]]:
    """(kernel name, python function, arguments by name, launch options) of every distinct launch the runtime makes
    for a decode-sized fp8 linear (both fp8 paths, split-K on and off), a bf16 linear (split-K on and off, a ragged K
    tile), an MLA decode with an fp8 and with a bf16 kv_b (several splits) and an INT4 linear (decode and prefill
    tiles, split-K on and off, a ragged K tile)."""
    from triton.runtime.interpreter import InterpretedFunction

    from hybrid import gpu_kernels as gk
    from hybrid.fp8 import quantize

    seen: dict = {}
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = list(inspect.signature(self.fn).parameters)
        bound = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        seen.setdefault((self.fn.__name__, *signature(self.fn, bound).items()), (self.fn.__name__, self.fn, bound, options))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    g = torch.Generator().manual_seed(0)
    w, kv = quantize(torch.randn(576, 1024, generator=g)), quantize(torch.randn(4 * 256, 512, generator=g))
    c, pe = torch.randn(600, 512, generator=g).bfloat16(), torch.randn(600, 64, generator=g).bfloat16()
    InterpretedFunction.run = record
    try:
        for hw in (False, True):
            gk.fp8_linear(torch.randn(3, 1024, generator=g), w.q, w.scale, hw_fp8=hw)  # split-K
            gk.fp8_linear(torch.randn(3, 1000, generator=g), quantize(torch.randn(64, 1000)).q,
                          quantize(torch.randn(64, 1000)).scale, hw_fp8=hw, split_k=1)  # ragged K, no split
            gk.mla_decode(torch.randn(4, 128), torch.randn(4, 64), kv.q, kv.scale, c, pe, 600, 0.1, 128, 256,
                          hw_fp8=hw)  # fmt: skip
        wb = torch.randn(576, 1024, generator=g).bfloat16()
        gk.bf16_linear(torch.randn(3, 1024, generator=g), wb)  # split-K
        gk.bf16_linear(torch.randn(3, 1000, generator=g), wb[:64, :1000].contiguous(), split_k=1)  # ragged K
        kv_bf16 = torch.randn(4 * 256, 512, generator=g).bfloat16()
        gk.mla_decode(torch.randn(4, 128), torch.randn(4, 64), kv_bf16, None, c, pe, 600, 0.1, 128, 256)
        packed = torch.randint(-2**31, 2**31, (192, 1024 // 8), generator=g, dtype=torch.int64).to(torch.int32)
        scale = torch.rand(192, 1024 // gk.INT4_GROUP, generator=g).bfloat16()
        for m in (3, 40):  # decode and prefill tiles, split-K
            gk.int4_linear(torch.randn(m, 1024, generator=g), packed, scale)
        # 992 columns: a ragged last decode K tile (prefill's 32-column tiles never are), no split
        gk.int4_linear(torch.randn(3, 992, generator=g), packed[:, :124].contiguous(), scale[:, :31], split_k=1)
    finally:
        InterpretedFunction.run = run
    return list(seen.values())


def signature(fn, bound: dict) -> dict:
    """Triton's type of each argument ("*fp32", "i32", ...), and the value of each constexpr."""
    from triton.runtime.jit import JITFunction, mangle_type

    constexpr = {p.name for p in JITFunction(fn).params if p.is_constexpr}
    return {k: bound[k] if k in constexpr else mangle_type(v) for k, v in bound.items()}


def compile_for(fn, bound: dict, options: dict, arch: int) -> dict:
    """Compile one recorded launch for sm_{arch}: registers and stack bytes per thread, compile seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = JITFunction(fn)
    constexpr = {p.name for p in jit.params if p.is_constexpr}
    types = {k: "constexpr" if k in constexpr else v for k, v in signature(fn, bound).items()}
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(jit, types, {k: bound[k] for k in constexpr}),
                            target=GPUTarget("cuda", arch, 32), options=options)  # fmt: skip
    seconds = time.perf_counter() - t0
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    regs, stack = (int(found[1]), int(found[2])) if found else (None, None)
    return {"arch": f"sm_{arch}", "registers": regs, "stack_bytes": stack, "shared_bytes": kernel.metadata.shared,
            "compile_s": round(seconds, 2)}  # fmt: skip


def path_of(name: str, bound: dict) -> str:
    """The code path a launch compiles: the weight's conversion (hw fp8, bits, bf16; "-" for none), INT4's tiling,
    and whether the last K (or R) tile is ragged."""
    path = "bf16" if bound.get("BF16") else {None: "-", True: "hw fp8", False: "bits"}[bound.get("HW_FP8")]
    path += "" if bound.get("EVEN_K", bound.get("EVEN_R", True)) else " ragged"
    if name == "int4_linear_kernel":  # no fp8; two tilings: decode (M <= 16) and prefill
        path = f"{bound['BLOCK_M']}x{bound['BLOCK_N']}x{bound['BLOCK_K']}" + path[1:]
    return path


def targets(bound: dict, archs: list[int]) -> list[int]:
    """The archs a launch is for: the hardware fp8 path only where the chip has the conversion; bf16 weights on all."""
    if "HW_FP8" not in bound or bound.get("BF16"):
        return archs
    return [a for a in archs if (a >= HW_FP8_ARCH) == bool(bound["HW_FP8"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, nargs="*", default=[80, 86, 89, 90])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_compile.jsonl")
    args = p.parse_args()
    import triton
    from common import append_result, machine

    info, stamp = machine(), time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{'kernel':<22}{'path':<17}{'arch':<7}{'regs':>6}{'stack B':>9}{'shared B':>10}{'compile s':>11}")
    for name, fn, bound, options in record_launches():
        path = path_of(name, bound)
        for arch in targets(bound, args.archs):
            r = compile_for(fn, bound, options, arch)
            print(f"{name:<22}{path:<17}{r['arch']:<7}{r['registers']:>6}{r['stack_bytes']:>9}{r['shared_bytes']:>10}"
                  f"{r['compile_s']:>11}")  # fmt: skip
            append_result(args.out, {"time": stamp, "commit": info["commit"], "cpu": info["cpu"], "host": info["host"],
                                     "triton": triton.__version__, "kernel": name, "path": path, **options,
                                     **r})  # fmt: skip


if __name__ == "__main__":
    main()
