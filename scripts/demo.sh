#!/usr/bin/env bash
# `make demo`: the pipeline on the embedded default. Starts a local Prefect server and a process worker
# on loopback (ports kept in .prefect/), deploys galip-train/demo (prefect.yaml) and the local stand-in
# of galip-train/cc12m, runs the demo with --watch, prints where to look, and stops what it started
# (Ctrl-C included: the flow run is stopped too and recorded as crashed). KEEP=1 keeps the servers and
# starts the MLflow UI; `make ui` brings both UIs back later at the same addresses.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prefect-local.sh
T0=$SECONDS
step() { printf '[demo %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
RUN_PID="" TAIL_PID="" STARTED=""
# What this demo starts it also stops (KEEP=1: nothing); a server or worker already running (make ui) stays.
for name in worker server; do _alive "$PREFECT_HOME/$name.pid" || STARTED+=" $name"; done
finish() {
  local pid name
  for pid in $RUN_PID $TAIL_PID; do kill "$pid" 2>/dev/null || true; done
  [[ "${KEEP:-0}" == 1 ]] && return 0
  _stop_flow_runs  # none after a finished run; an interrupted one is stopped and recorded as crashed
  for name in $STARTED; do _stop_pid_file "$PREFECT_HOME/$name.pid"; done
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting Prefect server (loopback)"; prefect_server_up
# The flow's links point at the MLflow UI's address; the UI itself runs with KEEP=1 or `make ui`.
mlflow_ui_url
step "Prefect API at $PREFECT_API_URL; starting process worker for pool $GALIP_POOL"; prefect_worker_up
step "deploying galip-train/demo (prefect.yaml) and galip-train/cc12m (local stand-in)"
"$BIN/prefect" --no-prompt deploy --name demo >"$PREFECT_HOME/deploy.log" 2>&1 || { cat "$PREFECT_HOME/deploy.log"; exit 1; }
deploy_local_cc12m
LOG_START=$(wc -l <"$PREFECT_HOME/worker.log" 2>/dev/null || echo 0)
step "running galip-train/demo (full stage logs: Prefect UI, or $PREFECT_HOME/worker.log)"
"$BIN/prefect" deployment run galip-train/demo --watch --watch-interval 5 >"$PREFECT_HOME/demo-run.log" 2>&1 &
RUN_PID=$!
# One progress line per stage: the flow's stage start/finish lines, picked out of the worker's log. tail
# ends with this script (--pid), and grep and sed with tail, even if this script is killed outright.
tail -n0 -F --pid=$$ "$PREFECT_HOME/worker.log" 2>/dev/null > >(
  grep --line-buffered -E "\[(download|clip|train|evaluate|register)\] (dvc|galip|torchrun|done)|gate:| - registered | - metrics: | - data: " \
    | sed -u -E 's/^.*\| (prefect\.(flow|task)_runs|.*) - /  /'
) &
TAIL_PID=$!
rc=0
wait "$RUN_PID" || rc=$?
RUN_PID=""
sleep 1; kill "$TAIL_PID" 2>/dev/null || true; TAIL_PID=""
if ((rc != 0)); then tail -n 40 "$PREFECT_HOME/demo-run.log"; step "flow run failed (exit $rc); worker log: $PREFECT_HOME/worker.log"; exit "$rc"; fi
step "flow run finished"
step "machine figure: 20 demo train steps (bench/train_step.py), so times from other machines compare"
# batch 16 whatever the profile trains with: the figure stays comparable across recipes
FIGURE=$("$PY" bench/train_step.py --profile demo --batch 16 --iters 20 --warmup 3 2>/dev/null | tail -n1)
mkdir -p runs/demo
"$PY" scripts/demo_timing.py "$PREFECT_HOME/worker.log" "$LOG_START" "$((SECONDS - T0))" "$FIGURE" >runs/demo/demo_timing.json
if [[ "${KEEP:-0}" == 1 ]]; then step "starting the MLflow UI (KEEP=1)"; mlflow_ui_up; fi
state=stopped; [[ "$STARTED" == *server* ]] || state=running; [[ "${KEEP:-0}" == 1 ]] && state=kept
"$PY" scripts/demo_summary.py "$PREFECT_UI_URL" "$GALIP_MLFLOW_UI_URL" "$state" \
  | tee "$PREFECT_HOME/demo-summary.txt"
step "done in $((SECONDS - T0)) s"
