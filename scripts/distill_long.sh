#!/usr/bin/env bash
# Start, or resume, the long distillation (configs/distill-long.yaml) in the background at the
# lowest CPU priority. Checkpoints (every 25 steps) and the teacher cache live in OUT, so running
# this again after a stop or a reboot continues from the last checkpoint.
#   scripts/distill_long.sh            # start / resume
#   STEPS=2400 scripts/distill_long.sh # resume with a longer schedule (the cosine restarts its tail)
# If PIDS names a file, the trainer's pid is appended to it (one per line, for a wrapper that pauses
# background training while benchmarks run) and removed when the run ends. Progress: OUT/run.log; metrics: OUT/train_log.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/distil-long}
PIDS=${PIDS:-}
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/distill-long.yaml}
mkdir -p "$OUT"
steps=()
if [[ -n "${STEPS:-}" ]]; then steps=(--steps "$STEPS"); fi
nohup nice -n 19 "$PY" -m service distill "$CONFIG" --out "$OUT" "${steps[@]}" >>"$OUT/run.log" 2>&1 &
pid=$!
echo "$pid" >"$OUT/trainer.pid"
# remove the pid from PIDS once the trainer exits (finished, failed or killed)
if [[ -n "$PIDS" ]]; then
  echo "$pid" >>"$PIDS"
  nohup bash -c "while kill -0 $pid 2>/dev/null; do sleep 20; done; sed -i '/^$pid\$/d' '$PIDS'" >/dev/null 2>&1 &
fi
echo "distillation running: pid $pid, log $OUT/run.log, checkpoints $OUT/checkpoint.pt"
