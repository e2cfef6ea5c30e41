# mllm-cl: `make setup` once, then `make test`; `make demo` runs the whole experiment on a CPU.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
MODEL ?=
VISION ?=
EXPERIMENT_OVERRIDES = $(if $(MODEL),llm=$(MODEL) template=$(or $(TEMPLATE),pythia)) $(if $(VISION),vision=$(VISION))

.PHONY: setup test demo data experiment bench clean

setup:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt

test:
	$(PYTHON) -m pytest tests

# The papers' experiment on the synthetic world: nothing downloaded, a few minutes on 2 CPU cores.
demo:
	$(PYTHON) train.py experiment --config configs/experiments/demo.json

# Real offline assets (SmolLM2-135M-Instruct, NL benchmarks, easy-vqa) into data/offline/.
data:
	$(PYTHON) data/fetch_offline.py

# The same grid on one GPU with real weights: `make data` first, or MODEL=... VISION=... folders of your own.
experiment:
	$(PYTHON) train.py experiment --config configs/experiments/experiment.json $(EXPERIMENT_OVERRIDES)

bench:
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/generate_speed.py
	$(PYTHON) bench/consolidate_speed.py

clean:
	rm -rf runs data/synthetic data/synthetic.partial .pytest_cache
