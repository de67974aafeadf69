# make train: set up .venv, tokenize the bundled corpus, train the quickstart model (CPU is fine)
# make test:  set up .venv with the test dependencies and run the whole suite
# make test-fast: the suite without the `slow` tests (multi-process, kill/resume, compile) and the `gpu` ones
# make train TORCH_INDEX=https://download.pytorch.org/whl/cpu   torch from that wheel index (here PyTorch's
#             CPU-only build) instead of PyPI's, which on Linux is the CUDA build with gigabytes of CUDA libraries
# make test-compat: the fast tier under torch 2.11 (COMPAT_TORCH), the oldest supported, in a second venv (.venv-compat);
#             PyPI's torch is the CUDA build (runs on CPU); TORCH_INDEX picks another wheel index as for `make train`
# make gpu-check: the GPU check (docs/gpu_check.md) into GPU_CHECK_OUT; NO_VENV=1 runs it with $(PYTHON)'s own packages
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
SHAKESPEARE_TOKENS := data/shakespeare_tokens

.PHONY: train data test test-fast test-compat venv clean gpu-check

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) "$$(grep '^torch==' requirements.txt)")
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

$(SHAKESPEARE_TOKENS)/manifest.json: $(VENV)/.installed data/prepare.py data/tokenizer.py
	$(PY) data/prepare.py --source data/shakespeare --out $(SHAKESPEARE_TOKENS) --val_tokens 100000

data: $(SHAKESPEARE_TOKENS)/manifest.json

train: data
	$(PY) train.py configs/shakespeare.py
	$(PY) scripts/plot.py out/shakespeare/metrics.jsonl --out out/shakespeare/loss.png

# pytest-xdist: one worker more than the cores, at most 4 (most tests start processes of their own: torchrun
# ranks; the extra worker uses the core a test leaves idle while it waits on a signal, a delay or a restart);
# worksteal hands a worker that runs dry the tests queued on a busy one. TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
PYTEST := -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal

test: $(VENV)/.installed-dev
	$(PY) $(PYTEST) --durations=10 tests

test-fast: $(VENV)/.installed-dev
	$(PY) $(PYTEST) -m "not slow and not gpu" tests

# the oldest torch supported: requirements.txt pins the newest; the second venv takes every other pin as it is
COMPAT_TORCH ?= 2.11.0
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python

$(COMPAT_VENV)/.installed-$(COMPAT_TORCH): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$(COMPAT_TORCH)
	grep -v -e '^torch==' -e '^-r ' requirements.txt requirements-dev.txt --no-filename > $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PY) -m pip install --quiet -r $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PY) -c "import torch; assert torch.__version__.startswith('$(COMPAT_TORCH)'), torch.__version__"
	touch $@

test-compat: $(COMPAT_VENV)/.installed-$(COMPAT_TORCH)
	$(COMPAT_PY) $(PYTEST) -m "not slow and not gpu" tests

GPU_CHECK_OUT ?= out/gpu_check
GPU_CHECK_ARGS ?=
ifeq ($(NO_VENV),1)
gpu-check:  # a machine whose Python already has torch, numpy, tiktoken, safetensors and pytest (no network needed)
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
else
gpu-check: $(VENV)/.installed-dev
	$(PY) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(SHAKESPEARE_TOKENS) out
