# Local Prefect server, process worker and MLflow UI on loopback (sourced by scripts/demo.sh and the Makefile).
# State lives in .prefect/ (PREFECT_HOME): the ports (kept after a stop, so `make ui` serves the UIs again at
# the addresses `make demo` printed), the PIDs and the logs. Each process runs in its own session and is
# stopped by its recorded PID (its whole process group); flow runs are stopped first, while the server can
# still record how they ended.
set -euo pipefail

export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
set -a; source "$(dirname "${BASH_SOURCE[0]}")/../galip/telemetry.env"; set +a  # telemetry off for the servers, the worker and its flow runs
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"
GALIP_POOL="${GALIP_POOL:-galip-local}"
PY="${PY:-$PWD/.venv/bin/python}"
BIN="$(dirname "$PY")"
mkdir -p "$PREFECT_HOME"

_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# _wait_for SECONDS WHAT PIDFILE CMD...: until CMD succeeds. Fails (callers add `|| return 1`: set -e does
# not apply inside the `&&` lists of `make ui`) when the process died, at once, or after SECONDS, which is
# generous because a server starting on a loaded 2-core machine took more than two minutes.
_wait_for() {
  local secs=$1 what=$2 pidfile=$3 deadline=$((SECONDS + $1)); shift 3
  until "$@" >/dev/null 2>&1; do
    if ! _alive "$pidfile"; then echo "error: $what exited while starting; see $PREFECT_HOME/*.log" >&2; return 1; fi
    if ((SECONDS > deadline)); then echo "error: $what did not come up in $secs s; see $PREFECT_HOME/*.log" >&2; return 1; fi
    sleep 1
  done
}

_http_ok() { "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1"; }

# Binds as the servers do (SO_REUSEADDR), so a port left in TIME_WAIT by our own stopped server counts as free.
_BIND='import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); print(s.getsockname()[1])'

_pick_port() {  # _pick_port NAME DEFAULT: GALIP_<NAME>_PORT, else the port recorded last time, else DEFAULT; a free one if taken
  local file="$PREFECT_HOME/$1.port" env="GALIP_${1^^}_PORT" want port
  want="${!env:-$(cat "$file" 2>/dev/null || echo "$2")}"
  if ! port="$("$PY" -c "$_BIND" "$want" 2>/dev/null)"; then
    port="$("$PY" -c "$_BIND" 0)"
    echo "note: port $want is in use by another program; the $1 UI moves to $port" >&2
  fi
  echo "$port" >"$file"
  echo "$port"
}

prefect_server_up() {  # exports PREFECT_API_URL and PREFECT_UI_URL of the running (or newly started) server
  local port api
  if _alive "$PREFECT_HOME/server.pid"; then port="$(cat "$PREFECT_HOME/prefect.port")"; else port="$(_pick_port prefect 4200)"; fi
  api="http://127.0.0.1:$port/api"
  export PREFECT_API_URL="$api" PREFECT_UI_URL="http://127.0.0.1:$port"
  if ! _alive "$PREFECT_HOME/server.pid"; then
    # The UI reads its API address from PREFECT_UI_API_URL (GET /ui-settings); both name this server.
    # The classic UI at the root too: the flow's links (prefect.runtime's ui_url) open classic pages.
    # Logs streamed out (off by default): `prefect deployment run --watch` then prints the run's log lines,
    # e.g. what a failed preflight found missing, not only its events.
    PREFECT_UI_API_URL="$api" PREFECT_SERVER_UI_V2_ENABLED=false \
    PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
      setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$port" \
      >"$PREFECT_HOME/server.log" 2>&1 </dev/null &
    echo $! >"$PREFECT_HOME/server.pid"; disown
    _wait_for 300 "Prefect server on port $port" "$PREFECT_HOME/server.pid" _http_ok "$api/health" || return 1
  fi
  # Without a worker, flow runs still marked running have lost their process: record that they crashed.
  _alive "$PREFECT_HOME/worker.pid" || "$PY" -m flows.reap "$GALIP_POOL" >>"$PREFECT_HOME/reap.log" 2>&1 \
    || echo "warning: could not check for crashed runs; see $PREFECT_HOME/reap.log" >&2
}

mlflow_tracking_uri() { "$PY" -c 'from flows.galip_train import GalipTrainParams, absolute_tracking_uri; print(absolute_tracking_uri(GalipTrainParams().config()))'; }

