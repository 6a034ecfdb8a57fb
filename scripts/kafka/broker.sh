#!/usr/bin/env bash
# A local single-node Apache Kafka broker (KRaft, combined broker+controller) run
# from Maven Central jars on the machine's Java 17: no Docker needed.
#
#   scripts/kafka/broker.sh start     fetch the jars if missing, format a fresh data
#                                     dir, start the broker, wait until it answers
#   scripts/kafka/broker.sh stop      stop it and delete its data dir
#   scripts/kafka/broker.sh status    exit 0 if it runs and answers, 3 if not running
#   scripts/kafka/broker.sh address   print its bootstrap address (host:port)
#   scripts/kafka/broker.sh pid       print its process id (the load generator's --broker-pid)
#   scripts/kafka/broker.sh fetch     only fetch the jars into the cache
#   scripts/kafka/broker.sh crash     SIGKILL the broker, keeping its data dir and ports
#   scripts/kafka/broker.sh resume    start the crashed broker again on the same data
#                                     dir and address, wait until it answers
#
# A secured broker (SAGA_KAFKA_SECURITY=sasl at start) takes these as well:
#   scripts/kafka/broker.sh admin-config       print the path of the admin's client
#                                              properties (Kafka's Java tools)
#   scripts/kafka/broker.sh users NAME=PW ...  create/update SCRAM-SHA-512 users;
#                                              returns once they can log in
#   scripts/kafka/broker.sh acls add FILE      create the ACL bindings of FILE ("-":
#                                              stdin); returns once they apply
#   scripts/kafka/broker.sh acls remove FILE   delete exactly those bindings
#   scripts/kafka/broker.sh acls list          print all bindings, sorted, as FILE lines
# FILE has one binding a line ('#' comments and blank lines are ignored):
#   <principal> <ALLOW|DENY> <operation> <resource-type> <pattern-type> <resource-name>
#   User:inventory ALLOW READ TOPIC LITERAL inventory.requests
#   User:order ALLOW WRITE TRANSACTIONAL_ID PREFIXED ecommerce-order-
#   User:order ALLOW IDEMPOTENT_WRITE CLUSTER LITERAL kafka-cluster
# (names of Kafka's AclOperation, ResourceType, PatternType; host always *).
# Each of these runs scripts/kafka/SecurityAdmin.java: one JVM, ~1.5-2 s.
#
# crash and resume are for fault tests (a broker that dies and comes back);
# give such a test a broker of its own with SAGA_KAFKA_STATE_DIR, so no other
# test sees the outage.
#
# Use it by hand:
#   scripts/kafka/broker.sh start
#   export KAFKA_BOOTSTRAP_SERVERS="$(scripts/kafka/broker.sh address)"
#   cargo test --workspace --all-features -- --include-ignored
#   scripts/kafka/broker.sh stop
#
# Environment (all optional):
#   SAGA_CACHE_DIR              jar cache root (default: ${XDG_CACHE_HOME:-~/.cache}/saga-rs);
#                               jars live in $SAGA_CACHE_DIR/kafka-<version>/libs
#   SAGA_KAFKA_STATE_DIR        pid/address/data-dir records (default: <repo>/.cache/kafka-broker)
#   SAGA_KAFKA_READY_TIMEOUT    seconds to wait for the broker to answer (default: 90)
#   SAGA_KAFKA_HEAP_OPTS        broker JVM heap (default: -Xms256m -Xmx768m)
#   SAGA_KAFKA_KEEP_DATA=1      keep the data dir (and its broker.log) on stop
#   SAGA_KAFKA_SECURITY         plaintext (default) or sasl, read by start: sasl makes
#                               the client listener SASL_PLAINTEXT with SCRAM-SHA-512,
#                               authorizes with ACLs (deny by default) and creates a
#                               super user "admin" with a fresh random password
#
# Secured broker, for a test that connects as a user (after `users` and `acls`):
#   bootstrap.servers=$(broker.sh address)   security.protocol=SASL_PLAINTEXT
#   sasl.mechanism=SCRAM-SHA-512   sasl.username=NAME   sasl.password=PW
# $SAGA_KAFKA_STATE_DIR/broker.env (mode 600) records security=sasl,
# admin_user, admin_password and admin_config (the admin's properties file).
#
# Readiness is decided by asking the broker: kafka_probe.py sends ApiVersions and
# a Metadata request over the Kafka protocol and requires the answer to list this
# broker and an active controller (on a secured broker it first logs in as the
# admin with SCRAM-SHA-512). The broker's log is only read to report a failure.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
POM="$SCRIPT_DIR/pom.xml"
PROBE="$SCRIPT_DIR/kafka_probe.py"
SECURITY_ADMIN="$SCRIPT_DIR/SecurityAdmin.java"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
[[ -n "$KAFKA_VERSION" ]] || { echo "broker.sh: cannot read <kafka.version> from $POM" >&2; exit 1; }
CACHE_ROOT="${SAGA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/saga-rs}"
KAFKA_HOME_CACHE="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIBS_DIR="$KAFKA_HOME_CACHE/libs"
STATE_DIR="${SAGA_KAFKA_STATE_DIR:-$REPO_ROOT/.cache/kafka-broker}"
STATE_FILE="$STATE_DIR/broker.env"
ADMIN_CONFIG_FILE="$STATE_DIR/admin.properties"
REQUESTED_SECURITY="${SAGA_KAFKA_SECURITY:-plaintext}"
case "$REQUESTED_SECURITY" in
  plaintext | sasl) ;;
  *) echo "[broker.sh] ERROR: SAGA_KAFKA_SECURITY must be plaintext or sasl, not '$REQUESTED_SECURITY'" >&2; exit 2 ;;
