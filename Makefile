# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use, with torch pinned (an unpinned torch pulls GBs of CUDA wheels).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hf_lorax-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_lorax_paper.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=10 tests  # two workers, one test file (or test class) each at a time

lint: $(STAMP)
	$(PY) -m ruff check hf_lorax hf_lorax_paper scripts tests
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

clean:
	rm -rf $(VENV) runs .pytest_cache
