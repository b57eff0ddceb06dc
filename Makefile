# The README's two commands: `make test` and `make bench`. Both set up .venv on first use.
# On a GPU machine without network, use its own python: `make gpu` (or PYTHON=python3 make bench).

VENV     := .venv
PYTHON   ?= $(VENV)/bin/python
STAMP    := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)

.PHONY: test bench gpu build-cuda venv clean

venv: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(STAMP))

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

# Compile csrc (gptkernels._C) in place: proves the CUDA code compiles even on a machine with no GPU.
build-cuda: venv
	GPTKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" $(PYTHON) setup.py -q build_ext --inplace

test: venv build-cuda
	$(PYTHON) -m pytest tests -q

# On a GPU: every benchmark beside its peers (--quick: under 10 minutes), JSON + plots in bench_out/.
# Without one: the parity sweep of every kernel in the Triton interpreter (timings need a GPU).
bench: venv
	$(PYTHON) -m benchmarks.run --suite all --quick $(BENCH_ARGS)

# The whole GPU check with the GPU machine's own python3 (no venv, no network): build the extension,
# every test on CUDA, the benchmarks, BENCHMARKS.md, a short table last; files under $OUT when set.
# In parts for 10-minute calls: `make gpu PART=tests [TESTS="tests/test_a.py ..."]`,
# `make gpu PART=bench [SUITE=attention,rotary] [FULL=1]`.
gpu:
	python3 -m benchmarks.gpu_check --part $(or $(PART),all) --suite $(or $(SUITE),all) $(if $(FULL),--full) \
		$(if $(TESTS),--tests "$(TESTS)")

clean:
	rm -rf build gptkernels/_C*.so .pytest_cache
