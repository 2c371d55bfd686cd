# shellcheck shell=bash
# PostgreSQL for the tests: a throwaway cluster (Debian's server binaries, our own initdb) on 127.0.0.1, fsync off.
# Sourced by scripts/services.sh; defines postgres_start, postgres_stop, postgres_status.
#
# PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` OS user. That user usually
# cannot reach the checkout (a clone under /root or a private mktemp dir), so the cluster lives in a directory of
# its own under /tmp whose name is derived from the checkout path, and is recorded in var/services/postgres/base.
# Logs stay in the checkout: the server writes to a file this script opens for it.

postgres_bindir() {
  if [ -n "${FEDNESTED_PG_BINDIR:-}" ]; then
    echo "$FEDNESTED_PG_BINDIR"
    return
  fi
  local newest
  newest=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -n 1)
  [ -n "$newest" ] || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (set FEDNESTED_PG_BINDIR)"
  dirname "$newest"
}

# The cluster directory: deterministic per checkout and user, so a later run finds a stray server even when
# var/services was deleted.
postgres_base() {
  local key
  # A private state directory (FEDNESTED_SERVICES_STATE) gets a cluster of its own; the default one keeps its name.
  key=$(printf '%s' "$SERVICES_ROOT${FEDNESTED_SERVICES_STATE:+:$SERVICES_STATE}" | sha256sum | cut -c1-12)
  echo "${FEDNESTED_PG_TMPDIR:-/tmp}/fednested-pg-$(id -u)-$key"
}

# The command prefix that runs a program as the cluster's owner: the `postgres` OS user when we are root (setpriv
# execs in place, unlike runuser, so the server's pid is the one we record), nothing otherwise.
as_pg_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    printf '%s\0' "$(command -v setpriv)" --reuid=postgres --regid=postgres --init-groups --
  fi
}

postgres_status() {
  local dir="$SERVICES_STATE/postgres" port
  [ -f "$dir/env" ] && [ -f "$dir/port" ] && [ -f "$dir/version" ] || return 1
  pid_is_ours "$(cat "$dir/pid" 2>/dev/null)" postgres "$(postgres_base)/data" || return 1
  port=$(<"$dir/port")
  "$(postgres_bindir)/pg_isready" -q -h 127.0.0.1 -p "$port" -t 2
}

postgres_stop() {
  local dir="$SERVICES_STATE/postgres" base
  base=$(postgres_base)
  # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to disconnect.
  stop_ours "$dir/pid" postgres "$base/data" INT 15
  if [ -e "$base" ]; then
    [ -L "$base" ] && die "$base is a symbolic link; refusing to delete what it points to"
    rm -rf "$base"
  fi
  rm -f "$dir/env" "$dir/port" "$dir/version"
}

postgres_start() {
  local dir="$SERVICES_STATE/postgres" bindir base version attempt
  bindir=$(postgres_bindir)
  base=$(postgres_base)
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "the postgres OS user does not exist (install the postgresql package)"
  fi
  version=$("$bindir/postgres" --version | awk '{ print $3 }')
  for attempt in 1 2 3; do
    postgres_start_once "$dir" "$bindir" "$base"
    if [ "$PORT_TAKEN" -eq 0 ]; then
      echo "$version" >"$dir/version"
      return 0
    fi
    say "postgres: port taken before the server bound it; retrying with another ($attempt/3)"
  done
  die "postgres: could not bind a free port in 3 attempts (see $dir/postgres.log)"
}

# Starts the server of cluster $3 on port $4 and waits until it accepts connections; sets PORT_TAKEN=1 when the port
# was taken in the meantime.
postgres_spawn() {
  local dir=$1 bindir=$2 base=$3 port=$4 log="$1/postgres.log" owner=() waited=0
  PORT_TAKEN=0
  mapfile -d '' owner < <(as_pg_owner)
  # Test speed over durability: the cluster is thrown away on stop, so it never needs to survive a crash.
  spawn_detached "$dir/pid" "$log" "${owner[@]}" "$bindir/postgres" -D "$base/data" \
    -c listen_addresses=127.0.0.1 -c port="$port" -c unix_socket_directories="$base/run" \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=64MB -c max_connections=100
  until "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -t 1; do
    if ! pid_is_ours "$(<"$dir/pid")" postgres "$base/data"; then
      if grep -q 'could not bind\|Address already in use' "$log"; then
        PORT_TAKEN=1
        return 0
      fi
      log_tail "$log"
      die "postgres exited during start-up (log: $log)"
    fi
    [ "$waited" -lt 300 ] || {
      log_tail "$log"
      die "postgres did not accept connections on 127.0.0.1:$port within 30s (log: $log)"
    }
    sleep 0.1
    waited=$((waited + 1))
  done
}

# The server stopped (fast shutdown: open sessions are cut, their transactions rolled back, as clients see a crash)
# and started again on the same port with the same cluster, so committed rows survive and clients reconnect.
postgres_restart() {
  local dir="$SERVICES_STATE/postgres" base
  base=$(postgres_base)
  stop_ours "$dir/pid" postgres "$base/data" INT 15
  postgres_spawn "$dir" "$(postgres_bindir)" "$base" "$(<"$dir/port")"
  [ "$PORT_TAKEN" -eq 0 ] || die "postgres: port $(<"$dir/port") was taken while the server was down"
}

# Sets PORT_TAKEN=1 when the chosen port was taken in the meantime, so the caller retries with another. (A status
# variable rather than a return code: calling a function in a `||` list would switch off errexit inside it.)
postgres_start_once() {
  local dir=$1 bindir=$2 base=$3 port password log owner=()
  PORT_TAKEN=0
  log="$dir/postgres.log"
  mapfile -d '' owner < <(as_pg_owner)
  postgres_stop
  port=$(free_ports 1)
  password=$(random_hex 16)
  # The cluster directory is ours alone: created fresh, owned by the server's user, closed to everyone else.
  (umask 077 && mkdir "$base" "$base/run")
  [ "$(id -u)" -ne 0 ] || chown -R postgres:postgres "$base"
  : >"$log"
  (cd / && "${owner[@]}" "$bindir/initdb" -D "$base/data" -U postgres -E UTF8 --locale=C --no-sync \
    --auth-local=trust --auth-host=scram-sha-256) >>"$log" 2>&1 \
    || { log_tail "$log"; die "postgres: initdb failed in $base/data"; }
  postgres_spawn "$dir" "$bindir" "$base" "$port"
  [ "$PORT_TAKEN" -eq 0 ] || return 0
  "$bindir/psql" -q -X -h "$base/run" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE fednested LOGIN CREATEDB PASSWORD '$password'" \
    -c "CREATE DATABASE fednested OWNER fednested" >>"$log" 2>&1 \
    || { log_tail "$log"; die "postgres: could not create role and database fednested (log: $log)"; }
  echo "$port" >"$dir/port"
  write_env_fragment "$dir/env" "DATABASE_URL=postgres://fednested:$password@127.0.0.1:$port/fednested"
}
