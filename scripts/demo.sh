#!/usr/bin/env bash
# `make demo`: the pipeline on the embedded default. Starts a local Prefect server and a process worker
# on free loopback ports, deploys galip-train/demo (prefect.yaml) and the local stand-in of
# galip-train/cc12m, runs the demo with --watch, prints where to look, and stops both servers
# (KEEP=1, as `make ui` does afterwards, leaves them running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prefect-local.sh
T0=$SECONDS
step() { printf '[demo %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
[[ "${KEEP:-0}" == 1 ]] || trap prefect_down EXIT

step "starting Prefect server (loopback, free port)"; prefect_server_up
step "Prefect API at $PREFECT_API_URL; starting process worker for pool $GALIP_POOL"; prefect_worker_up
step "deploying galip-train/demo (prefect.yaml) and galip-train/cc12m (local stand-in)"
"$BIN/prefect" --no-prompt deploy --name demo >"$PREFECT_HOME/deploy.log" 2>&1 || { cat "$PREFECT_HOME/deploy.log"; exit 1; }
"$PY" -m flows.deploy_local "$GALIP_POOL" >>"$PREFECT_HOME/deploy.log" 2>&1 || { cat "$PREFECT_HOME/deploy.log"; exit 1; }
step "running galip-train/demo (full stage logs: Prefect UI, or $PREFECT_HOME/worker.log)"
# One progress line per stage: the flow's stage start/finish lines, picked out of the worker's log.
tail -n0 -F "$PREFECT_HOME/worker.log" 2>/dev/null | grep --line-buffered -E "\[(download|clip|train|evaluate)\] (dvc|galip|torchrun|done)|gate:|registered| - metrics: | - data: " \
  | sed -u -E 's/^.*\| (prefect\.(flow|task)_runs|.*) - /  /' &
TAIL_PID=$!
rc=0
"$BIN/prefect" deployment run galip-train/demo --watch --watch-interval 5 >"$PREFECT_HOME/demo-run.log" 2>&1 || rc=$?
sleep 1; kill "$TAIL_PID" 2>/dev/null || true
if ((rc != 0)); then tail -n 40 "$PREFECT_HOME/demo-run.log"; step "flow run failed (exit $rc); worker log: $PREFECT_HOME/worker.log"; exit "$rc"; fi
step "flow run finished"
"$PY" scripts/demo_summary.py "$PREFECT_API_URL" | tee "$PREFECT_HOME/demo-summary.txt"
step "done in $((SECONDS - T0)) s"
