# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job on the shipped data
#   make test   set up .venv and run the fast test set
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-all clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "pcm-policy needs Python 3.11 (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[pusht,robomimic,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pcm demo

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/pytest -q -m ''

clean:
	rm -rf $(VENV) outputs
