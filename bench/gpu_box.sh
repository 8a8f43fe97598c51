#!/usr/bin/env bash
# The GPU box's checks in one device call each (a call may run 10 minutes). CI runs the same GPU path on the
# stand-in (HYBRID_GPU_STANDIN=1) and Triton's interpreter; a lent GPU confirms it on real hardware.
#
#   bash bench/gpu_box.sh all        # tests + kernels + decode, one summary JSON; < 10 min on the H100 box
#   bash bench/gpu_box.sh tests      # the GPU-path tests, now on CUDA, ~3 min
#   bash bench/gpu_box.sh kernels    # bench/gpu_kernels.py: Triton fp8 linear and MLA decode vs the HBM roof
#   bash bench/gpu_box.sh decode     # bench/decode.py --device cuda on the K2-width slice (128 experts per layer)
#   bash bench/gpu_box.sh budget     # bench/memory_budget.py on a written K2-width slice, ~8 min
#   bash bench/gpu_box.sh experts    # bench/cpu_experts.py with all 384 experts, ~5 min
#
# Results go to $OUT (the device tool's return folder) when set, else bench/results. The box's python3 has torch,
# triton, numba, safetensors, tiktoken, transformers, jinja2, psutil, tqdm and pytest (the device tool's KINDS.md);
# for anything else, `pip download` wheels into a folder named in the device tool's `carry` and set WHEELS to it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
GPU_TESTS=(tests/test_gpu_kernels.py tests/test_hybrid.py tests/test_parity.py
           tests/test_tiers.py::test_gpu_engine_with_disk_tier_and_hot_cache_matches_the_cpu_engine)

run_tests() {
    timeout "${1:-300}" python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" "${GPU_TESTS[@]}" \
        2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
}
run_kernels() {
    timeout "${1:-180}" python3 bench/gpu_kernels.py --out "$OUT/gpu_kernels.jsonl" 2>&1 | tail -40
}
run_decode() {
    timeout "${1:-240}" python3 bench/decode.py --device cuda --experts 128 --prefill 512 4096 \
        --out "$OUT/decode.jsonl" 2>&1 | grep -v '^{' | tail -30
}

case "${1:-all}" in
all)
    run_tests 270
    run_kernels 120
    run_decode 180
    python3 bench/gpu_summary.py "$OUT" | tee "$OUT/gpu_box_summary.json"
    ;;
tests) run_tests ;;
kernels) run_kernels ;;
decode) run_decode 570 ;;
budget)
    # GPU budgets for the slice: ~5 GiB of it is the GPU part, the rest becomes hot-expert cache
    python3 bench/memory_budget.py --write /tmp/k2w --experts 128 --vocab 163840 --device cuda --tokens 32 \
        --gpu-mem 6GiB 10GiB --out-dir "$OUT" 2>&1 | grep -v writing | tail -20
    ;;
experts)
    python3 bench/cpu_experts.py --format fp8 --out "$OUT/cpu_experts.jsonl" 2>&1 | tail -12
    ;;
*)
    echo "usage: bash bench/gpu_box.sh all|tests|kernels|decode|budget|experts" >&2
    exit 2
    ;;
esac
