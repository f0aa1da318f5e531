# One entry point. `make test` and `make train` create the environment on first use.
# VENV may point outside the clone (.ci/run keeps one per hash of requirements.lock).
# The stamp is named by that hash, not compared by mtime: a fresh clone has new mtimes,
# and a changed lock must rebuild the environment from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
export PYTHONPATH := $(CURDIR)

.PHONY: env test train clean

env: $(STAMP)

$(STAMP):
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: env
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

# The README's first command: RedNet-26 on scikit-learn's bundled digits (CPU, or a GPU when
# present), then the single-crop evaluation of the best checkpoint. --resume auto makes a
# second `make train` (or one after Ctrl-C) continue the run instead of starting over;
# after a change to the config, `make train TRAIN_ARGS=--restart` moves the old results
# aside and trains afresh. TensorBoard: tensorboard --logdir runs/digits/tb
# best.pt, eval.json and tb/ are RunDir's names (rednet/engine/rundir.py), written out here because
# make cannot import them before the environment exists; tests/test_rundir.py keeps the two in step.
TRAIN_ARGS ?=
train: env
	$(PY) tools/train.py --config digits --output runs/digits --resume auto $(TRAIN_ARGS)
	$(PY) tools/eval.py --checkpoint runs/digits/best.pt --json runs/digits/eval.json
