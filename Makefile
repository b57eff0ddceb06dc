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
	GPTKERNELS_BUILD_CUDA=1 $(PYTHON) setup.py -q build_ext --inplace

test: venv build-cuda
	$(PYTHON) -m pytest tests -q

bench: venv
	$(PYTHON) -m benchmarks.run --suite all --quick

# The whole GPU check: build, every test on CUDA, the benchmarks, a short table last.
gpu:
	PYTHON=python3 python3 -m benchmarks.gpu_check

clean:
	rm -rf build gptkernels/_C*.so .pytest_cache
