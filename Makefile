# make demo: venv + the trained demo model (built once, ~30 s) + `hybrid chat` on it.  make test: venv + the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL ?= checkpoints/demo
# No NVIDIA GPU: pin the CPU build of torch (a CUDA build is several GB). Off this workplace, add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU wheel from PyTorch's own index.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
TORCH_INDEX ?=

.PHONY: venv demo test clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-compile -e ".[test]"
	touch $@

$(DEMO_MODEL)/config.json: | venv
	$(PY) -m hybrid.demo --out $(DEMO_MODEL)

demo: venv $(DEMO_MODEL)/config.json
	$(VENV)/bin/hybrid chat --model $(DEMO_MODEL) --temperature 0 --tools $(DEMO_MODEL)/tools.json

# The GPU path's modules: run on the stand-in (HYBRID_GPU_STANDIN=1, set by the tests without a GPU) and Triton's
# interpreter, so CI executes all of them but the CUDA branch of hybrid/device.py; they must stay >= 95% covered.
GPU_PATH := hybrid/device.py,hybrid/gpu_kernels.py,hybrid/gpu_experts.py,hybrid/gpu_cache.py,hybrid/cpu_experts.py,cuda/*.py

# Two pytest processes, one per core (the suite is mostly single-threaded Python: servers, the Triton
# interpreter, coverage tracing). Coverage is measured in the one that runs TESTS_GPU: the GPU-path tests that
# alone give the gate's number, plus in-process tests (CPU kernels, chat rendering, config) for balance, not
# ones that start subprocesses (pytest-cov traces those too). The parity tests run untraced in the other process:
# tracing the interpreter there tripled their time. ~4.5 min each on a clean checkout. PASSIVE: one process's
# OpenMP threads sleep instead of spinning on the core the other one needs.
TESTS_GPU := tests/test_gpu_kernels.py tests/test_hybrid.py tests/test_tiers.py tests/test_formats.py \
	tests/test_device.py tests/test_gpu_compile.py tests/test_cpu_kernels.py tests/test_int4_kernels.py \
	tests/test_chat.py tests/test_prefix_cache.py tests/test_config.py tests/test_checkpoint.py
PYTEST := OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -p no:cacheprovider

test: venv
	@rm -f .coverage .coverage.*
	@$(PYTEST) --cov --cov-report= $(TESTS_GPU) > .test-gpu.log 2>&1 & a=$$!; \
	$(PYTEST) $(addprefix --ignore=,$(TESTS_GPU)) tests; b=$$?; \
	wait $$a; a=$$?; echo "--- beside it, $(words $(TESTS_GPU)) files:"; cat .test-gpu.log; \
	test $$a = 0 && test $$b = 0
	@echo "GPU-path modules (stand-in + Triton interpreter), must be >= 95%:"
	$(PY) -m coverage report --include='$(GPU_PATH)' --fail-under=95

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .coverage .coverage.* .test-gpu.log
