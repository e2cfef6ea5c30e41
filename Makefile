# mllm-cl: `make setup` once, then `make test`; `make demo` runs the whole experiment on a CPU.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python

.PHONY: setup test demo data experiment bench clean

setup:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt

test:
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf runs data/synthetic .pytest_cache

data:
	$(PYTHON) data/fetch_offline.py
