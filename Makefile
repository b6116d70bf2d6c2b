# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job on the shipped data
#   make test   set up .venv and run the fast test set
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-all gpu-wheels clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "pcm-policy needs Python 3.11 (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[pusht,robomimic,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pcm demo

# two workers: one per core of the 2-core machine this project runs on (pytest-xdist); the tests are process-safe
test: $(STAMP)
	$(BIN)/pytest -q -n 2

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/pytest -q -m ''

# The GPU machine (CPython 3.12 with torch, no package registry; see README "GPU") gets, in .whl/ (git-ignored, carried
# by the device call): wheels for what `pcm bench` and `pytest -m gpu` import that its image lacks - diffusers and
# hydra-core at this project's pins, hydra's omegaconf, and its antlr4 runtime, which PyPI has as an sdist only (built
# here: pure Python) - and the bench observations (reading PushT's zarr there would need numcodecs, 9 MB, too big to
# carry). Fails when the working tree plus .whl/ exceeds 60 MiB (the device takes 64).
GPU_WHEELS := .whl
gpu-wheels:
	test -x $(BIN)/python || $(MAKE) setup
	rm -rf $(GPU_WHEELS)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	    -d $(GPU_WHEELS) $$($(BIN)/python scripts/gpu_check.py pins diffusers hydra-core) omegaconf==2.3.1
	$(BIN)/python -m pip wheel -q --no-deps -w $(GPU_WHEELS) antlr4-python3-runtime==4.9.3
	$(BIN)/python scripts/gpu_check.py observations $(GPU_WHEELS)/pusht_bench_observations.safetensors --chunks 1000
	ls -l $(GPU_WHEELS)
	$(BIN)/python scripts/gpu_check.py travel-size --limit-mib 60 $(GPU_WHEELS)

clean:
	rm -rf $(VENV) outputs
