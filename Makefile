# deqlm: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first. CPU wheel by default; a GPU user sets e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deqlm-installed
NPROC ?= 1
EXP ?= experiments/wt103/transformer_deq_medium_adaptive.yaml
ARGS ?=
RUN ?=
RUNS ?=
OUT ?=

ifeq ($(NPROC),1)
  LAUNCH := $(PY) -m deqlm.train
else
  LAUNCH := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m deqlm.train
endif

.PHONY: help venv test test-slow lint demo data-ptb data-wt103 data-wt2 train-wt103 train-ptb train-copy \
        eval eval-caps sample compare bench-solver bench-memory bench-speed bench-allocator clean

help:
	@echo "make venv         create .venv ($(TORCH_SPEC) first, then deqlm with test extras)"
	@echo "make test         run the CPU test-suite (creates .venv when needed)"
	@echo "make lint         ruff"
	@echo "make demo         DEQ-Transformer vs unrolled baseline on the embedded corpus (offline, CPU, minutes)"
	@echo "make data-ptb | data-wt103 | data-wt2   prepare corpora under data/"
	@echo "make train-wt103 [EXP=...] [NPROC=N] [ARGS='k=v ...']   train a WikiText-103 row"
	@echo "make train-ptb | train-copy [ARGS=...]"
	@echo "make eval [RUN=dir]    evaluate runs (writes eval.json)"
	@echo "make eval-caps [RUN=dir]   also each DEQ's test ppl at forward caps 1..30 (solver_caps.json)"
	@echo "make sample RUN=dir [ARGS=\"--prompt TEXT --tokens N\"]   text from a trained LM, with its solver steps per token"
	@echo "make compare [RUNS=...] [OUT=dir]  summary tables + plots under results/compare/<corpus>/"
	@echo "make bench-solver | bench-memory | bench-speed"
	@echo "make bench-allocator   glibc default vs tuned allocator: tokens/s, page faults, system time (PTB, copy)"

venv: $(STAMP)

# Reinstalls only when the package metadata changes (the source itself is installed editable).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts

demo: $(STAMP)
	$(PY) -m deqlm.demo

data-ptb: $(STAMP)
	$(PY) scripts/prepare_data.py --dataset ptb $(ARGS)

data-wt103: $(STAMP)
	$(PY) scripts/prepare_data.py --dataset wt103 $(ARGS)

data-wt2: $(STAMP)
	$(PY) scripts/prepare_data.py --dataset wt2 $(ARGS)

data/wikitext-103/wiki.train.tokens:
	$(MAKE) data-wt103 ARGS=

data/ptb/ptb.train.txt:
	$(MAKE) data-ptb ARGS=

train-wt103: $(STAMP) data/wikitext-103/wiki.train.tokens
	$(LAUNCH) $(EXP) $(ARGS)

train-ptb: $(STAMP) data/ptb/ptb.train.txt
	$(LAUNCH) experiments/ptb/trellisnet_deq.yaml $(ARGS)

train-copy: $(STAMP)
	$(LAUNCH) experiments/copy/transformer_deq.yaml $(ARGS)

eval: $(STAMP)
	$(PY) -m deqlm.eval $(if $(RUN),$(RUN),results/runs) $(ARGS)

eval-caps: $(STAMP)
	$(PY) -m deqlm.eval $(if $(RUN),$(RUN),results/runs) caps=default $(ARGS)

sample: $(STAMP)
	$(if $(RUN),,$(error give the run to sample from: make sample RUN=results/runs/<corpus>/<experiment>/<stamp>))
	$(PY) -m deqlm.sample $(RUN) $(ARGS)

compare: $(STAMP)
	$(PY) -m deqlm.eval.report $(if $(RUNS),$(RUNS),results/runs) --out $(or $(OUT),results/compare)

bench-solver: $(STAMP)
	$(PY) -m deqlm.bench solver --json

bench-memory: $(STAMP)
	$(PY) -m deqlm.bench memory --paper --out $(or $(OUT),results/bench) $(ARGS)

bench-speed: $(STAMP)
	$(PY) -m deqlm.bench speed --out $(or $(OUT),results/bench) $(ARGS)

bench-allocator: $(STAMP) data/ptb/ptb.train.txt
	OMP_NUM_THREADS=1 $(PY) -m deqlm.bench allocator --out $(or $(OUT),results/bench) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
