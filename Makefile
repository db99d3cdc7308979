# growrun: every target installs into ./.venv on first use (the stamp file makes later calls
# instant), so `make test` or `make train` works as the very first command on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where CIFAR lives (cifar-10-batches-py/, cifar-100-python/); growrun's default is the same.
DATA   ?= $(or $(GROWRUN_DATA),$(HOME)/.cache/growrun-data)
ARGS   ?=

.PHONY: install test test-fast train bench gpu-check growth-share table1 methods figures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plots]'
	touch $(STAMP)

# The test suite (CPU): what CI runs. TEST_WORKERS processes (pytest-xdist), one thread each;
# `make test-fast` is the inner loop: the mathematics and config checks, no end-to-end runs.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# The main job: grow a tiny ResNet18 on CIFAR-10 with TINY. Extra overrides: make train ARGS='seed=1'
train: $(STAMP)
	GROWRUN_DATA=$(DATA) $(BIN)/growrun train +experiment=cifar10_tiny $(ARGS)

# Speed benchmarks; results are written to bench/*.json.
bench: $(STAMP)
	$(BIN)/python scripts/bench_train.py --root $(DATA)
	$(BIN)/python scripts/bench_data.py --root $(DATA)
	$(BIN)/python scripts/bench_growth.py
	$(BIN)/python scripts/bench_growth.py --samples 512
	$(BIN)/python scripts/bench_memory_format.py
	$(BIN)/python scripts/bench_loggers.py
	$(BIN)/python scripts/bench_logger_runs.py

# Prove a growrun run end to end on this machine's GPU: every growth method, bf16, kill + resume
# (bit-identical), GPU vs CPU solves, throughput, DDP on 2+ GPUs (scripts/gpu_check.py). Without
# CUDA the CPU parts run (a few minutes) and the CUDA parts say SKIP. Record: bench/gpu_check.json
# (CUDA) or bench/gpu_check.cpu.local.json (CPU, git-ignored). ARGS='--quick', '--keep DIR', '--out PATH'.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py $(ARGS)

# Growth's share of the wall time of `cifar10_tiny` (about 30 min per run on 2 CPU cores), with
# the statistics pass and with statistics recorded during training (growth.stats=training), into
# bench/growth_share.json. Run it on an otherwise idle machine.
GS_DIR ?= outputs/growth_share
growth-share: $(STAMP)
	for st in pass training; do \
	  GROWRUN_DATA=$(DATA) $(BIN)/growrun train +experiment=cifar10_tiny growth.stats=$$st trainer.progress=off \
	    resume=true hydra.run.dir=$(GS_DIR)/$$st $(ARGS) || exit 1; \
	done
	$(BIN)/python scripts/growth_share.py $(GS_DIR)/pass $(GS_DIR)/training

# The TINY paper's Table 1 protocol as a sweep (configs/experiment/table1_$(SCALE).yaml), then
# its report (table, plots) in $(T1_DIR). SCALE=full: CIFAR-100, full ResNet18, 250 extra
# epochs (a GPU machine or cluster: add ARGS='hydra/launcher=slurm ...'); SCALE=cpu: the
# same protocol shrunk to CIFAR-10 at 1/4 width, ~60 min here. Re-running resumes unfinished
# runs and skips finished ones; the report lists runs that failed, and make exits non-zero.
SCALE  ?= full
T1_DIR ?= outputs/table1_$(SCALE)
T1_SWEEP_full := growth=tiny,gradmax model.start_fraction=0.015625,0.25 growth.dt=0.25,1 seed=0,1
T1_SWEEP_cpu  := growth=tiny,gradmax model.start_fraction=0.00390625,0.0625 growth.dt=0.25,1 seed=0,1
T1_TRAIN = GROWRUN_DATA=$(DATA) $(BIN)/growrun train -m resume=true trainer.progress=off
# The fixed final network at each grown run's compute, same seed (trainer.budget_from=<that run>):
# one sweep per seed into $(1)/equal/seed<S>, over that seed's completed runs of $(1)/grown.
EQ_SEEDS := 0 1
T1_EQUAL = for s in $(EQ_SEEDS); do \
	  runs=$$($(BIN)/python -m growrun.train.budget $(1)/grown --seed $$s) && \
	  $(T1_TRAIN) +experiment=table1_$(SCALE)_reference seed=$$s trainer.budget_from=$$runs \
	    hydra.sweep.dir=$(1)/equal/seed$$s $(ARGS) || status=1; \
	done

table1: $(STAMP)
	$(if $(T1_SWEEP_$(SCALE)),,$(error SCALE=$(SCALE): not a Table 1 scale; choose full or cpu))
	status=0; \
	$(T1_TRAIN) +experiment=table1_$(SCALE) $(T1_SWEEP_$(SCALE)) hydra.sweep.dir=$(T1_DIR)/grown $(ARGS) || status=1; \
	$(T1_TRAIN) +experiment=table1_$(SCALE)_reference seed=0,1 hydra.sweep.dir=$(T1_DIR)/reference $(ARGS) || status=1; \
	$(call T1_EQUAL,$(T1_DIR)); \
	$(BIN)/growrun report $(T1_DIR)/grown $(T1_DIR)/reference $(T1_DIR)/equal --out $(T1_DIR) || status=1; \
	exit $$status

# Every growth method on Table 1's fast-growth setting (configs/experiment/table1_$(SCALE).yaml:
# hidden widths start at 1/64 of the final network's, growth.dt=0.25), seeds 0 and 1, plus the
# fixed reference, then one report in $(M_DIR). SCALE=cpu: CIFAR-10 subset, final network ResNet18
# at 1/4 width; SCALE=full: CIFAR-100, full ResNet18 (a GPU machine or cluster). Re-running resumes
# unfinished runs and skips finished ones, as table1 does.
M_DIR     ?= outputs/methods_$(SCALE)
# every method's preset, from the registry (growrun/growth/methods/), read when the recipe runs
M_METHODS = $(shell $(BIN)/python -m growrun.growth.methods)
M_SWEEP_full = growth=$(M_METHODS) model.start_fraction=0.015625 growth.dt=0.25 seed=0,1
M_SWEEP_cpu  = growth=$(M_METHODS) model.start_fraction=0.00390625 growth.dt=0.25 seed=0,1

methods: $(STAMP)
	$(if $(M_SWEEP_$(SCALE)),,$(error SCALE=$(SCALE): not a Table 1 scale; choose full or cpu))
	status=0; \
	$(T1_TRAIN) +experiment=table1_$(SCALE) $(M_SWEEP_$(SCALE)) hydra.sweep.dir=$(M_DIR)/grown $(ARGS) || status=1; \
	$(T1_TRAIN) +experiment=table1_$(SCALE)_reference seed=0,1 hydra.sweep.dir=$(M_DIR)/reference $(ARGS) || status=1; \
	$(call T1_EQUAL,$(M_DIR)); \
	$(BIN)/growrun report $(M_DIR)/grown $(M_DIR)/reference $(M_DIR)/equal --out $(M_DIR) || status=1; \
	exit $$status

# Redraw Table 1's report (table and plots) from the runs that exist, without training.
figures: $(STAMP)
	$(BIN)/growrun report $(wildcard $(T1_DIR)/grown $(T1_DIR)/reference $(T1_DIR)/equal) --out $(T1_DIR)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
