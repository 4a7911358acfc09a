# Two commands for a newcomer:
#   make demo   set up .venv, export the built-in tiny LCM, run it: PNG + per-stage latency profile
#   make test   set up .venv (all extras that install on CPU-only Linux) and run the test suite
# Every install goes through constraints/lock.txt (versions known to work together), so a new release upstream
# cannot break a fresh machine; `make test-latest` tries the newest releases on purpose, in its own venv.
# torch is pinned to 2.13.0 (the CPU build) in every pip command: an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
LOCK := constraints/lock.txt
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEMO := build/demo
LATEST_VENV := .venv-latest

.PHONY: setup setup-all demo test lint bench test-latest lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The exporter side: torch (CPU), diffusers, ONNX. open-clip-torch only carries the real CLIP BPE table for the
# tiny models; --no-deps keeps it from pulling torchvision.
setup: $(BIN)/python
	$(PIP) -c $(LOCK) $(TORCH) -e '.[export]'
	$(PIP) -c $(LOCK) --no-deps open-clip-torch

setup-all: $(BIN)/python
	$(PIP) -c $(LOCK) $(TORCH) -e '.[all]'
	$(PIP) -c $(LOCK) --no-deps open-clip-torch
	# The JavaScript runtime (js/): its postinstall would download GPU libraries from outside the registry.
	cd js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund

demo: setup
	$(BIN)/lcm-export builtin:tiny-lcm --output $(DEMO)/bundle --overwrite
	$(BIN)/lcm-run $(DEMO)/bundle "a photo of a cat" --seed 0 --steps 4 --output $(DEMO)/cat.png \
		--profile --runs 5 --warmup 1 --json $(DEMO)/profile.json --chart $(DEMO)/profile.png

test: setup-all
	$(BIN)/python -m pytest -q tests

lint: setup-all
	$(BIN)/ruff check lcm_export tests bench
	$(BIN)/ruff format --check lcm_export tests bench

bench: setup-all
	$(BIN)/python bench/run.py

# The newest releases the ranges in setup.cfg allow (torch still pinned), in their own venv: run it before
# moving the lock. CI stays on the lock.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH) -e '.[all]'
	$(LATEST_VENV)/bin/python -m pip install --quiet --no-deps open-clip-torch
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Write the lock from the venv `make test-latest` just proved.
lock:
	{ sed -n '1,/^$$/p' $(LOCK) | grep '^#'; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf build $(VENV) $(LATEST_VENV) .venv-optimum .pytest_cache
