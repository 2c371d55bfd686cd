# shellcheck shell=bash
# Shared helpers for scripts/services.sh and its per-service modules (sourced, never run).
# Every process a module starts carries a marker path unique to this checkout in its command line, so a stray one
# from an aborted run is found and stopped even when its pid file is gone.

say() { printf 'services: %s\n' "$*" >&2; }

die() {
  printf 'services: error: %s\n' "$*" >&2
  exit 1
}

# Seconds since an $EPOCHREALTIME reading, to one decimal.
elapsed_since() {
  local start=$1
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

# N distinct free TCP ports on 127.0.0.1, one per line. They are held open together while chosen, so the N are
# distinct; another process may still take one before our server binds it, which the modules detect and retry.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print("\n".join(str(s.getsockname()[1]) for s in held))
PY
}

random_hex() {
  od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

# Pids of processes named $1 (as in /proc/PID/comm) whose command line holds $2 as a whole word (so the marker of
# checkout /a/b never matches one of /x/a/b). Reads /proc directly rather than through pgrep so that matching is
# exact and nothing is matched by its own search.
pids_matching() {
  local comm=$1 marker=$2 dir pid name args
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ "$pid" != "$$" ] || continue
    # stderr is redirected first: a process that exits mid-scan must not print "No such file" on the way out.
    read -r name 2>/dev/null <"$dir/comm" || continue
    [ "$name" = "$comm" ] || continue
    mapfile -d '' args 2>/dev/null <"$dir/cmdline" || continue
    [[ " ${args[*]} " == *" $marker "* ]] && echo "$pid"
  done
  return 0
}

# True when pid $1 is alive, is named $2 and carries marker $3: a recycled pid from a pid file is never a match.
pid_is_ours() {
  local pid=$1 comm=$2 marker=$3 name args
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  read -r name 2>/dev/null <"/proc/$pid/comm" || return 1
  [ "$name" = "$comm" ] || return 1
  mapfile -d '' args 2>/dev/null <"/proc/$pid/cmdline" || return 1
  [[ " ${args[*]} " == *" $marker "* ]]
}

# Sends signal $2 to pid $1, waits up to $3 seconds for it to exit, then kills it outright.
stop_pid() {
  local pid=$1 signal=$2 grace=$3 waited=0
  kill "-$signal" "$pid" 2>/dev/null || return 0
  while [ -d "/proc/$pid" ] && [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    if [ "$waited" -ge $((grace * 10)) ]; then
      say "pid $pid ignored SIG$signal for ${grace}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# Stops the process in pid file $1 and every other process named $2 carrying marker $3 (strays from aborted runs).
stop_ours() {
  local pidfile=$1 comm=$2 marker=$3 signal=$4 grace=$5 pid
  if [ -f "$pidfile" ]; then
    pid=$(<"$pidfile")
    if pid_is_ours "$pid" "$comm" "$marker"; then
      stop_pid "$pid" "$signal" "$grace"
    fi
    rm -f "$pidfile"
  fi
  for pid in $(pids_matching "$comm" "$marker"); do
    say "stopping stray $comm (pid $pid) left by an earlier run"
    stop_pid "$pid" "$signal" "$grace"
  done
}

# Starts "$@" detached in its own session (so a Ctrl-C in the calling terminal does not reach it and only `stop`
# ends it), with stdin from /dev/null, output appended to log $2, and its pid written to pid file $1. The pid is
# written by the process itself before it execs, so it is the server's own pid even when setsid has to fork.
spawn_detached() {
  local pidfile=$1 log=$2
  shift 2
  rm -f "$pidfile"
  # fd 9 holds services.sh's lock; the server must not inherit it or the lock would outlive this script.
  # shellcheck disable=SC2016 # $$ and "$@" are meant for the inner bash.
  setsid --fork bash -c 'cd / && echo $$ >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 9>&-
  local waited=0
  while [ ! -s "$pidfile" ]; do
    [ "$waited" -lt 50 ] || die "process for $pidfile did not start (see $log)"
    sleep 0.1
    waited=$((waited + 1))
  done
}

log_tail() {
  local log=$1
  if [ -f "$log" ]; then
    printf -- '--- last lines of %s ---\n' "$log" >&2
    tail -n "${2:-30}" "$log" >&2
    printf -- '---\n' >&2
  fi
}

# Writes an env fragment: `export NAME='value'` per NAME=value argument, readable by the owner only (it holds the
# database password).
write_env_fragment() {
  local file=$1 pair
  shift
  (
    umask 077
    : >"$file.tmp"
    for pair in "$@"; do
      printf "export %s='%s'\n" "${pair%%=*}" "${pair#*=}" >>"$file.tmp"
    done
    mv "$file.tmp" "$file"
  )
}

# Installs the Debian packages the tests and services need when one is missing; a cheap check when all are there.
ensure_debian_packages() {
  local missing=() pkg
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v wg-quick >/dev/null || missing+=(wireguard-tools)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  command -v make >/dev/null || missing+=(make)
  # promtool (rule checks and unit tests) and the server a test scrapes the control plane with.
  command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
  command -v setsid >/dev/null && command -v setpriv >/dev/null && command -v flock >/dev/null || missing+=(util-linux)
  python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    die "missing Debian packages: ${missing[*]}; install them (as root: apt-get install ${missing[*]}) and rerun"
  fi
  say "installing missing Debian packages: ${missing[*]}"
  local start=$EPOCHREALTIME
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  for pkg in "${missing[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || die "apt-get did not install $pkg"
  done
  say "installed ${missing[*]} in $(elapsed_since "$start")s"
}