esac
# The super user of a secured broker; its password is made afresh at each start.
ADMIN_USER="admin"
READY_TIMEOUT="${SAGA_KAFKA_READY_TIMEOUT:-90}"
STOP_TIMEOUT=30
HEAP_OPTS="${SAGA_KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
# Short-lived tool JVMs (storage format): start fast, stay small.
TOOL_JVM_OPTS=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)
DATA_PREFIX="saga-kafka."

log() { echo "[broker.sh] $*" >&2; }
die() { echo "[broker.sh] ERROR: $*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH ($2)"
}

now() { date +%s; }

pom_digest() { sha256sum "$POM" | cut -d' ' -f1; }

# Fetch the jars into $LIBS_DIR unless a complete copy made from this very pom is
# there already. The copy is made in a temp dir and renamed, so an interrupted
# fetch never leaves a half-filled libs dir behind.
ensure_libs() {
  local digest stamp="$LIBS_DIR/.complete"
  digest="$(pom_digest)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
    return 0
  fi
  need mvn "Maven 3 fetches the Kafka jars from Maven Central"
  need java "Java 17+ runs the broker"
  mkdir -p "$KAFKA_HOME_CACHE"
  local lock="$KAFKA_HOME_CACHE/.fetch.lock"
  exec 9>"$lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  # Another process may have completed the fetch while we waited for the lock.
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
    exec 9>&-
    return 0
  fi
  local t0 tmp mvn_log
  t0="$(now)"
  tmp="$(mktemp -d "$KAFKA_HOME_CACHE/libs.tmp.XXXXXX")"
  mvn_log="$tmp.mvn.log"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS_DIR (once; cached)"
  if ! mvn -B -q -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime >"$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2 || true
    rm -rf "$tmp" "$mvn_log"
    exec 9>&-
    die "mvn dependency:copy-dependencies failed (see above)"
  fi
  rm -f "$mvn_log"
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || { rm -rf "$tmp"; exec 9>&-; die "no kafka_2.13 jar was fetched"; }
  echo "$digest" >"$tmp/.complete"
  rm -rf "$LIBS_DIR"
  mv "$tmp" "$LIBS_DIR"
  exec 9>&-
  log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars in $(( $(now) - t0 ))s"
}

