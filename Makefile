# mllm-cl: `make test` runs the tests, `make demo` the whole experiment on a CPU; either builds the
# environment (.venv, pinned requirements) on first use, and again when a requirements file changes.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
ENV_STAMP = $(VENV)/.installed
MODEL ?=
VISION ?=
EXPERIMENT_OVERRIDES = $(if $(MODEL),llm=$(MODEL) template=$(or $(TEMPLATE),pythia)) $(if $(VISION),vision=$(VISION))

.PHONY: setup test smoke demo paper2 compare data experiment bench clean

setup: $(ENV_STAMP)

$(ENV_STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

test: $(ENV_STAMP)
	$(PYTHON) -m pytest tests

# The smallest end to end (a tiny world, every stage, three method runs side by side), about a minute.
smoke: $(ENV_STAMP)
	$(PYTHON) train.py experiment --config configs/experiments/smoke.json workers=2

# The papers' experiment on the synthetic world: nothing downloaded, a few minutes on 2 CPU cores.
# SEEDS=3: the whole grid once per seed (about 3x the time), reported as mean and sd per method.
demo: $(ENV_STAMP)
	$(PYTHON) train.py experiment --config configs/experiments/demo.json $(if $(SEEDS),seeds=$(SEEDS))

# Paper 2's (LLaVA-c's) protocol on the synthetic world: instruction-tune first, its grid on LoRA, the alpha curves.
paper2: $(ENV_STAMP)
	$(PYTHON) train.py experiment --config configs/experiments/paper2.json

# Paper 2's comparison (continual fine-tuning): every method of its tables on the demo's model, sharing the
# stages `make demo` trained (runs/demo); `make compare SEEDS=3` for mean +/- sd.
compare: $(ENV_STAMP)
	$(PYTHON) train.py experiment --config configs/experiments/compare.json $(if $(SEEDS),seeds=$(SEEDS))

# Real offline assets (SmolLM2-135M-Instruct, NL benchmarks, easy-vqa) into data/offline/.
data: $(ENV_STAMP)
	$(PYTHON) data/fetch_offline.py

# The same grid on one GPU with real weights: `make data` first, or MODEL=... VISION=... folders of your own.
experiment: $(ENV_STAMP)
	$(PYTHON) train.py experiment --config configs/experiments/experiment.json $(EXPERIMENT_OVERRIDES)

bench: $(ENV_STAMP)
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/generate_speed.py
	$(PYTHON) bench/consolidate_speed.py

clean:
	rm -rf runs data/smoke data/synthetic data/synthetic.partial data/synthetic-experiment data/synthetic-experiment.partial .pytest_cache
