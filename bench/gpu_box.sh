#!/usr/bin/env bash
# Everything that needs the GPU box, in as few device calls as possible (each call may run 10 minutes).
#
#   bash bench/gpu_box.sh tests      # GPU tests (skipped elsewhere), ~2 min
#   bash bench/gpu_box.sh decode     # bench/decode.py on the k2-slice (384 experts, in memory), ~6 min
#   bash bench/gpu_box.sh budget     # bench/memory_budget.py on a written K2-width slice (128 experts), ~8 min
#   bash bench/gpu_box.sh experts    # bench/cpu_experts.py with all 384 experts, ~5 min
#   bash bench/gpu_box.sh kernels    # bench/cuda_kernels.py (builds cuda/ first, ~2 min)
#
# Results go to $OUT (the device tool's return folder) when set, else bench/results. The box's python3 has torch,
# numba, safetensors, tiktoken and transformers; jinja2, psutil, tqdm, openai and matplotlib may be missing:
# `pip download` their wheels into a folder named in the device tool's `carry` and set WHEELS to it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --find-links "$WHEELS" jinja2 psutil tqdm matplotlib openai || true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

case "${1:-tests}" in
tests)
    python3 -m pytest -q -rs tests/test_hybrid.py tests/test_tiers.py tests/test_cuda_kernels.py 2>&1 | tail -30 \
        | tee "$OUT/gpu_tests.txt"
    ;;
decode)
    python3 bench/decode.py --device cuda --prefill 512 4096 --out "$OUT/decode.jsonl" 2>&1 | grep -v '^{' | tail -30
    ;;
budget)
    # GPU budgets for the slice: ~5 GiB of it is the GPU part, the rest becomes hot-expert cache
    python3 bench/memory_budget.py --write /tmp/k2w --experts 128 --vocab 163840 --device cuda --tokens 32 \
        --gpu-mem 6GiB 10GiB --out-dir "$OUT" 2>&1 | grep -v writing | tail -20
    ;;
experts)
    python3 bench/cpu_experts.py --out "$OUT/cpu_experts.jsonl" 2>&1 | tail -12
    ;;
kernels)
    python3 -m pytest -q -rs tests/test_cuda_kernels.py 2>&1 | tail -5
    python3 bench/cuda_kernels.py 2>&1 | tail -30
    ;;
*)
    echo "usage: bash bench/gpu_box.sh tests|decode|budget|experts|kernels" >&2
    exit 2
    ;;
esac