# --- state -------------------------------------------------------------------

BROKER_PID="" BOOTSTRAP="" DATA_DIR="" SECURITY="plaintext" ADMIN_PASSWORD=""

load_state() {
  BROKER_PID="" BOOTSTRAP="" DATA_DIR="" SECURITY="plaintext" ADMIN_PASSWORD=""
  [[ -f "$STATE_FILE" ]] || return 1
  local key value
  while IFS='=' read -r key value; do
    case "$key" in
      pid) BROKER_PID="$value" ;;
      bootstrap) BOOTSTRAP="$value" ;;
      data_dir) DATA_DIR="$value" ;;
      security) SECURITY="$value" ;;
      admin_password) ADMIN_PASSWORD="$value" ;;
    esac
  done <"$STATE_FILE"
  return 0
}

# broker.env: written with mode 600, since a secured broker's admin password is in it.
save_state() {
  mkdir -p "$STATE_DIR"
  (
    umask 077
    printf 'pid=%s\nbootstrap=%s\ndata_dir=%s\nsecurity=%s\n' \
      "$BROKER_PID" "$BOOTSTRAP" "$DATA_DIR" "$SECURITY" >"$STATE_FILE.tmp"
    if [[ "$SECURITY" == sasl ]]; then
      printf 'sasl_mechanism=SCRAM-SHA-512\nadmin_user=%s\nadmin_password=%s\nadmin_config=%s\n' \
        "$ADMIN_USER" "$ADMIN_PASSWORD" "$ADMIN_CONFIG_FILE" >>"$STATE_FILE.tmp"
    fi
  )
  mv "$STATE_FILE.tmp" "$STATE_FILE"
}

# The client properties of the admin (Kafka's Java tools: --command-config,
# --producer.config, ...; SecurityAdmin.java --config).
write_admin_config() {
  mkdir -p "$STATE_DIR"
  (
    umask 077
    cat >"$ADMIN_CONFIG_FILE.tmp" <<EOF
# The super user of the secured test broker at $BOOTSTRAP (written by broker.sh start).
bootstrap.servers=$BOOTSTRAP
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$ADMIN_USER" password="$ADMIN_PASSWORD";
EOF
  )
  mv "$ADMIN_CONFIG_FILE.tmp" "$ADMIN_CONFIG_FILE"
}

forget_state() { rm -f "$STATE_FILE" "$ADMIN_CONFIG_FILE"; }

# True if $1 is a live process that is our broker (not a recycled pid).
is_our_broker() {
  local pid="$1" data_dir="$2"
  [[ -n "$pid" && -n "$data_dir" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *kafka.Kafka* && "$cmdline" == *"$data_dir"* ]]
}

# On a secured broker the probe authenticates as the admin (credentials through
# the environment, not the command line).
probe() {
  if [[ "$SECURITY" == sasl ]]; then
    KAFKA_PROBE_SASL_USERNAME="$ADMIN_USER" KAFKA_PROBE_SASL_PASSWORD="$ADMIN_PASSWORD" \
      python3 "$PROBE" ready "$1"
  else
    python3 "$PROBE" ready "$1"
  fi
}
probe_ready() { probe "$1" 2>/dev/null; }

remove_data_dir() {
  local dir="$1"
  # Only ever delete a dir this script made.
  if [[ -n "$dir" && "$(basename "$dir")" == "$DATA_PREFIX"* && -d "$dir" ]]; then
    if [[ "${SAGA_KAFKA_KEEP_DATA:-0}" == "1" ]]; then
      log "keeping data dir $dir (SAGA_KAFKA_KEEP_DATA=1)"
    else
      rm -rf "$dir"
    fi
  fi
}

