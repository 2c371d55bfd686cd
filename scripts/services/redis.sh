# shellcheck shell=bash
# Redis for the tests (Celery broker, channel layer, caches): daemonized on 127.0.0.1, nothing persisted.
# Sourced by scripts/services.sh; defines redis_start, redis_stop, redis_status.

redis_status() {
  local dir="$SERVICES_STATE/redis"
  [ -f "$dir/env" ] && [ -f "$dir/port" ] && [ -f "$dir/version" ] || return 1
  pid_is_ours "$(cat "$dir/redis.pid" 2>/dev/null)" redis-server "$dir/redis.conf" || return 1
  [ "$(redis-cli -h 127.0.0.1 -p "$(<"$dir/port")" ping 2>/dev/null)" = PONG ]
}

redis_stop() {
  local dir="$SERVICES_STATE/redis"
  # SIGTERM makes Redis exit at once; with persistence off there is nothing to save.
  stop_ours "$dir/redis.pid" redis-server "$dir/redis.conf" TERM 10
  rm -f "$dir/env" "$dir/port" "$dir/version"
}

redis_start() {
  local dir="$SERVICES_STATE/redis" version attempt
  mkdir -p "$dir"
  version=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
  for attempt in 1 2 3; do
    redis_start_once "$dir"
    if [ "$PORT_TAKEN" -eq 0 ]; then
      echo "$version" >"$dir/version"
      return 0
    fi
    say "redis: port taken before the server bound it; retrying with another ($attempt/3)"
  done
  die "redis: could not bind a free port in 3 attempts (see $dir/redis.log)"
}

# Sets PORT_TAKEN=1 when the chosen port was taken in the meantime (see postgres_start_once).
redis_start_once() {
  local dir=$1 port log
  PORT_TAKEN=0
  log="$dir/redis.log"
  redis_stop
  port=$(free_ports 1)
  : >"$log"
  # proc-title-template puts the config path (our marker) into the process title, where stray detection looks.
  cat >"$dir/redis.conf" <<EOF
bind 127.0.0.1
port $port
protected-mode yes
daemonize yes
pidfile $dir/redis.pid
logfile $log
dir $dir
save ""
appendonly no
databases 16
proc-title-template "{title} {listen-addr} {config-file}"
EOF
  # Redis daemonizes itself (fork + setsid) and writes its own pid file; fd 9 is services.sh's lock. It exits
  # non-zero only for a bad config: a port conflict shows later, in the daemon's log.
  if ! redis-server "$dir/redis.conf" </dev/null >>"$log" 2>&1 9>&-; then
    log_tail "$log"
    die "redis-server rejected $dir/redis.conf (log: $log)"
  fi
  local waited=0
  until [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
    if [ "$waited" -ge 10 ] && ! pid_is_ours "$(cat "$dir/redis.pid" 2>/dev/null)" redis-server "$dir/redis.conf"; then
      if grep -q 'Address already in use' "$log"; then
        PORT_TAKEN=1
        return 0
      fi
      log_tail "$log"
      die "redis-server is not running (log: $log)"
    fi
    [ "$waited" -lt 200 ] || {
      log_tail "$log"
      die "redis did not answer PING on 127.0.0.1:$port within 20s (log: $log)"
    }
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "$port" >"$dir/port"
  write_env_fragment "$dir/env" "REDIS_URL=redis://127.0.0.1:$port/0" "CELERY_BROKER_URL=redis://127.0.0.1:$port/1"
}