mlflow_ui_url() {  # exports GALIP_MLFLOW_UI_URL: the tracking server itself, else the local UI's (recorded) address
  MLFLOW_STORE_URI="${MLFLOW_STORE_URI:-$(mlflow_tracking_uri)}"
  if [[ "$MLFLOW_STORE_URI" == http* ]]; then export GALIP_MLFLOW_UI_URL="$MLFLOW_STORE_URI"; return 0; fi
  if _alive "$PREFECT_HOME/mlflow.pid"; then
    export GALIP_MLFLOW_UI_URL="http://127.0.0.1:$(cat "$PREFECT_HOME/mlflow.port")"
  else
    export GALIP_MLFLOW_UI_URL="http://127.0.0.1:$(_pick_port mlflow 5000)"
  fi
}

mlflow_ui_up() {  # the MLflow UI on the embedded store (nothing to start when tracking goes to a server)
  mlflow_ui_url
  [[ "$MLFLOW_STORE_URI" == http* ]] && return 0
  _alive "$PREFECT_HOME/mlflow.pid" && return 0
  local port="${GALIP_MLFLOW_UI_URL##*:}"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server --backend-store-uri "$MLFLOW_STORE_URI" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$PREFECT_HOME/mlflow.log" 2>&1 </dev/null &
  echo $! >"$PREFECT_HOME/mlflow.pid"; disown
  _wait_for 300 "MLflow UI on port $port" "$PREFECT_HOME/mlflow.pid" _http_ok "$GALIP_MLFLOW_UI_URL/health" || return 1
}

prefect_worker_up() {
  if _alive "$PREFECT_HOME/worker.pid"; then return 0; fi
  # The worker creates the process pool itself (`prefect work-pool create` would fetch a registry online).
  setsid "$BIN/prefect" worker start --pool "$GALIP_POOL" --type process --name "$GALIP_POOL-worker" \
    >"$PREFECT_HOME/worker.log" 2>&1 </dev/null &
  echo $! >"$PREFECT_HOME/worker.pid"; disown
  _wait_for 180 "work pool $GALIP_POOL" "$PREFECT_HOME/worker.pid" "$BIN/prefect" work-pool inspect "$GALIP_POOL" || return 1
}

deploy_local_cc12m() {  # galip-train/cc12m on the local pool: a run fails in preflight, naming what is missing
  "$PY" -m flows.deploy_local "$GALIP_POOL" >>"$PREFECT_HOME/deploy.log" 2>&1 \
    || { tail -n 20 "$PREFECT_HOME/deploy.log" >&2; return 1; }
}

_stop_group() {  # _stop_group PID TERMS GRACE_S: SIGTERM the process group TERMS times, wait for PID, then SIGKILL the group
  local pid=$1 terms=$2 grace=$3 i
  kill -0 "$pid" 2>/dev/null || return 0
  for ((i = 0; i < terms; i++)); do
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq "$((grace * 2 / terms))"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

_descendants() { local p; for p in $(pgrep -P "$1" 2>/dev/null); do echo "$p"; _descendants "$p"; done; }

_stop_flow_runs() {  # each flow run is a child of the worker in its own session (prefect.engine, dvc, torchrun, trainer)
  local child tree
  [[ -f "$PREFECT_HOME/worker.pid" ]] || return 0
  for child in $(pgrep -P "$(cat "$PREFECT_HOME/worker.pid")" 2>/dev/null); do
    tree="$(_descendants "$child")"  # torchrun starts its workers in sessions of their own
    # one SIGTERM: Prefect marks the run Crashed and the flow ends its MLflow run; a second would cut that short
    _stop_group "$child" 1 30
    [[ -z "$tree" ]] || kill -KILL $tree 2>/dev/null || true
  done
}

_stop_pid_file() {  # _stop_pid_file FILE: twice SIGTERM (a worker ignores the first), then SIGKILL
  [[ -f "$1" ]] || return 0
  _stop_group "$(cat "$1")" 2 10
  rm -f "$1"
}

prefect_down() {
  _stop_flow_runs
  _stop_pid_file "$PREFECT_HOME/worker.pid"
  _stop_pid_file "$PREFECT_HOME/server.pid"
  _stop_pid_file "$PREFECT_HOME/mlflow.pid"
}
