# One entry point. `make test` and `make train` create the environment on first use.
# VENV may point outside the clone (.ci/run keeps one per hash of requirements.lock).
# The stamp is named by that hash, not compared by mtime: a fresh clone has new mtimes,
# and a changed lock must rebuild the environment from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
# The package itself is installed (editable) again when pyproject.toml changes: its console
# scripts and metadata come from there, and an environment outlives many pulls.
PROJECT_STAMP := $(VENV)/.project-$(shell sha256sum pyproject.toml | cut -c1-12)
# Written into every environment this Makefile creates. Only such an environment (or one an
# earlier version made, which left an .installed-* stamp) is ever deleted and rebuilt: VENV
# may name a folder of the user's.
OWNED := .created-by-rednet-make
# timm's own model tests, from the locked timm's source distribution: tests/models/test_timm_upstream.py
# runs them on RedNet. No timm code lives in this repository.
TIMM_TESTS := $(VENV)/timm-tests
TIMM_TESTS_STAMP := $(TIMM_TESTS)/.extracted-$(LOCK_HASH)
CXX ?= g++
export PYTHONPATH := $(CURDIR)

.PHONY: env test train clean lock check-python check-cxx

env: $(STAMP) $(PROJECT_STAMP) $(TIMM_TESTS_STAMP)

check-python:
	@command -v python3 >/dev/null 2>&1 || { echo "error: python3 not found: install Python 3.10 or newer (Debian/Ubuntu: apt install python3 python3-venv)" >&2; exit 2; }
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: $$(python3 --version) is too old: install Python 3.10 or newer" >&2; exit 2; }
	@python3 -c 'import ensurepip, venv' 2>/dev/null || { echo "error: python3 cannot create virtual environments: install python3-venv (Debian/Ubuntu: apt install python3-venv)" >&2; exit 2; }

# The native CPU involution kernel is C++ built at first use: the tests need a compiler, training
# runs without one (slower, on the PyTorch reference).
check-cxx:
	@command -v $(firstword $(CXX)) >/dev/null 2>&1 || { echo "error: no C++ compiler ($(CXX)) for the native CPU kernel: install g++ (Debian/Ubuntu: apt install g++), or set CXX" >&2; exit 2; }

$(STAMP): | check-python
	@if [ -d "$(VENV)" ] && [ -n "$$(ls -A "$(VENV)")" ] && [ ! -e "$(VENV)/$(OWNED)" ] \
	    && ! ls "$(VENV)"/.installed-* >/dev/null 2>&1; then \
	  echo "error: VENV=$(VENV) is a folder this Makefile did not create; it deletes and rebuilds only its own environments: give a new or empty path" >&2; exit 2; fi
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	touch $(VENV)/$(OWNED)
	@echo "Installing requirements.lock into $(VENV): about 5.5 GB (torch with its CUDA libraries), several minutes on a first run."
	$(PY) -m pip install --require-hashes --progress-bar on -r requirements.lock
	touch $@

$(PROJECT_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.project-*
	touch $@

# A target of its own, so that an environment made before it existed gets it too. pip fetches the
# sdist as it fetches the wheels, checked against the lock's sha256 of timm (its entry is the
# requirements file); the test file, and timm's pytest configuration (its markers), are kept.
$(TIMM_TESTS_STAMP): | $(STAMP)
	@echo "Fetching the tests of the locked timm (its source distribution, about 3 MB) into $(TIMM_TESTS)."
	rm -rf $(TIMM_TESTS)
	mkdir -p $(TIMM_TESTS)/sdist
	awk '/^timm==/ {p = 1} p && /^ *#/ {exit} p' requirements.lock > $(TIMM_TESTS)/timm-requirement.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(TIMM_TESTS)/timm-requirement.txt -d $(TIMM_TESTS)/sdist
	tar -xzf $(TIMM_TESTS)/sdist/timm-*.tar.gz -C $(TIMM_TESTS) --strip-components=1 --wildcards '*/tests/test_models.py' '*/pyproject.toml'
	rm -rf $(TIMM_TESTS)/sdist
	touch $@

# The compiler check first: it stops before a first run's install, and before the fetch of timm's tests.
test: check-cxx env
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

# requirements.lock from requirements.in: every dependency pinned, with its sha256, for the
# platform `make` and CI install on.
lock: env
	$(VENV)/bin/uv pip compile requirements.in --generate-hashes --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --output-file requirements.lock

# The README's first command: RedNet-26 on scikit-learn's bundled digits (CPU, or a GPU when
# present), then the single-crop evaluation of the best checkpoint. --resume auto makes a
# `make train` after Ctrl-C continue the run instead of starting over, and a second one on
# a finished run say so (and how to train again) without training or validating again;
# after a change to the config, `make train TRAIN_ARGS=--restart` moves the old results
# aside and trains afresh. TensorBoard: tensorboard --logdir runs/digits/tb
# best.pt, eval.json and tb/ are RunDir's names (rednet/engine/rundir.py), written out here because
# make cannot import them before the environment exists; tests/engine/test_rundir.py keeps the two in step.
TRAIN_ARGS ?=
train: env
	@command -v $(firstword $(CXX)) >/dev/null 2>&1 || echo "warning: no C++ compiler ($(CXX)): training runs on the slower PyTorch reference; install g++ for the native CPU kernel" >&2
	$(PY) tools/train.py --config digits --output runs/digits --resume auto $(TRAIN_ARGS)
	$(PY) tools/eval.py --checkpoint runs/digits/best.pt --json runs/digits/eval.json
