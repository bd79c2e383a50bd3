# Set-up and everyday commands. `make run` and `make test` are the README's two commands: each
# creates the virtualenv it needs before running (`run`: the serving dependencies only, no torch;
# `test`: everything, torch pinned to the CPU wheel 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEACHER ?= models/trimvlm-teacher/1

.PHONY: bench peers-report scale-report reliability-report run serve export default-model export-report service-report verify test lint format install install-dev teacher compress compression-report retention-report trim trim-report student distill-long distill-long-report distill-step-bench clean

$(VENV)/.serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train]'
	touch $@

$(VENV)/.dev: $(VENV)/.train
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# the serving frameworks `trimvlm bench peers` compares with (LitServe and mosec come with dev; this adds Ray Serve)
$(VENV)/.peers: $(VENV)/.dev
	$(PY) -m pip install -q -e '.[peers]'
	touch $@

install: $(VENV)/.train
install-dev: $(VENV)/.dev

## The main job: serve the embedded default (models/trimvlm-default/1) on http://127.0.0.1:8000
## (TRIMVLM_* settings apply, e.g. TRIMVLM_PORT=9000 make run).
run: $(VENV)/.serve
	@echo "trimvlm is at $(VENV)/bin/trimvlm (source $(VENV)/bin/activate to use it directly)"
	$(VENV)/bin/trimvlm serve
serve: run

## Check the model repository: checksums, graphs load, reference outputs reproduce.
verify: $(VENV)/.serve
	$(VENV)/bin/trimvlm models verify --models models

## Rebuild the embedded default from the committed models (export, evaluate, model card).
default-model: $(VENV)/.train
	$(VENV)/bin/trimvlm pipeline run configs/pipeline-default.yaml

## The exported default vs the torch teacher (reports/export), and the service on loopback (reports/service).
export-report: $(VENV)/.train
	$(VENV)/bin/trimvlm export models/trimvlm-student/6 --out runs/export-fp32/trimvlm-default/1 --name trimvlm-default
	$(VENV)/bin/trimvlm report export models/trimvlm-default/1 --fp32 runs/export-fp32/trimvlm-default/1 \
	  --source models/trimvlm-student/6 --out reports/export
## Every README figure: the model benchmark, the service benchmark, then docs/BENCHMARKS.md and the README
## headline block (each run is compared with the previous one: run it twice to see the run-to-run spread).
bench: $(VENV)/.peers
	mkdir -p reports/bench-previous
	if [ -f reports/bench-model/report.json ]; then cp reports/bench-model/report.json reports/bench-previous/model.json; fi
	if [ -f reports/service/report.json ]; then cp reports/service/report.json reports/bench-previous/service.json; fi
	if [ -f reports/peers/report.json ]; then cp reports/peers/report.json reports/bench-previous/peers.json; fi
	$(VENV)/bin/trimvlm bench model --out reports/bench-model
	$(VENV)/bin/trimvlm bench service --models models/trimvlm-default/1 --out reports/service --rounds 5
	$(VENV)/bin/trimvlm bench peers --out reports/peers
	$(VENV)/bin/trimvlm bench docs

## TrimVLM vs LitServe, mosec and Ray Serve on the embedded default (same TaskModel in each; wrk, 1/32/64 clients,
## 3 interleaved rounds, ~9 min on 2 cores) -> reports/peers, then docs/BENCHMARKS.md and the README block.
peers-report: $(VENV)/.peers
	$(VENV)/bin/trimvlm bench peers --out reports/peers
	$(VENV)/bin/trimvlm bench docs

## Trimming, the KV cache, INT8 and batching at BLIP-base size: random-weight BLIP-base checkpoints (224 and 384 px)
## built under runs/scale through the normal import and export, measured -> reports/scale (docs/SCALE.md).
## 2 CPU cores: fixtures ~17 min the first time (kept in runs/scale, ~19 GB), measurements ~39 min.
scale-report: $(VENV)/.dev
	$(VENV)/bin/trimvlm bench scale --out reports/scale

