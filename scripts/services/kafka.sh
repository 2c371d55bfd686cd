# shellcheck shell=bash
# Apache Kafka for the tests: one KRaft node (broker and controller in one JVM) on 127.0.0.1, from jars that Maven
# fetches into the cache and that are checked against scripts/services/kafka/jars.sha256 before every start.
# Two client listeners: PLAINTEXT, which the test suite uses, and SSL with client certificates from the services' CA
# (var/services/ca), where the federation's ACLs (fednested/messaging/acls.py) decide what each certificate may do.
# Sourced by scripts/services.sh; defines kafka_prepare, kafka_start, kafka_stop, kafka_status.

kafka_pinned_version() {
  local version
  version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$SERVICES_LIB/kafka/pom.xml")
  [ -n "$version" ] || die "no <kafka.version> in $SERVICES_LIB/kafka/pom.xml"
  echo "$version"
}

# Outside the checkout, so every clone on a machine shares one fetch. FEDNESTED_KAFKA_CACHE moves only this cache
# (FEDNESTED_CACHE moves the virtualenv too).
kafka_cache_dir() {
  echo "${FEDNESTED_KAFKA_CACHE:-${FEDNESTED_CACHE:-$HOME/.cache/fednested}}/kafka-$1"
}

# Checks that directory $1 holds exactly the jars of the lock file, each with its locked sha256; dies naming every
# jar that is missing, extra or different.
kafka_verify_jars() {
  local jars=$1 version=$2 lock="$SERVICES_LIB/kafka/jars.sha256" locked_version sum name path
  local -A locked=()
  local problems=()
  [ -f "$lock" ] || die "no lock file $lock; create it with scripts/services/kafka/lock.sh"
  locked_version=$(sed -n 's/^# kafka.version=//p' "$lock")
  [ "$locked_version" = "$version" ] \
    || die "$lock pins Kafka $locked_version but pom.xml asks for $version; run scripts/services/kafka/lock.sh"
  while read -r sum name; do
    if [ -z "$sum" ] || [ "${sum:0:1}" = "#" ]; then continue; fi
    locked[$name]=$sum
  done <"$lock"
  for name in "${!locked[@]}"; do
    [ -f "$jars/$name" ] || problems+=("$name: missing")
  done
  if compgen -G "$jars/*.jar" >/dev/null; then
    while read -r sum path; do
      name=${path##*/}
      if [ -z "${locked[$name]:-}" ]; then
        problems+=("$name: not in the lock file")
      elif [ "$sum" != "${locked[$name]}" ]; then
        problems+=("$name: sha256 $sum, locked ${locked[$name]}")
      fi
    done < <(sha256sum "$jars"/*.jar)
  fi
  [ "${#problems[@]}" -eq 0 ] && return 0
  printf 'services: error: Kafka jars in %s do not match %s:\n' "$jars" "$lock" >&2
  printf '  %s\n' "${problems[@]}" >&2
  die "refusing to run unverified jars. If pom.xml is unchanged, delete $jars to fetch them again; if you changed \
pom.xml on purpose, regenerate the lock file with scripts/services/kafka/lock.sh and review its diff"
}

# Copies kafka_2.13 and its runtime dependencies into directory $1 with Maven, failing on any checksum mismatch
# between the repository and what was downloaded.
kafka_maven_fetch() {
  local dest=$1 log=$2
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka jars; apt-get install maven"
  mvn -B -q -C -Dstyle.color=never -f "$SERVICES_LIB/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dest" >"$log" 2>&1 \
    || { log_tail "$log"; die "Maven could not fetch the Kafka jars (log: $log)"; }
}

# Prints the directory of verified jars for Kafka $1, fetching them on first use. A fetch goes to a scratch
# directory that becomes the cache entry only once verified, so an interrupted or rejected fetch leaves no half
# cache behind.
kafka_jars() {
  local version=$1 cache dest scratch start
  cache=$(kafka_cache_dir "$version")
  dest="$cache/jars"
  if [ ! -d "$dest" ]; then
    start=$EPOCHREALTIME
    mkdir -p "$cache"
    scratch=$(mktemp -d "$cache/jars.fetching.XXXXXX")
    say "kafka: fetching the jars of Kafka $version into $cache"
    kafka_maven_fetch "$scratch" "$cache/fetch.log"
    if ! (kafka_verify_jars "$scratch" "$version"); then
      rm -rf "$cache/jars.rejected"
      mv "$scratch" "$cache/jars.rejected"
      die "kafka: the fetched jars were kept for inspection in $cache/jars.rejected"
    fi
    # Another checkout may have finished the same fetch meanwhile; its verified copy is as good as ours.
    mv -T "$scratch" "$dest" 2>/dev/null || rm -rf "$scratch"
    say "kafka: fetched and verified $(compgen -G "$dest/*.jar" | wc -l) jars in $(elapsed_since "$start")s"
  fi
  kafka_verify_jars "$dest" "$version"
  echo "$dest"
}

kafka_java() {
  local java="${JAVA_HOME:+$JAVA_HOME/bin/}java" major
  command -v "$java" >/dev/null || die "Java 17 or newer is needed for Kafka; apt-get install openjdk-17-jre-headless"
  major=$("$java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  [ "${major%%.*}" -ge 17 ] 2>/dev/null || die "Kafka 4 needs Java 17 or newer; $java is Java ${major:-unknown}"
  echo "$java"
}

kafka_status() {
  local dir="$SERVICES_STATE/kafka" port
  [ -f "$dir/env" ] && [ -f "$dir/port" ] && [ -f "$dir/version" ] || return 1
  # A broker started before the SSL listener existed counts as stopped, so `start` replaces it with one that has it.
  grep -q FEDNESTED_KAFKA_SSL_BOOTSTRAP "$dir/env" || return 1
  pid_is_ours "$(cat "$dir/pid" 2>/dev/null)" java "$dir/server.properties" || return 1
  port=$(<"$dir/port")
  # Whether the listener accepts a connection; bash's /dev/tcp needs no client tool.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

kafka_stop() {
  local dir="$SERVICES_STATE/kafka"
  # SIGTERM runs the broker's controlled shutdown; the data is thrown away, so a kill after the grace is harmless.
  stop_ours "$dir/pid" java "$dir/server.properties" TERM 20
  rm -rf "$dir/data"
  rm -f "$dir/env" "$dir/port" "$dir/version"
}

# Everything that can fail before a server runs: jars fetched and verified, Java found, the probe's Python ready.
# Run for every service before any starts, so a rejected jar does not cost a PostgreSQL start and stop.
kafka_prepare() {
  KAFKA_VERSION=$(kafka_pinned_version)
  KAFKA_JARS=$(kafka_jars "$KAFKA_VERSION")
  KAFKA_JAVA=$(kafka_java)
  # Resolved before the broker starts, so a first-time virtualenv build does not eat into the start-up timeout.
  KAFKA_PYTHON="$("$SERVICES_ROOT/scripts/venv.sh" dev)/bin/python"
}

kafka_start() {
  local dir="$SERVICES_STATE/kafka" attempt started
  mkdir -p "$dir"
  # The CA is made once per services directory; the broker's and the control plane's certificates are issued on every
  # start, so they never expire under a long-lived checkout.
  KAFKA_TLS_PROPERTIES=$(PYTHONPATH="$SERVICES_ROOT" "$KAFKA_PYTHON" "$SERVICES_LIB/kafka/tls.py" \
    --ca-dir "$SERVICES_STATE/ca" --out "$dir/tls") || die "kafka: could not issue the broker's TLS certificates"
  for attempt in 1 2 3; do
    kafka_start_once "$dir" "$KAFKA_JARS" "$KAFKA_JAVA" "$KAFKA_PYTHON"
    [ "$PORT_TAKEN" -eq 1 ] || break
    say "kafka: a port was taken before the broker bound it; retrying with others ($attempt/3)"
  done
  [ "$PORT_TAKEN" -eq 0 ] || die "kafka: could not bind free ports in 3 attempts (see $dir/server.log)"
  started=$(sed -n 's/.*Kafka version: \([^ ]*\) .*/\1/p' "$dir/server.log" | tail -n 1)
  [ "$started" = "$KAFKA_VERSION" ] \
    || die "kafka: the broker reports version '${started}', expected $KAFKA_VERSION ($dir/server.log)"
  echo "$KAFKA_VERSION" >"$dir/version"
}

# The JVM's options for the broker with state directory $1, NUL-separated.
kafka_jvm_opts() {
  local dir=$1 opts=()
  # shellcheck disable=SC2206 # FEDNESTED_KAFKA_HEAP is a list of JVM options on purpose.
  opts=(${FEDNESTED_KAFKA_HEAP:--Xmx512m -Xms64m})
  # C1 only and no perf-data file: the broker starts in a few seconds on a busy 2-core machine and its load in
  # tests is tiny, so the optimizing compiler would cost more than it saves.
  opts+=(-XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -XX:TieredStopAtLevel=1 -XX:-UsePerfData
    -Djava.awt.headless=true -Dkafka.logs.dir="$dir" -Dlog4j2.configurationFile="$SERVICES_LIB/kafka/log4j2.properties")
  printf '%s\0' "${opts[@]}"
}

# Starts the broker of state directory $1 (its server.properties and data as they are) and waits for it to say it
# started; sets PORT_TAKEN=1 when a port was taken in the meantime.
kafka_spawn() {
  local dir=$1 jars=$2 java=$3 jvm_opts=() waited=0 timeout=${FEDNESTED_SERVICES_TIMEOUT:-90}
  PORT_TAKEN=0
  mapfile -d '' jvm_opts < <(kafka_jvm_opts "$dir")
  : >"$dir/server.log"
  spawn_detached "$dir/pid" "$dir/stdout.log" "$java" "${jvm_opts[@]}" -cp "$jars/*" kafka.Kafka "$dir/server.properties"
  until grep -q 'Kafka Server started' "$dir/server.log"; do
    if ! pid_is_ours "$(<"$dir/pid")" java "$dir/server.properties"; then
      if grep -q 'Address already in use' "$dir/server.log" "$dir/stdout.log"; then
        PORT_TAKEN=1
        return 0
      fi
      log_tail "$dir/server.log"
      log_tail "$dir/stdout.log" 10
      die "kafka exited during start-up (logs: $dir/server.log, $dir/stdout.log)"
    fi
    if [ "$waited" -ge $((timeout * 10)) ]; then
      log_tail "$dir/server.log"
      die "kafka did not start within ${timeout}s (log: $dir/server.log)"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# The broker stopped (controlled shutdown) and started again with the same ports, storage and topics, as a broker
# comes back after a restart: clients reconnect, committed offsets and unread records are still there.
kafka_restart() {
  local dir="$SERVICES_STATE/kafka"
  kafka_prepare
  stop_ours "$dir/pid" java "$dir/server.properties" TERM 20
  : >"$dir/stdout.log"
  kafka_spawn "$dir" "$KAFKA_JARS" "$KAFKA_JAVA"
  [ "$PORT_TAKEN" -eq 0 ] || die "kafka: a port of $dir/server.properties was taken while the broker was down"
}

# Sets PORT_TAKEN=1 when a chosen port was taken in the meantime (see postgres_start_once).
kafka_start_once() {
  local dir=$1 jars=$2 java=$3 python=$4 ports port ssl_port controller_port cluster_id
  local jvm_opts=()
  PORT_TAKEN=0
  kafka_stop
  mapfile -t ports < <(free_ports 3)
  port=${ports[0]}
  ssl_port=${ports[1]}
  controller_port=${ports[2]}
  # An id that starts with '-' would be read as an option by kafka-storage (about 1 start in 64 failed that way);
  # Kafka's own Uuid.randomUuid() draws again in that case, and so does this.
  cluster_id=$(python3 -c '
import base64, uuid
while True:
    text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not text.startswith("-"):
        print(text)
        break
')
  mapfile -d '' jvm_opts < <(kafka_jvm_opts "$dir")
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
# Written by scripts/services.sh for the tests; regenerated on every start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,SSL://127.0.0.1:$ssl_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SSL://127.0.0.1:$ssl_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SSL:SSL,CONTROLLER:PLAINTEXT
# ACLs (KRaft's authorizer). Clients on the SSL listener are the principals their certificates map to
# (ssl.principal.mapping.rules below) and may do only what fednested/messaging/acls.py grants them.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
# TEST BROKER ONLY: every PLAINTEXT connection (the controller's, the broker's own, and the test suite's) is
# User:ANONYMOUS, a super user, so the suite's tests and the ACL setup need no certificate. A production broker has
# no PLAINTEXT listener: its inter-broker and controller listeners use TLS too, with the brokers' own principals as
# super users.
super.users=User:ANONYMOUS
$KAFKA_TLS_PROPERTIES
log.dirs=$dir/data
# Topics are created by the project's bootstrap-topics command, never by a stray produce or fetch.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# A consumer group in a test should not wait three seconds for members that will never come.
group.initial.rebalance.delay.ms=0
log.segment.bytes=1048576
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
  : >"$dir/server.log"
  : >"$dir/stdout.log"
  "$java" "${jvm_opts[@]}" -cp "$jars/*" kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$dir/server.properties" --standalone >>"$dir/stdout.log" 2>&1 \
    || { log_tail "$dir/stdout.log"; die "kafka: formatting the storage in $dir/data failed"; }
  kafka_spawn "$dir" "$jars" "$java"
  [ "$PORT_TAKEN" -eq 0 ] || return 0
  "$python" "$SERVICES_LIB/kafka/probe.py" --bootstrap "127.0.0.1:$port" --cluster-id "$cluster_id" \
    --pid "$(<"$dir/pid")" --timeout 30 >>"$dir/stdout.log" \
    || { log_tail "$dir/server.log"; die "kafka started but does not answer metadata requests (log: $dir/server.log)"; }
  # Over PLAINTEXT, as the super user; the same command an operator runs against a production broker.
  PYTHONPATH="$SERVICES_ROOT" "$python" -m fednested messaging apply-acls --bootstrap "127.0.0.1:$port" \
    >>"$dir/stdout.log" 2>&1 \
    || { log_tail "$dir/stdout.log"; die "kafka: applying the federation's ACLs failed (log: $dir/stdout.log)"; }
  echo "$port" >"$dir/port"
  # FEDNESTED_BUS=kafka: with the services up, the control plane's event bus is this broker (controlplane/settings.py).
  # The suite's clients use PLAINTEXT; the FEDNESTED_KAFKA_SSL_* and CA variables are for tests of the SSL listener
  # (tests/fednested/messaging/test_kafka_acls.py) and for pointing a control plane at it by hand.
  write_env_fragment "$dir/env" "FEDNESTED_BUS=kafka" "FEDNESTED_KAFKA_BOOTSTRAP=127.0.0.1:$port" \
    "FEDNESTED_KAFKA_CLUSTER_ID=$cluster_id" "FEDNESTED_KAFKA_SSL_BOOTSTRAP=127.0.0.1:$ssl_port" \
    "FEDNESTED_SERVICES_CA_DIR=$SERVICES_STATE/ca" \
    "FEDNESTED_KAFKA_CONTROLPLANE_CERT=$dir/tls/fednested-controlplane.crt" \
    "FEDNESTED_KAFKA_CONTROLPLANE_KEY=$dir/tls/fednested-controlplane.key"
}
