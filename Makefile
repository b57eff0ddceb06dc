# The README's two commands: `make test` and `make bench`. Both set up .venv on first use: the
# requirements, then gptkernels itself (editable), so `.venv/bin/python` imports it from anywhere.
# On a GPU machine without network, use its own python: `make gpu` (or PYTHON=python3 make bench).

# bash with pipefail: a step piped through tools/progress_filter.py fails when the step itself fails.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

VENV     := .venv
PYTHON   ?= $(VENV)/bin/python
REQS     := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
EDITABLE := $(VENV)/.editable-$(shell sha1sum setup.py | cut -c1-12)
PROGRESS := python3 tools/progress_filter.py

.PHONY: test bench gpu build-cuda venv clean test-triton-latest

venv: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(EDITABLE))

$(REQS): requirements.txt
	@test -x $(VENV)/bin/python || { echo "creating $(VENV) with $$(python3 --version)"; python3 -m venv $(VENV); }
	@echo "installing requirements.txt into $(VENV): torch 2.14.1 with its CUDA libraries (about 3 GB of" \
		"wheels, 6 GB on disk), triton, transformers, pytest, ...; packages over 20 MB are listed"
	@$(VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | $(PROGRESS) pip
	@$(VENV)/bin/python -m pip install -r requirements.txt 2>&1 | $(PROGRESS) pip
	@rm -f $(VENV)/.installed-* $(VENV)/.editable-*
	@touch $@

# gptkernels itself, editable, without the CUDA extension (GPTKERNELS_BUILD_CUDA=0): build-cuda
# compiles that once, in place, where the editable install finds it.
$(EDITABLE): $(REQS) setup.py
	@echo "installing gptkernels into $(VENV) (editable; the CUDA extension is make build-cuda's)"
	@GPTKERNELS_BUILD_CUDA=0 $(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.editable-*
	@touch $@

# Compile csrc (gptkernels._C) in place: proves the CUDA code compiles even on a machine with no GPU.
# One line per unit (`[n/N] csrc/...`) instead of nvcc's command lines; warnings and errors in full.
build-cuda: venv
	@echo "building the CUDA extension gptkernels._C in place for TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0}"
	@GPTKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" \
		$(PYTHON) setup.py -q build_ext --inplace 2>&1 | $(PROGRESS) build

# One line of dots per test file; -rfEs lists why each test was skipped (GPU-only tests say so)
# beside failures and errors.
test: venv build-cuda
	$(PYTHON) -m pytest tests -rfEs

# The newest Triton's CPU interpreter (CI has 3.8, the GPU image 3.6): paged, varlen, split, decode,
# append and rotary cases in a subprocess that imports it first. Installed under build/, not into
# .venv (a ~290 MB download, ~1 GB installed); CI runs it after `make test`.
TRITON_LATEST ?= 3.9.0
test-triton-latest: venv
	test -d build/triton-$(TRITON_LATEST)/triton || \
		$(PYTHON) -m pip install -q --no-deps --find-links build/triton-wheel --target build/triton-$(TRITON_LATEST) triton==$(TRITON_LATEST)
	GPTKERNELS_TRITON_LATEST=build/triton-$(TRITON_LATEST) $(PYTHON) -m pytest tests/test_triton_latest.py -q -rfEs

# On a GPU: every benchmark beside its peers (--quick: under 10 minutes), JSON + plots in bench_out/.
# Without one: the parity sweep of every kernel in the Triton interpreter (timings need a GPU).
bench: venv
	$(PYTHON) -m benchmarks.run --suite all --quick $(BENCH_ARGS)

# THE first thing to run whenever a GPU is at hand (15 minutes of device time in all, 10 a call):
# device facts and ceilings, every kernel path's tests on the small grid plus bf16, the CUDA build
# and its GPU tests, the headline benchmarks, BENCHMARKS.md and a short table last, all by the
# deadline (default 420 s) and under $OUT. `make gpu-smoke DEADLINE=300 STEPS=facts,bench,report`.
.PHONY: gpu-smoke
gpu-smoke:
	python3 -m benchmarks.gpu_check --part smoke $(if $(DEADLINE),--deadline $(DEADLINE)) $(if $(STEPS),--steps $(STEPS))

# The whole GPU check with the GPU machine's own python3 (no venv, no network): build the extension,
# every test on CUDA, the benchmarks, BENCHMARKS.md, a short table last; files under $OUT when set.
# In parts for 10-minute calls: `make gpu PART=tests [TESTS="tests/test_a.py ..."]`,
# `make gpu PART=bench [SUITE=attention,rotary] [FULL=1]`.
gpu:
	python3 -m benchmarks.gpu_check --part $(or $(PART),all) --suite $(or $(SUITE),all) $(if $(FULL),--full) \
		$(if $(TESTS),--tests "$(TESTS)")

clean:
	rm -rf build gptkernels/_C*.so .pytest_cache
