# Set-up and jobs. On a fresh machine `make demo` and `make test` do everything: a virtual
# environment in .venv, torch, lrfuse built against that torch (CPU kernels, and CUDA kernels
# when nvcc is found), then the job.
PYTHON ?= python3
VENV ?= .venv
# torch 2.14.1 is a CUDA build, so the CUDA kernels compile even on a machine without a GPU.
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
# Importing Lightning (torch._dynamo) makes inductor's cache folder, in the system temp dir unless
# told: every job here keeps it in the venv, so the demo, tests and benchmarks leave nothing in /tmp.
export TORCHINDUCTOR_CACHE_DIR ?= $(abspath $(VENV))/inductor
NATIVE_SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

# The oldest torch and Lightning lrfuse supports (pyproject's floors), tested by `make test-oldest`.
OLDEST_TORCH ?= torch==2.11.0
OLDEST_LIGHTNING ?= lightning==2.6.0
OLDEST := .oldest

.PHONY: demo test test-ray test-others test-oldest oldest-wheel oldest-tests oldest-tests-a oldest-tests-b docs bench clean

demo: $(VENV)/.built
	$(VENV)/bin/lrfuse demo

# Two pytest runs side by side, one per core: the tests that run Ray, one after another (each
# starts or stops Ray sessions, and the cluster recipe's `ray stop` ends every Ray process of the
# user), and all the others (mostly single-threaded Python). Each run's exit status counts: 5 (no
# test collected) fails like any other, since a run that checked nothing must not pass. With
# PYTEST_ARGS (`make test PYTEST_ARGS="tests/test_ops.py -x"`), one run of just that.
RAY_TESTS := tests/lightning/test_search.py tests/test_search_quality.py tests/test_docs.py
ifeq ($(strip $(PYTEST_ARGS)),)
test: $(VENV)/.built
	$(MAKE) --no-print-directory -j2 --output-sync=target test-ray test-others
else
test: $(VENV)/.built
	$(PY) -m pytest $(PYTEST_ARGS)
endif

test-ray: $(VENV)/.built
	$(PY) -m pytest --basetemp=.pytest_cache/tmp-ray $(RAY_TESTS)

test-others: $(VENV)/.built
	$(PY) -m pytest $(addprefix --ignore=,$(RAY_TESTS))

# What depends on torch's version: the ops and their registration, the optimizers against torch's
# own (parity, torch's optim_db suite, drop-in edits, errors, state dicts, compile), AMP, and the
# distributed tests (FSDP2, tensor parallel, DCP). The LR tools and the Ray search sit on top of
# these and run once, in `make test`.
# In two halves that run side by side, one per core (the distributed tests and the ops; the rest).
TORCH_TESTS_a := tests/test_distributed.py tests/test_ops.py tests/test_stats.py tests/test_launch_plan.py \
	tests/lightning/test_optimizers.py tests/lightning/test_precision.py tests/lightning/test_sharded.py
TORCH_TESTS_b := tests/test_parity.py tests/test_torch_suite.py tests/test_drop_in.py tests/test_errors.py \
	tests/test_state_dict.py tests/test_step_cache.py tests/test_groups.py

# Those tests against the oldest supported torch (CPU kernels), with lrfuse installed as a user
# would: `python -m build` makes an sdist and, from it, a wheel (built against that torch), which
# goes into a fresh venv (`oldest-wheel`); the tests then run from a copy of the tree against the
# installed wheel. CI makes the wheel in the background while `make test` runs, then runs
# `oldest-tests` alone.
test-oldest: oldest-wheel
	$(MAKE) --no-print-directory oldest-tests

oldest-wheel:
	rm -rf $(OLDEST)/src $(OLDEST)/dist && mkdir -p $(OLDEST)/src
	git ls-files -z | xargs -0 cp --parents -t $(OLDEST)/src
	$(MAKE) $(OLDEST)/venv/.deps VENV=$(OLDEST)/venv TORCH="$(OLDEST_TORCH)" PYTHON=$(PYTHON)
	$(OLDEST)/venv/bin/python -m pip install -q build
	cd $(OLDEST)/src && LRFUSE_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} ../venv/bin/python -m build -q --no-isolation --outdir ../dist .
	$(OLDEST)/venv/bin/python -m pip install -q --force-reinstall --no-deps $(OLDEST)/dist/lrfuse-*.whl
	$(OLDEST)/venv/bin/python -m pip install -q "$$(ls $(OLDEST)/dist/lrfuse-*.whl)[test]" "$(OLDEST_LIGHTNING)"

# The tests alone, against the wheel that `oldest-wheel` installed.
oldest-tests:
	# From outside the tree: the lrfuse that imports is the wheel's, with its compiled kernels.
	cd / && $(abspath $(OLDEST))/venv/bin/python -c "import lrfuse, lrfuse.ops as o; \
		assert 'site-packages' in lrfuse.__file__ and o.backend('cpu') == 'native', (lrfuse.__file__, o.backend('cpu')); \
		print('wheel:', lrfuse.__file__)"
	$(MAKE) --no-print-directory -j2 --output-sync=target oldest-tests-a oldest-tests-b

# pytest's script, not `python -m pytest`, which would put the tree's lrfuse/ first on sys.path.
oldest-tests-a oldest-tests-b: oldest-tests-%:
	cd $(OLDEST)/src && ../venv/bin/pytest --basetemp=.pytest_cache/tmp-$* $(TORCH_TESTS_$*)

# The docs site (MkDocs, strict) into site/: the README, docs/, and the API from the docstrings.
docs: $(VENV)/.built
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs'])" \
		| xargs $(PY) -m pip install -q
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: $(VENV)/.built
	$(VENV)/bin/lrfuse bench

# The README's install commands, one for one (tests/test_docs.py holds them to it), with the
# `test` extra instead of `lightning`.
EXTRAS ?= test
PIP := $(PY) -m pip -q

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip "setuptools>=77" wheel ninja
	$(PIP) install "$(TORCH)"
	touch $@

# --no-build-isolation: compile against the torch installed above, not a fresh one.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	$(VENV)/bin/lrfuse --version
	touch $@

clean:
	rm -rf $(VENV) $(OLDEST) build dist site lrfuse/*.so