## Overload (60 s at 4x capacity) and soak (5 min per ORT arena setting) -> reports/reliability (docs/RELIABILITY.md).
reliability-report: $(VENV)/.dev
	$(VENV)/bin/trimvlm bench overload --models models/trimvlm-default/1 --out reports/reliability/overload
	$(VENV)/bin/trimvlm bench soak --models models/trimvlm-default/1 --minutes 5 --compare-arena --out reports/reliability/soak
	$(PY) -m benchmarks.soak combine reports/reliability
service-report: $(VENV)/.dev
	$(VENV)/bin/trimvlm bench service --models models/trimvlm-default/1 --out reports/service

## Lint and the whole test suite (what CI runs).
test: $(VENV)/.dev
	$(VENV)/bin/ruff check compression service tests benchmarks
	$(VENV)/bin/pytest -q --timeout 900 --durations=20

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check compression service tests benchmarks
	$(VENV)/bin/ruff format --check compression service tests benchmarks

format: $(VENV)/.dev
	$(VENV)/bin/ruff format compression service tests benchmarks

## Retrain the default teacher (a CUDA GPU: ~7 min on one H100; CPU: ~8 s/step, see the model card).
teacher: $(VENV)/.train
	$(VENV)/bin/trimvlm train configs/teacher.yaml

## Distil the teacher, train the same student from scratch (baseline), prune in both cost modes,
## and write reports/compression (2 CPU cores: about 85 minutes; each step resumes where it stopped).
PRUNE_RUNS := params-0.40 flops-0.55
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

## The committed teacher against the served student (torch), same report: what the student keeps
## of each metric, the unsaturated ones first (2 CPU cores: about 5 minutes).
retention-report: $(VENV)/.train
	$(VENV)/bin/trimvlm report compression --out reports/retention \
	  --model teacher=$(TEACHER) --model served-student=$(TRIMMED)

## Train SmartTrim trimmers on the pruned student from `make compress`, calibrate compute levels, and
## write reports/trim (2 CPU cores: about 30 minutes). The served trimmed student is models/trimvlm-student/6
## (its model card and docs/DISTILL_LONG.md give the chain from this run).
TRIM_STUDENT ?= runs/prune-flops-0.55/model
trim: $(VENV)/.train
	$(VENV)/bin/trimvlm trim configs/trim.yaml --student $(TRIM_STUDENT)
	$(MAKE) trim-report
TRIMMED ?= models/trimvlm-student/6
trim-report: $(VENV)/.train
	$(VENV)/bin/trimvlm report trim $(TRIMMED) --out reports/trim

## Publish the chosen pruned student (see reports/compression/REPORT.md) with its model card.
STUDENT_RUN ?= runs/prune-flops-0.55/model
STUDENT ?= models/trimvlm-student/1
student: $(VENV)/.train
	$(VENV)/bin/trimvlm publish $(STUDENT_RUN) --to $(STUDENT) --name trimvlm-student --dtype fp16
	$(VENV)/bin/trimvlm eval $(STUDENT) --json runs/eval/student.json
	$(VENV)/bin/trimvlm model-card $(STUDENT) --eval runs/eval/student.json \
	  --command "make compress && make student  # configs/distill.yaml, configs/prune.yaml --cost flops --target 0.55" \
	  --trained-on "2-core Intel Xeon CPU, torch 2.13.0 (distillation 29 min, pruning + fine-tuning 13 min)" \
	  --notes "Distilled from models/trimvlm-teacher/1 and pruned in flops cost mode (target 0.55, reached 0.44 in the CPU-sized schedule); the comparison with the teacher, the from-scratch baseline and the params-mode prune is in reports/compression/REPORT.md."

## Continue the served student's distillation in the background (docs/DISTILL_LONG.md): nice 19,
## resumable, teacher cache; run again to resume. STEPS=N for a longer schedule.
DISTILL_LONG_RUN ?= runs/distil-long
distill-long: $(VENV)/.train
	OUT=$(DISTILL_LONG_RUN) PY=$(VENV)/bin/python scripts/distill_long.sh
distill-long-report: $(VENV)/.train
	$(VENV)/bin/python -m compression.distill_report --run $(DISTILL_LONG_RUN) --out reports/distill-long
## Per-step cost of distillation with and without the teacher cache (pause other CPU work while it runs).
distill-step-bench: $(VENV)/.train
	$(VENV)/bin/python -m benchmarks.distill_step --steps 5 --out reports/distill-long/step_cost.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
