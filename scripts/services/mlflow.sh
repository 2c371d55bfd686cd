# shellcheck shell=bash
# A real `mlflow server` for the tests (tests/apps/governance/test_mlflow_sync.py): on 127.0.0.1, its SQLite backend
# store and proxied artifacts under var/services/mlflow/, wiped at each start. It runs from the overlay venv of
# requirements/mlflow.txt (full mlflow pins gunicorn<27 against the control plane's), which mlflow_prepare builds.
# Sourced by scripts/services.sh; defines mlflow_prepare, mlflow_start, mlflow_stop, mlflow_status.

# The overlay venv's path, recorded by mlflow_prepare (scripts/venv.sh prints it, creating or updating it first).
MLFLOW_VENV=

mlflow_prepare() {
  MLFLOW_VENV=$("$SERVICES_ROOT/scripts/venv.sh" mlflow)
}

# The marker every process of our server carries on its command line: the backend store URI names this checkout.
mlflow_marker() {
  echo "sqlite:///$SERVICES_STATE/mlflow/data/mlflow.db"
}

mlflow_status() {
  local dir="$SERVICES_STATE/mlflow"
  [ -f "$dir/env" ] && [ -f "$dir/port" ] && [ -f "$dir/version" ] || return 1
  pid_is_ours "$(cat "$dir/mlflow.pid" 2>/dev/null)" mlflow "$(mlflow_marker)" || return 1
  mlflow_healthy "$(<"$dir/port")"
}

# True when the server on port $1 answers its /health endpoint (python3, which free_ports needs anyway, not curl).
mlflow_healthy() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$1/health" 2>/dev/null
}

# Stops one server: `mlflow server` runs uvicorn as a child in its (setsid) process group, so the group gets the signal.
mlflow_stop_group() {
  local pid=$1 waited=0
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  while kill -0 -- "-$pid" 2>/dev/null; do
    if [ "$waited" -ge 150 ]; then
      say "mlflow server (process group $pid) ignored SIGTERM for 15s; sending SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

mlflow_stop() {
  local dir="$SERVICES_STATE/mlflow" marker pid
  marker=$(mlflow_marker)
  if [ -f "$dir/mlflow.pid" ]; then
    pid=$(<"$dir/mlflow.pid")
    if pid_is_ours "$pid" mlflow "$marker"; then
      mlflow_stop_group "$pid"
    fi
    rm -f "$dir/mlflow.pid"
  fi
  for pid in $(pids_matching mlflow "$marker"); do
    say "stopping stray mlflow server (pid $pid) left by an earlier run"
    mlflow_stop_group "$pid"
  done
  rm -f "$dir/env" "$dir/port" "$dir/version"
}

mlflow_start() {
  local dir="$SERVICES_STATE/mlflow" attempt
  mkdir -p "$dir"
  [ -n "$MLFLOW_VENV" ] || mlflow_prepare
  for attempt in 1 2 3; do
    mlflow_start_once "$dir"
    if [ "$PORT_TAKEN" -eq 0 ]; then
      "$MLFLOW_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mlflow"))' >"$dir/version"
      return 0
    fi
    say "mlflow: port taken before the server bound it; retrying with another ($attempt/3)"
  done
  die "mlflow: could not bind a free port in 3 attempts (see $dir/mlflow.log)"
}

# Sets PORT_TAKEN=1 when the chosen port was taken in the meantime (see postgres_start_once).
mlflow_start_once() {
  local dir=$1 port log pid waited=0
  PORT_TAKEN=0
  log="$dir/mlflow.log"
  mlflow_stop
  rm -rf "$dir/data"
  mkdir -p "$dir/data/artifacts"
  port=$(free_ports 1)
  : >"$log"
  # One uvicorn worker, and no job runner (it starts a dozen huey consumers for GenAI jobs the tests never use).
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false spawn_detached "$dir/mlflow.pid" "$log" \
    "$MLFLOW_VENV/bin/mlflow" server --backend-store-uri "$(mlflow_marker)" \
    --artifacts-destination "$dir/data/artifacts" --host 127.0.0.1 --port "$port" --workers 1
  pid=$(<"$dir/mlflow.pid")
  # The server imports its whole stack and creates its tables first: about 10 s on a busy 2-core machine.
  until mlflow_healthy "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      if grep -q 'Address already in use' "$log"; then
        PORT_TAKEN=1
        return 0
      fi
      log_tail "$log"
      die "mlflow server exited before it answered (log: $log)"
    fi
    [ "$waited" -lt 1200 ] || {
      log_tail "$log"
      die "mlflow server did not answer /health on 127.0.0.1:$port within 120s (log: $log)"
    }
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "$port" >"$dir/port"
  write_env_fragment "$dir/env" "FEDNESTED_MLFLOW_TEST_SERVER=http://127.0.0.1:$port"
}
