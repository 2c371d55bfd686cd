#!/usr/bin/env bash
# Starts, stops and reports the real services the tests run against — PostgreSQL, Redis, a single-node Apache
# Kafka (KRaft) and an MLflow tracking server — all on 127.0.0.1 at free ports, with state and logs under
# var/services/ of this checkout.
#
#   scripts/services.sh start      install missing Debian packages, start every service, write var/services/env.sh
#   scripts/services.sh stop       stop every service (idempotent; also after a partial or aborted start)
#   scripts/services.sh status     say which services run, where, and which version
#   scripts/services.sh packages   only install missing Debian packages
#   scripts/services.sh restart S  stop service S (postgres or kafka) and start it again on the same port with the
#                                  same data, as a crashed server comes back (the fault-injection suite, tests/faults)
#
# FEDNESTED_SERVICES_STATE moves the state directory (default var/services): a second, private set of services
# (other ports, other data) that a test may restart without disturbing anyone using the shared ones.
#
# Each service is a module scripts/services/<name>.sh defining <name>_start, <name>_stop and <name>_status, and
# optionally <name>_prepare (checks and downloads, run for all services before any starts); <name>_start leaves
# var/services/<name>/{env,port,version}. Adding one (HAProxy in front of the control plane,
# say) means adding a module and its name to SERVICES. See docs/operations/services.md.
set -euo pipefail
shopt -s inherit_errexit
# $EPOCHREALTIME and awk must agree on the decimal point for the timings.
export LC_NUMERIC=C

SERVICES_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVICES_LIB="$SERVICES_ROOT/scripts/services"
SERVICES_STATE="${FEDNESTED_SERVICES_STATE:-$SERVICES_ROOT/var/services}"
SERVICES_ENV="$SERVICES_STATE/env.sh"
# Start order; stop runs in reverse. A private set (FEDNESTED_SERVICES_STATE: the fault suite's, which restarts its
# PostgreSQL and Kafka) has no MLflow server: nothing there talks to one, and it takes seconds and 600 MB to run.
SERVICES=(postgres redis kafka mlflow)
[ -z "${FEDNESTED_SERVICES_STATE:-}" ] || SERVICES=(postgres redis kafka)

# shellcheck source=scripts/services/lib.sh
source "$SERVICES_LIB/lib.sh"
for service in "${SERVICES[@]}"; do
  # shellcheck source=/dev/null
  source "$SERVICES_LIB/$service.sh"
done

# One services.sh at a time per checkout: a `stop` from a trap must not interleave with a `start` elsewhere.
lock_state() {
  mkdir -p "$SERVICES_STATE"
  exec 9>"$SERVICES_STATE/.lock"
  flock -w 300 9 || die "another scripts/services.sh has held $SERVICES_STATE/.lock for 5 minutes"
}

write_env() {
  local service versions=()
  for service in "${SERVICES[@]}"; do
    versions+=("$service=$(<"$SERVICES_STATE/$service/version")")
  done
  (
    umask 077
    {
      echo "# Written by scripts/services.sh start on $(date -u +%Y-%m-%dT%H:%M:%SZ); removed by stop."
      echo "# Source it to run a test by hand against the running services."
      for service in "${SERVICES[@]}"; do
        cat "$SERVICES_STATE/$service/env"
      done
      # Tests that need a service fail instead of skipping while this is set.
      echo "export FEDNESTED_REQUIRE_SERVICES='1'"
      echo "export FEDNESTED_SERVICES_VERSIONS='${versions[*]}'"
      echo "export FEDNESTED_SERVICES_DIR='$SERVICES_STATE'"
      # A deployment-like control plane (a database server) has no generated key: one per services start.
      echo "export SECRET_KEY='$(head -c 48 /dev/urandom | base64 | tr -d '\n/+=')'"
    } >"$SERVICES_ENV.tmp"
    mv "$SERVICES_ENV.tmp" "$SERVICES_ENV"
  )
}

cmd_start() {
  local service start total_start=$EPOCHREALTIME
  lock_state
  ensure_debian_packages
  rm -f "$SERVICES_ENV"
  for service in "${SERVICES[@]}"; do
    if declare -F "${service}_prepare" >/dev/null; then
      "${service}_prepare"
    fi
  done
  for service in "${SERVICES[@]}"; do
    start=$EPOCHREALTIME
    if "${service}_status"; then
      say "$service $(<"$SERVICES_STATE/$service/version") already running on 127.0.0.1:$(<"$SERVICES_STATE/$service/port")"
      continue
    fi
    "${service}_start"
    say "$service $(<"$SERVICES_STATE/$service/version") on 127.0.0.1:$(<"$SERVICES_STATE/$service/port")" \
      "started in $(elapsed_since "$start")s (log: $SERVICES_STATE/$service/)"
  done
  write_env
  say "all services up in $(elapsed_since "$total_start")s; environment in $SERVICES_ENV"
}

cmd_stop() {
  local i service start=$EPOCHREALTIME
  lock_state
  rm -f "$SERVICES_ENV"
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    service=${SERVICES[i]}
    "${service}_stop"
  done
  say "all services stopped in $(elapsed_since "$start")s (logs kept in $SERVICES_STATE)"
}

cmd_restart() {
  local service=${1:-} start=$EPOCHREALTIME
  [ -n "$service" ] || die "usage: $0 restart postgres|kafka"
  declare -F "${service}_restart" >/dev/null || die "no restart for '$service' (services with one: postgres, kafka)"
  lock_state
  "${service}_status" || die "$service is not running under $SERVICES_STATE; start the services first"
  "${service}_restart"
  say "$service restarted on 127.0.0.1:$(<"$SERVICES_STATE/$service/port") in $(elapsed_since "$start")s"
}

cmd_status() {
  local service down=0
  for service in "${SERVICES[@]}"; do
    if "${service}_status"; then
      printf '%-9s running  127.0.0.1:%s  version %s\n' "$service" \
        "$(<"$SERVICES_STATE/$service/port")" "$(<"$SERVICES_STATE/$service/version")"
    else
      printf '%-9s stopped\n' "$service"
      down=1
    fi
  done
  return "$down"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  packages) ensure_debian_packages ;;
  restart) cmd_restart "${2:-}" ;;
  *)
    echo "usage: $0 start|stop|status|packages|restart <service>" >&2
    exit 2
    ;;
esac
