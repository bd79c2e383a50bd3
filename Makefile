# Set-up and everyday commands. `make run` and `make test` are the README's two commands: each
# creates the virtualenv it needs (torch pinned to the CPU wheel 2.13.0) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEACHER ?= models/trimvlm-teacher/1

.PHONY: run test lint format install install-dev teacher compress compression-report clean

$(VENV)/.train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train]'
	touch $@

$(VENV)/.dev: $(VENV)/.train
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.train
install-dev: $(VENV)/.dev

## The main job on the embedded default: evaluate the committed teacher (the service replaces this).
run: $(VENV)/.train
	$(VENV)/bin/trimvlm eval $(TEACHER) --json runs/eval/teacher.json

## Lint and the whole test suite (what CI runs).
test: $(VENV)/.dev
	$(VENV)/bin/ruff check compression service tests
	$(VENV)/bin/pytest -q --timeout 900

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check compression service tests
	$(VENV)/bin/ruff format --check compression service tests

format: $(VENV)/.dev
	$(VENV)/bin/ruff format compression service tests

## Retrain the default teacher (a CUDA GPU: ~7 min on one H100; CPU: ~8 s/step, see the model card).
teacher: $(VENV)/.train
	$(VENV)/bin/trimvlm train configs/teacher.yaml

## Distil the teacher, train the same student from scratch (baseline), prune at three targets,
## and write reports/compression (2 CPU cores: about 100 minutes; resumes where it stopped).
PRUNE_RUNS := params-0.40 flops-0.55 params-0.60
compress: $(VENV)/.train
	$(VENV)/bin/trimvlm distill configs/distill.yaml
	$(VENV)/bin/trimvlm distill configs/scratch-student.yaml
	for run in $(PRUNE_RUNS); do \
	  cost=$${run%-*}; target=$${run#*-}; \
	  $(VENV)/bin/trimvlm prune configs/prune.yaml --cost $$cost --target $$target --out runs/prune-$$run || exit 1; \
	done
	$(MAKE) compression-report

compression-report: $(VENV)/.train
	$(VENV)/bin/trimvlm report compression --out reports/compression \
	  --model teacher=$(TEACHER) --model distilled=runs/distill/model --model scratch=runs/scratch/model \
	  $(foreach r,$(PRUNE_RUNS),--model pruned-$(r)=runs/prune-$(r)/model)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
