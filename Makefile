# Two commands for a newcomer:
#   make demo   set up .venv, export the built-in tiny LCM, run it: PNG + per-stage latency profile
#   make test   set up .venv (all extras that install on CPU-only Linux) and run the test suite
# The venv pins torch==2.13.0 (the CPU build): an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
DEMO := build/demo

.PHONY: setup setup-all demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The exporter side: torch (CPU), diffusers, ONNX. open-clip-torch only carries the real CLIP BPE table for the
# tiny models; --no-deps keeps it from pulling torchvision.
setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[export]'
	$(BIN)/pip install --quiet --no-deps open-clip-torch

setup-all: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[all]' $(TORCH)
	$(BIN)/pip install --quiet --no-deps open-clip-torch

demo: setup
	$(BIN)/lcm-export builtin:tiny-lcm --output $(DEMO)/bundle --overwrite
	$(BIN)/lcm-run $(DEMO)/bundle "a photo of a cat" --seed 0 --steps 4 --guidance 8 --output $(DEMO)/cat.png \
		--profile --runs 5 --warmup 1 --json $(DEMO)/profile.json --chart $(DEMO)/profile.png

test: setup-all
	$(BIN)/python -m pytest -q tests

lint: setup-all
	$(BIN)/ruff check lcm_export tests bench
	$(BIN)/ruff format --check lcm_export tests bench

bench: setup-all
	$(BIN)/python bench/run.py

clean:
	rm -rf build $(VENV) .pytest_cache
