#!/usr/bin/env bash
# Start, or resume, the long distillation (configs/distill-long.yaml) in the background at the
# lowest CPU priority. Checkpoints (every 25 steps) and the teacher cache live in OUT, so running
# this again after a stop or a reboot continues from the last checkpoint.
#   scripts/distill_long.sh            # start / resume
#   STEPS=2400 scripts/distill_long.sh # resume with a longer schedule (the cosine restarts its tail)
# The trainer's pid goes into PIDS (one per line; /work/quiet.sh SIGSTOPs those while benchmarks
# run) and is removed from it when the run ends. Progress: OUT/run.log; metrics: OUT/train_log.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/work/runs/distil-long}
PIDS=${PIDS:-/work/train.pids}
PY=${PY:-/work/main/.venv/bin/python}
CONFIG=${CONFIG:-configs/distill-long.yaml}
mkdir -p "$OUT"
steps=()
if [[ -n "${STEPS:-}" ]]; then steps=(--steps "$STEPS"); fi
nohup nice -n 19 "$PY" -m service distill "$CONFIG" --out "$OUT" "${steps[@]}" >>"$OUT/run.log" 2>&1 &
pid=$!
echo "$pid" >>"$PIDS"
echo "$pid" >"$OUT/trainer.pid"
# remove the pid from PIDS once the trainer exits (finished, failed or killed)
nohup bash -c "while kill -0 $pid 2>/dev/null; do sleep 20; done; sed -i '/^$pid\$/d' '$PIDS'" >/dev/null 2>&1 &
echo "distillation running: pid $pid, log $OUT/run.log, checkpoints $OUT/checkpoint.pt"