# Stop the process $1 (our broker): SIGTERM (controlled shutdown), then SIGKILL.
kill_broker() {
  local pid="$1" data_dir="$2" waited=0
  is_our_broker "$pid" "$data_dir" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while is_our_broker "$pid" "$data_dir"; do
    if (( waited >= STOP_TIMEOUT * 10 )); then
      log "broker (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

print_log_tail() {
  local file="$1"
  if [[ -f "$file" ]]; then
    echo "----- last 60 lines of the broker log ($file) -----" >&2
    tail -n 60 "$file" >&2 || true
    echo "----- end of broker log -----" >&2
  fi
}

# --- server config -------------------------------------------------------------

# The listeners of a plaintext broker: no authentication, no authorizer.
listener_config_plaintext() {
  local port="$1" cport="$2"
  cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
EOF
}

# The listeners of a secured broker (SAGA_KAFKA_SECURITY=sasl).
#
# Clients: SASL_PLAINTEXT with SCRAM-SHA-512 only. SASL_PLAINTEXT: TLS setup
# adds a keystore step; the auth/authorization paths are the same (SCRAM
# authenticates, the principal User:<name> goes through the same authorizer).
#
# Authorization: StandardAuthorizer, deny by default (no ACL = no access), one
# super user, User:admin. Every connection of the broker to itself runs as
# that super user, so nothing unauthenticated ever gets super-user rights:
#   - inter-broker traffic (on one node: the transaction coordinator's
#     WriteTxnMarkers to the partition leaders, i.e. to itself) uses the client
#     listener, SCRAM-SHA-512 as admin. Its SCRAM credentials are written into
#     the metadata log at format time, so they exist before the broker starts.
#   - the controller listener is SASL_PLAINTEXT too, but with mechanism PLAIN
#     and a static user table in its JAAS config: SCRAM credentials live in the
#     metadata log, which the controller path must not depend on to come up.
#     The broker authenticates there as admin with the same password.
# (The simpler alternative, a PLAINTEXT controller listener whose anonymous
# principal is a super user, would hand every local process that finds the
# port super-user rights, since a KRaft controller also serves admin requests.)
listener_config_sasl() {
  local port="$1" cport="$2" password="$3"
  cat <<EOF
listeners=SASL_PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=SASL_PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT

listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$ADMIN_USER" password="$password";

listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="$ADMIN_USER" password="$password" user_$ADMIN_USER="$password";

authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:$ADMIN_USER
EOF
}

write_config() {
  local dir="$1" port="$2" cport="$3"
  {
    cat <<EOF
# Written by scripts/kafka/broker.sh for a throwaway single-node test broker.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
EOF
    if [[ "$SECURITY" == sasl ]]; then
      listener_config_sasl "$port" "$cport" "$ADMIN_PASSWORD"
    else
      listener_config_plaintext "$port" "$cport"
    fi
    cat <<EOF
log.dirs=$dir/kraft-logs

# A single node: every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
# Fewer partitions for the internal topics: their first use (first consumer
# group, first transactional producer) is then faster; a test broker needs no more.
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3

group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
num.partitions=3
delete.topic.enable=true

# Small thread pools: the machine is shared with cargo builds.
num.network.threads=2
num.io.threads=4
background.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
EOF
  } >"$dir/server.properties"

  cat >"$dir/log4j2.properties" <<'EOF'
# Broker log: stdout, which broker.sh sends to broker.log in the data dir.
status = warn
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRefs = stdout
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF

  cat >"$dir/log4j2-tools.properties" <<'EOF'
# Client tools run by broker.sh (SecurityAdmin.java): errors only, on stderr;
# the tool prints its own message for the failures it expects.
status = warn
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ERROR
rootLogger.appenderRefs = stderr
rootLogger.appenderRef.stderr.ref = STDERR
EOF
}

# Start the broker of $DATA_DIR (its server.properties) in the background,
# appending to $1; records its pid.
launch() {
  local broker_log="$1"
  # setsid: the broker gets its own session, so a ctrl-c in the terminal reaches
  # the caller (whose trap runs `stop`), not the broker directly.
  # shellcheck disable=SC2086 # HEAP_OPTS is a list of JVM flags
  setsid java $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:MaxMetaspaceSize=256m -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties" \
    -Dkafka.logs.dir="$DATA_DIR" \
    -cp "$LIBS_DIR/*" kafka.Kafka "$DATA_DIR/server.properties" \
    </dev/null >>"$broker_log" 2>&1 &
  BROKER_PID=$!
  save_state
}

# One attempt: fresh data dir and ports, format, launch, wait. Returns 0 when
# ready, 2 when the broker died of a port clash (worth another try), 1 otherwise.
start_once() {
  local deadline="$1" ports port cport cluster_id
  mapfile -t ports < <(python3 "$PROBE" free-ports 2)
  port="${ports[0]}" cport="${ports[1]}"
  cluster_id="$(python3 "$PROBE" cluster-id)"
  DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/${DATA_PREFIX}XXXXXX")"
  BOOTSTRAP="127.0.0.1:$port"
  BROKER_PID=""
  SECURITY="$REQUESTED_SECURITY"
  ADMIN_PASSWORD=""
  local format_args=(format --standalone -t "$cluster_id" -c "$DATA_DIR/server.properties")
  if [[ "$SECURITY" == sasl ]]; then
    # Hex: no character that a JAAS config or --add-scram would need quoted.
    ADMIN_PASSWORD="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    # The admin's SCRAM credentials go into the bootstrap metadata, so the
    # broker can authenticate its own inter-broker connections from the start.
    format_args+=(--add-scram "SCRAM-SHA-512=[name=$ADMIN_USER,password=$ADMIN_PASSWORD]")
    write_admin_config
  fi
  write_config "$DATA_DIR" "$port" "$cport"
  local broker_log="$DATA_DIR/broker.log"

  if ! java "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties" \
      -cp "$LIBS_DIR/*" kafka.tools.StorageTool "${format_args[@]}" >"$DATA_DIR/format.log" 2>&1; then
    print_log_tail "$DATA_DIR/format.log"
    remove_data_dir "$DATA_DIR"
    forget_state
    return 1
  fi

  launch "$broker_log"

  while :; do
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
      if grep -q 'Address already in use' "$broker_log" 2>/dev/null; then
        log "port clash on $BOOTSTRAP or 127.0.0.1:$cport; retrying with other ports"
        remove_data_dir "$DATA_DIR"
        forget_state
        return 2
      fi
      echo "[broker.sh] ERROR: the Kafka broker exited before it was ready" >&2
      print_log_tail "$broker_log"
      remove_data_dir "$DATA_DIR"
      forget_state
      return 1
    fi
    if probe_ready "$BOOTSTRAP" >/dev/null; then
      return 0
    fi
    if (( $(now) >= deadline )); then
      echo "[broker.sh] ERROR: the Kafka broker at $BOOTSTRAP did not answer a metadata request within ${READY_TIMEOUT}s" >&2
      probe "$BOOTSTRAP" || true
      print_log_tail "$broker_log"
      kill_broker "$BROKER_PID" "$DATA_DIR"
      remove_data_dir "$DATA_DIR"
      forget_state
      return 1
    fi
    sleep 0.5
  done
}

announce() {
  echo "Kafka broker is ready at $BOOTSTRAP"
  if [[ "$SECURITY" == sasl ]]; then
    echo "security: SASL_PLAINTEXT, SCRAM-SHA-512; admin client config: $ADMIN_CONFIG_FILE"
  fi
  echo "export KAFKA_BOOTSTRAP_SERVERS=$BOOTSTRAP"
}

cmd_start() {
  need java "Java 17+ runs the broker"
  need python3 "it picks free ports and asks the broker for its metadata"
  need setsid "util-linux"
  if load_state; then
    if is_our_broker "$BROKER_PID" "$DATA_DIR"; then
      if [[ "$SECURITY" != "$REQUESTED_SECURITY" ]]; then
        die "a broker with security '$SECURITY' already runs for $STATE_DIR (pid $BROKER_PID); stop it first to start one with '$REQUESTED_SECURITY'"
      fi
      if probe_ready "$BOOTSTRAP" >/dev/null; then
        log "already running (pid $BROKER_PID, data dir $DATA_DIR)"
        announce
        return 0
      fi
      log "a broker from an earlier start (pid $BROKER_PID) does not answer; stopping it"
      kill_broker "$BROKER_PID" "$DATA_DIR"
    fi
    remove_data_dir "$DATA_DIR"
    forget_state
  fi

  ensure_libs

  local t0 deadline attempt rc
  t0="$(now)"
  deadline=$(( t0 + READY_TIMEOUT ))
  for attempt in 1 2 3; do
    rc=0
    start_once "$deadline" || rc=$?
    case "$rc" in
      0)
        log "pid $BROKER_PID, data dir $DATA_DIR, answered after $(( $(now) - t0 ))s"
        announce
        return 0
        ;;
      2) continue ;;
      *) exit 1 ;;
    esac
  done
  die "could not find free ports for the broker after $attempt tries"
}

cmd_stop() {
  if ! load_state; then
    log "no broker recorded in $STATE_DIR; nothing to stop"
    return 0
  fi
  if is_our_broker "$BROKER_PID" "$DATA_DIR"; then
    log "stopping Kafka broker (pid $BROKER_PID, $BOOTSTRAP)"
    kill_broker "$BROKER_PID" "$DATA_DIR"
  else
    log "broker (pid ${BROKER_PID:-?}) was not running"
  fi
  remove_data_dir "$DATA_DIR"
  forget_state
  log "stopped"
}

cmd_status() {
  if ! load_state || ! is_our_broker "$BROKER_PID" "$DATA_DIR"; then
    echo "Kafka broker is not running"
    return 3
  fi
  local info
  if info="$(probe_ready "$BOOTSTRAP")"; then
    echo "Kafka broker is running at $BOOTSTRAP (pid $BROKER_PID, data dir $DATA_DIR): $info"
    echo "export KAFKA_BOOTSTRAP_SERVERS=$BOOTSTRAP"
    return 0
  fi
  echo "Kafka broker (pid $BROKER_PID) is running but does not answer at $BOOTSTRAP"
  return 1
}

cmd_crash() {
  load_state && is_our_broker "$BROKER_PID" "$DATA_DIR" \
    || die "no running broker recorded in $STATE_DIR"
  log "killing the broker (pid $BROKER_PID) with SIGKILL; data dir kept"
  kill -KILL "$BROKER_PID" 2>/dev/null || true
  while is_our_broker "$BROKER_PID" "$DATA_DIR"; do sleep 0.1; done
}

cmd_resume() {
  load_state || die "no broker recorded in $STATE_DIR"
  if is_our_broker "$BROKER_PID" "$DATA_DIR"; then
    log "already running (pid $BROKER_PID)"
    return 0
  fi
  [[ -f "$DATA_DIR/server.properties" ]] || die "no data dir to resume from ($DATA_DIR)"
  local t0 deadline
  t0="$(now)"
  deadline=$(( t0 + READY_TIMEOUT ))
  launch "$DATA_DIR/broker.log"
  until probe_ready "$BOOTSTRAP" >/dev/null; do
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
      print_log_tail "$DATA_DIR/broker.log"
      die "the resumed broker exited"
    fi
    (( $(now) < deadline )) || die "the resumed broker did not answer within ${READY_TIMEOUT}s"
    sleep 0.5
  done
  log "resumed (pid $BROKER_PID) at $BOOTSTRAP after $(( $(now) - t0 ))s"
}

cmd_address() {
  if load_state && is_our_broker "$BROKER_PID" "$DATA_DIR"; then
    echo "$BOOTSTRAP"
    return 0
  fi
  die "no running broker recorded in $STATE_DIR (run: $0 start)"
}

cmd_pid() {
  if load_state && is_our_broker "$BROKER_PID" "$DATA_DIR"; then
    echo "$BROKER_PID"
    return 0
  fi
  die "no running broker recorded in $STATE_DIR (run: $0 start)"
}

# The running secured broker, or die.
need_secured_broker() {
  load_state && is_our_broker "$BROKER_PID" "$DATA_DIR" \
    || die "no running broker recorded in $STATE_DIR (run: SAGA_KAFKA_SECURITY=sasl $0 start)"
  [[ "$SECURITY" == sasl ]] \
    || die "the broker at $BOOTSTRAP runs without security (start it with SAGA_KAFKA_SECURITY=sasl)"
  [[ -f "$ADMIN_CONFIG_FILE" ]] || write_admin_config
}

cmd_admin_config() {
  need_secured_broker
  echo "$ADMIN_CONFIG_FILE"
}

# SecurityAdmin.java compiled once per version of its source (cached next to
# the jars): a run then takes ~1.7 s instead of ~3 s for a source launch, which
# compiles it every time. Prints the classes dir; fails if there is no javac.
security_admin_classes() {
  command -v javac >/dev/null 2>&1 || return 1
  local digest dir tmp
  digest="$(sha256sum "$SECURITY_ADMIN" | cut -c1-16)"
  dir="$KAFKA_HOME_CACHE/security-admin-$digest"
  if [[ ! -f "$dir/SecurityAdmin.class" ]]; then
    tmp="$(mktemp -d "$KAFKA_HOME_CACHE/security-admin.tmp.XXXXXX")"
    if ! javac -J-XX:+UseSerialGC -J-XX:TieredStopAtLevel=1 -nowarn -d "$tmp" \
        -cp "$LIBS_DIR/*" "$SECURITY_ADMIN" >&2; then
      rm -rf "$tmp"
      return 1
    fi
    # Another process may have put it there meanwhile; either copy is the same.
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
  fi
  echo "$dir"
}

# SecurityAdmin.java, run as the admin against the running secured broker.
security_admin() {
  need_secured_broker
  need java "Java 17+ runs SecurityAdmin.java"
  ensure_libs
  local classes main=("$SECURITY_ADMIN") cp="$LIBS_DIR/*"
  if classes="$(security_admin_classes)"; then
    main=(SecurityAdmin)
    cp="$classes:$cp"
  fi
  java "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$DATA_DIR/log4j2-tools.properties" \
    -cp "$cp" "${main[@]}" --bootstrap "$BOOTSTRAP" --config "$ADMIN_CONFIG_FILE" "$@"
}

cmd_users() {
  (( $# > 0 )) || die "usage: $0 users NAME=PASSWORD ..."
  security_admin users "$@"
}

cmd_acls() {
  case "${1:-}" in
    add | remove)
      (( $# == 2 )) || die "usage: $0 acls $1 FILE  (FILE: one binding a line, - for stdin)"
      security_admin acls "$1" "$2"
      ;;
    list)
      (( $# == 1 )) || die "usage: $0 acls list"
      security_admin acls list
      ;;
    *) die "usage: $0 acls add FILE | acls remove FILE | acls list" ;;
  esac
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  address) cmd_address ;;
  pid) cmd_pid ;;
  crash) cmd_crash ;;
  resume) ensure_libs; cmd_resume ;;
  fetch) ensure_libs; echo "$LIBS_DIR" ;;
  admin-config) cmd_admin_config ;;
  users) shift; cmd_users "$@" ;;
  acls) shift; cmd_acls "$@" ;;
  *)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
