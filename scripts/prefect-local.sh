# Local Prefect server + process worker on free loopback ports (sourced by scripts/demo.sh and the Makefile).
# State lives in .prefect/ (PREFECT_HOME): server.port, server.pid, worker.pid and their logs.
# Processes are started in their own sessions and stopped by the recorded PIDs (their process groups).
set -euo pipefail

export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"
GALIP_POOL="${GALIP_POOL:-galip-local}"
PY="${PY:-$PWD/.venv/bin/python}"
BIN="$(dirname "$PY")"
mkdir -p "$PREFECT_HOME"

_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

_wait_for() {  # _wait_for SECONDS WHAT CMD...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "error: $what did not come up in time; see $PREFECT_HOME/*.log" >&2; return 1; fi
    sleep 1
  done
}

prefect_api_url() { echo "http://127.0.0.1:$(cat "$PREFECT_HOME/server.port")/api"; }

prefect_server_up() {
  if _alive "$PREFECT_HOME/server.pid"; then export PREFECT_API_URL; PREFECT_API_URL="$(prefect_api_url)"; return 0; fi
  local port; port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  echo "$port" >"$PREFECT_HOME/server.port"
  export PREFECT_API_URL="http://127.0.0.1:$port/api"
  PREFECT_API_URL= PREFECT_UI_API_URL="$PREFECT_API_URL" setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$port" \
    >"$PREFECT_HOME/server.log" 2>&1 < /dev/null &
  echo $! >"$PREFECT_HOME/server.pid"; disown
  _wait_for 120 "Prefect server on port $port" "$PY" -c "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)"
}

prefect_worker_up() {
  if _alive "$PREFECT_HOME/worker.pid"; then return 0; fi
  # The worker creates the process pool itself (`prefect work-pool create` would fetch a registry online).
  setsid "$BIN/prefect" worker start --pool "$GALIP_POOL" --type process --name "$GALIP_POOL-worker" \
    >"$PREFECT_HOME/worker.log" 2>&1 < /dev/null &
  echo $! >"$PREFECT_HOME/worker.pid"; disown
  _wait_for 90 "work pool $GALIP_POOL" "$BIN/prefect" work-pool inspect "$GALIP_POOL"
}

_stop_pid_file() {  # SIGTERM the process group twice (a worker ignores the first), then SIGKILL
  local file=$1 pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true; sleep 2
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

prefect_down() {
  _stop_pid_file "$PREFECT_HOME/worker.pid"
  _stop_pid_file "$PREFECT_HOME/server.pid"
}
