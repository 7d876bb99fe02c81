# Set-up and jobs. On a fresh machine `make demo` and `make test` do everything: a virtual
# environment in .venv, torch, lrfuse built against that torch (CPU kernels, and CUDA kernels
# when nvcc is found), then the job.
PYTHON ?= python3
VENV ?= .venv
# torch 2.14.1 is a CUDA build, so the CUDA kernels compile even on a machine without a GPU.
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
NATIVE_SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: demo test bench clean

demo: $(VENV)/.built
	$(VENV)/bin/lrfuse demo

# pytest's exit code 5 means no test was collected; say so rather than fail.
test: $(VENV)/.built
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: $(VENV)/.built
	$(VENV)/bin/lrfuse bench

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja
	touch $@

# --no-build-isolation: compile against the torch installed above, not a fresh one.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build lrfuse/*.so
