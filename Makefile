# Set-up and jobs. On a fresh machine `make demo` and `make test` do everything: a virtual
# environment in .venv, torch, lrfuse built against that torch (CPU kernels, and CUDA kernels
# when nvcc is found), then the job.
PYTHON ?= python3
VENV ?= .venv
# torch 2.14.1 is a CUDA build, so the CUDA kernels compile even on a machine without a GPU.
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
NATIVE_SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

# The oldest torch lrfuse supports (pyproject's floor), tested by `make test-oldest`.
OLDEST_TORCH ?= torch==2.11.0
OLDEST := .oldest

.PHONY: demo test test-oldest bench clean

demo: $(VENV)/.built
	$(VENV)/bin/lrfuse demo

# pytest's exit status is the job's: 5 (no test collected) fails like any other, since a run that
# checked nothing must not pass.
test: $(VENV)/.built
	$(PY) -m pytest $(PYTEST_ARGS)

# What depends on torch's version: the ops and their registration, the optimizers against torch's
# own (parity, torch's optim_db suite, drop-in edits, errors, state dicts, compile), AMP, and the
# distributed tests (FSDP2, tensor parallel, DCP). The LR tools and the Ray search sit on top of
# these and run once, in `make test`.
TORCH_TESTS := tests/test_ops.py tests/test_parity.py tests/test_torch_suite.py tests/test_drop_in.py \
	tests/test_errors.py tests/test_state_dict.py tests/test_step_cache.py tests/test_groups.py \
	tests/test_launch_plan.py tests/test_distributed.py tests/lightning/test_optimizers.py \
	tests/lightning/test_precision.py tests/lightning/test_sharded.py

# Those tests against the oldest supported torch (CPU kernels), in a copy of the tree: the
# extension is built in place, and the copy keeps it from replacing the main build's.
test-oldest:
	rm -rf $(OLDEST)/src && mkdir -p $(OLDEST)/src
	git ls-files -z | xargs -0 cp --parents -t $(OLDEST)/src
	$(MAKE) -C $(OLDEST)/src test VENV=../venv TORCH="$(OLDEST_TORCH)" LRFUSE_CUDA=0 PYTHON=$(PYTHON) \
		PYTEST_ARGS="$(TORCH_TESTS)"

bench: $(VENV)/.built
	$(VENV)/bin/lrfuse bench

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "setuptools>=77" wheel ninja
	touch $@

# --no-build-isolation: compile against the torch installed above, not a fresh one.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) $(OLDEST) build lrfuse/*.so
