# growrun: every target installs into ./.venv on first use (the stamp file makes later calls
# instant), so `make test` or `make train` works as the very first command on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where CIFAR lives (cifar-10-batches-py/, cifar-100-python/); growrun's default is the same.
DATA   ?= $(or $(GROWRUN_DATA),$(HOME)/.cache/growrun-data)
ARGS   ?=

.PHONY: install test train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plots]'
	touch $(STAMP)

# The test suite (CPU, a few minutes): what CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The main job: grow a tiny ResNet18 on CIFAR-10 with TINY. Extra overrides: make train ARGS='seed=1'
train: $(STAMP)
	GROWRUN_DATA=$(DATA) $(BIN)/growrun train +experiment=cifar10_tiny $(ARGS)

# Speed benchmarks; results are written to bench/*.json.
bench: $(STAMP)
	$(BIN)/python scripts/bench_train.py --root $(DATA)
	$(BIN)/python scripts/bench_data.py --root $(DATA)
	$(BIN)/python scripts/bench_growth.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
