#!/usr/bin/env bash
# The local Apache Kafka broker for development, tests, the demo and benchmarks.
#
#   scripts/kafka.sh up      fetch the pinned jars (cached), format and start one KRaft node on
#                            127.0.0.1, wait until it answers a real request, print the bootstrap
#   scripts/kafka.sh down    stop it and remove its data
#   scripts/kafka.sh stop    stop it and keep its data (an outage, for chaos tests)
#   scripts/kafka.sh start   start a stopped broker again with the data it had
#   scripts/kafka.sh status  exit 0 and print the bootstrap if it answers
#
# With KAFKA_NODES=3 (any N from 2 to 9) the same commands run a KRaft cluster of N combined
# broker+controller nodes instead (see "The cluster" below); `stop`, `start` and `kill` then take
# a node number:
#
#   KAFKA_NODES=3 scripts/kafka.sh up        nodes 1..3 on 127.0.0.1:19092..19094
#   KAFKA_NODES=3 scripts/kafka.sh stop 2    SIGTERM node 2 (kept data); `kill 2` is SIGKILL
#   KAFKA_NODES=3 scripts/kafka.sh start 2   start node 2 again with its data
#   KAFKA_NODES=3 scripts/kafka.sh down      stop every node and remove the cluster's data
#
# Environment: KAFKA_PORT (default 9092), KAFKA_CONTROLLER_PORT (default KAFKA_PORT+1),
# KAFKA_ADVERTISED_PORT (default KAFKA_PORT: the port the broker tells clients to use; chaos
# tests point it at a fault-injecting proxy in front of KAFKA_PORT),
# KAFKA_STATE_DIR (default .run/kafka-$KAFKA_PORT in the repository), KAFKA_HEAP (default 1g).
# KAFKA_SECURITY=1 runs a single node with TLS and SASL listeners beside a PLAINTEXT one, on
# ports of its own (default KAFKA_PORT=29092) and its own state (.run/kafka-secure-PORT); see
# "The secure node" below. Without it nothing of that mode applies.
# KAFKA_VERSION (default: the version pinned in kafka/pom.xml) runs another release, fetched
# from Maven Central into .run/kafka-jars-VERSION (the compatibility check of the oldest supported
# version); the pinned one lives in kafka/.jars.
# The broker's version is pinned in kafka/pom.xml; Maven fetches it from Maven Central once.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECURITY=${KAFKA_SECURITY:-0}
if [ "$SECURITY" = 1 ]; then
  PORT=${KAFKA_SECURE_PORT:-29092}
  STATE=${KAFKA_STATE_DIR:-$ROOT/.run/kafka-secure-$PORT}
else
  PORT=${KAFKA_PORT:-9092}
  STATE=${KAFKA_STATE_DIR:-$ROOT/.run/kafka-$PORT}
fi
CPORT=${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}
APORT=${KAFKA_ADVERTISED_PORT:-$PORT}
PINNED=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/kafka/pom.xml")
VERSION=${KAFKA_VERSION:-$PINNED}
JARS=$ROOT/kafka/.jars
[ "$VERSION" = "$PINNED" ] || JARS=$ROOT/.run/kafka-jars-$VERSION
HEAP=${KAFKA_HEAP:-1g}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-50}
PY=${PYTHON:-python3}
BOOTSTRAP=127.0.0.1:$PORT

log() { echo "kafka: $*" >&2; }

probe() { "$PY" "$ROOT/scripts/kafka_probe.py" 127.0.0.1 "$PORT" "${1:-2}" >/dev/null 2>&1; }

alive() { [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; }

fetch_jars() {
  local stamp=$JARS/.pom.sha
  local want
  want=$(sha256sum "$ROOT/kafka/pom.xml" | cut -d' ' -f1)
  # Another version's stamp names it too, so its directory is never taken for the pinned one.
  [ "$VERSION" = "$PINNED" ] || want="$want $VERSION"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  command -v mvn >/dev/null || { log "Maven (mvn) is needed to fetch the broker"; exit 1; }
  command -v java >/dev/null || { log "Java 17+ is needed to run the broker"; exit 1; }
  log "fetching the broker jars of Kafka $VERSION from Maven Central (once)"
  rm -rf "$JARS"
  mvn -q -B -f "$ROOT/kafka/pom.xml" dependency:copy-dependencies -Dkafka.version="$VERSION" \
      -DoutputDirectory="$JARS" -DincludeScope=runtime >&2
  echo "$want" > "$stamp"
}

write_config() {
  mkdir -p "$STATE/data" "$STATE/logs"
  cat > "$STATE/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$APORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$STATE/data
num.partitions=1
# Sluice treats an unknown topic as an error, as a careful production cluster would.
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
num.network.threads=2
num.io.threads=4
PROPS
  [ "$SECURITY" = 1 ] && write_secure_config
  write_log4j "$STATE"
}

# --- The secure node (KAFKA_SECURITY=1) -----------------------------------------------------
#
# One node, five ports from KAFKA_SECURE_PORT (default 29092):
#   +0 PLAINTEXT (readiness probe, inter-broker)   +1 CONTROLLER
#   +2 SSL, client certificate required (mutual TLS)
#   +3 SASL_SSL        +4 SASL_PLAINTEXT
# with PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 and OAUTHBEARER (Kafka's unsecured JWS validator,
# for tests only) on both SASL listeners. A fresh CA, a broker certificate for IP 127.0.0.1 only
# (so "localhost" is a host name mismatch), a client certificate whose key is encrypted, and a
# second CA that signed nothing (an untrusted CA) are made with openssl at each `up` under
# STATE/tls. SCRAM users are created at format time. SASL sessions last KAFKA_REAUTH_MS
# (default 20000; 0 = unlimited), so clients must re-authenticate (KIP-368). Everything a
# client needs (ports, files, users, passwords) is in STATE/secure.json. Test secrets only.
SASL_USER=alice
SASL_PASSWORD=alice-secret
CLIENT_KEY_PASSWORD=client-key-secret
KEYSTORE_PASSWORD=broker-keystore-secret

gen_certs() {
  local d=$STATE/tls
  mkdir -p "$d"
  (
    cd "$d"
    ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ec ca.key
    openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj "/CN=sluice test CA" 2>/dev/null
    ec other-ca.key
    openssl req -x509 -new -key other-ca.key -out other-ca.pem -days 2 -subj "/CN=untrusted test CA" 2>/dev/null
    ec broker.key
    openssl req -new -key broker.key -out broker.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile broker.ext -out broker.pem 2>/dev/null
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
        -out broker.p12 -passout "pass:$KEYSTORE_PASSWORD"
    ec client.plain.key
    openssl pkcs8 -topk8 -in client.plain.key -out client.key -v2 aes-256-cbc -passout "pass:$CLIENT_KEY_PASSWORD"
    openssl req -new -key client.plain.key -out client.csr -subj "/CN=sluice-client" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile client.ext -out client.pem 2>/dev/null
    rm -f ./*.csr ./*.ext ca.srl
  ) || fail_start "certificate generation failed (openssl)"
}

write_secure_config() {
  local d=$STATE/tls sslp=$((PORT + 2)) saslsp=$((PORT + 3)) saslpp=$((PORT + 4)) l
  gen_certs
  # The listeners replace the plain node's: same PLAINTEXT and CONTROLLER, three secure ones.
  sed -i -e '/^listeners=/d' -e '/^advertised.listeners=/d' -e '/^listener.security.protocol.map=/d' \
      "$STATE/server.properties"
  cat >> "$STATE/server.properties" <<PROPS
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT,SSL://127.0.0.1:$sslp,SASL_SSL://127.0.0.1:$saslsp,SASL_PLAINTEXT://127.0.0.1:$saslpp
advertised.listeners=PLAINTEXT://127.0.0.1:$APORT,SSL://127.0.0.1:$sslp,SASL_SSL://127.0.0.1:$saslsp,SASL_PLAINTEXT://127.0.0.1:$saslpp
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT
ssl.keystore.type=PKCS12
ssl.keystore.location=$d/broker.p12
ssl.keystore.password=$KEYSTORE_PASSWORD
ssl.key.password=$KEYSTORE_PASSWORD
ssl.truststore.type=PEM
ssl.truststore.location=$d/ca.pem
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512,OAUTHBEARER
connections.max.reauth.ms=${KAFKA_REAUTH_MS:-20000}
PROPS
  for l in sasl_ssl sasl_plaintext; do
    cat >> "$STATE/server.properties" <<PROPS
listener.name.$l.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER="$SASL_PASSWORD";
listener.name.$l.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.$l.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.$l.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="broker";
listener.name.$l.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.internals.unsecured.OAuthBearerUnsecuredValidatorCallbackHandler
PROPS
  done
  cat > "$STATE/secure.json" <<JSON
{"plaintext": "127.0.0.1:$PORT", "ssl": "127.0.0.1:$sslp", "sasl_ssl": "127.0.0.1:$saslsp",
 "sasl_plaintext": "127.0.0.1:$saslpp",
 "ca": "$d/ca.pem", "other_ca": "$d/other-ca.pem",
 "client_cert": "$d/client.pem", "client_key": "$d/client.key", "client_key_plain": "$d/client.plain.key",
 "client_key_password": "$CLIENT_KEY_PASSWORD",
 "username": "$SASL_USER", "password": "$SASL_PASSWORD", "password_file": "$d/sasl-password",
 "reauth_ms": ${KAFKA_REAUTH_MS:-20000}}
JSON
  (umask 077; printf '%s\n' "$SASL_PASSWORD" > "$d/sasl-password")
}

# Extra format arguments: the SCRAM users of the secure node.
format_args() {
  [ "$SECURITY" = 1 ] || return 0
  printf '%s\n' --add-scram "SCRAM-SHA-256=[name=$SASL_USER,password=$SASL_PASSWORD]" \
      --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]"
}

# The broker's log goes to DIR/logs/server.log.
write_log4j() {
  cat > "$1/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $1/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
PROPS
}

fail_start() {
  log "broker did not become ready: $1"
  log "last lines of $STATE/logs/server.log and stdout:"
  tail -n 30 "$STATE/logs/server.log" >&2 2>/dev/null || true
  tail -n 20 "$STATE/logs/stdout.log" >&2 2>/dev/null || true
  if alive; then kill -9 "$(cat "$STATE/pid")" 2>/dev/null || true; fi
  rm -f "$STATE/pid"
  exit 1
}

# Starts the broker on the state in $STATE (written by up) and waits until it answers.
launch() {
  local t0=$1
  # setsid: the broker must outlive the make or pytest process that started it.
  setsid java -Xms256m -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$STATE/log4j2.properties" -Dkafka.logs.dir="$STATE/logs" \
      -cp "$JARS/*" kafka.Kafka "$STATE/server.properties" \
      > "$STATE/logs/stdout.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pid"
  local deadline=$(( $(date +%s) + START_TIMEOUT ))
  until probe; do
    alive || fail_start "the broker process exited"
    [ "$(date +%s)" -lt "$deadline" ] || fail_start "no answer within ${START_TIMEOUT}s"
    sleep 0.3
  done
  log "ready on $BOOTSTRAP in $("$PY" -c "import time;print(f'{time.time()-$t0:.1f}')")s (log: $STATE/logs/server.log)"
  echo "$BOOTSTRAP"
}

up() {
  if alive && probe; then echo "$BOOTSTRAP"; return 0; fi
  if probe; then log "something else already answers on $BOOTSTRAP"; echo "$BOOTSTRAP"; return 0; fi
  if alive; then log "stale broker process, stopping it"; down_quiet; fi
  fetch_jars
  rm -rf "$STATE"
  write_config
  local t0 cluster
  t0=$(date +%s.%N)
  cluster=$("$PY" "$ROOT/scripts/kafka_cluster_id.py")
  local extra=()
  mapfile -t extra < <(format_args)
  java -cp "$JARS/*" -Dlog4j2.configurationFile="$STATE/log4j2.properties" \
      kafka.tools.StorageTool format -t "$cluster" -c "$STATE/server.properties" "${extra[@]}" \
      > "$STATE/logs/format.log" 2>&1 || { cat "$STATE/logs/format.log" >&2; fail_start "format failed"; }
  launch "$t0"
}

down_quiet() {
  if [ -f "$STATE/pid" ]; then
    local pid
    pid=$(cat "$STATE/pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
}

# An outage that keeps the data: the broker is stopped (TERM, then KILL after 10 s) and its
# state directory stays, so start() brings back the same cluster, topics and records.
stop() {
  down_quiet
  rm -f "$STATE/pid"
  log "stopped; kept $STATE"
}

start() {
  if alive && probe; then echo "$BOOTSTRAP"; return 0; fi
  [ -f "$STATE/server.properties" ] || { log "no broker state in $STATE: use up"; exit 1; }
  if alive; then down_quiet; fi
  fetch_jars
  launch "$(date +%s.%N)"
}

down() {
  down_quiet
  rm -rf "$STATE"
  log "stopped; removed $STATE"
}

# --- The cluster (KAFKA_NODES > 1) ----------------------------------------------------------
#
# N combined broker+controller nodes on 127.0.0.1, a static quorum of all N. Node i (1..N)
# serves clients on KAFKA_CLUSTER_PORT+i-1 (default 19092, so beside the single node on 9092 and
# the chaos broker on 19292) and its controller on KAFKA_CLUSTER_PORT+100+i-1; its state lives in
# .run/kafka-cluster-PORT/nodeI. Small heaps and few threads, so three fit on two cores.
# Topics default to replication factor N with min.insync.replicas 2 (1 for N=2). A dead broker
# is fenced after broker.session.timeout.ms (3 s here, 9 s by default) and its partitions get
# new leaders then; tests measure the stall this causes.

NODES=${KAFKA_NODES:-1}
CBASE=${KAFKA_CLUSTER_PORT:-19092}
CSTATE=${KAFKA_STATE_DIR:-$ROOT/.run/kafka-cluster-$CBASE}
CHEAP=${KAFKA_HEAP:-384m}

node_port() { echo $((CBASE + $1 - 1)); }
node_dir() { echo "$CSTATE/node$1"; }
node_alive() { local d; d=$(node_dir "$1"); [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; }
# Ready: it answers and its Metadata lists every node (so the quorum has formed).
node_probe() { "$PY" "$ROOT/scripts/kafka_probe.py" 127.0.0.1 "$(node_port "$1")" "${2:-2}" "$NODES" >/dev/null 2>&1; }
cluster_bootstrap() {
  local i out=""
  for i in $(seq 1 "$NODES"); do out="$out${out:+,}127.0.0.1:$(node_port "$i")"; done
  echo "$out"
}

write_node_config() {
  local i=$1 d voters="" j min_isr=2
  d=$(node_dir "$i")
  [ "$NODES" -ge 3 ] || min_isr=1
  for j in $(seq 1 "$NODES"); do voters="$voters${voters:+,}$j@127.0.0.1:$(( $(node_port "$j") + 100 ))"; done
  mkdir -p "$d/data" "$d/logs"
  cat > "$d/server.properties" <<PROPS
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$(node_port "$i"),CONTROLLER://127.0.0.1:$(( $(node_port "$i") + 100 ))
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$i")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$d/data
num.partitions=1
default.replication.factor=$NODES
min.insync.replicas=$min_isr
auto.create.topics.enable=false
offsets.topic.replication.factor=$NODES
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=$NODES
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$NODES
share.coordinator.state.topic.min.isr=$min_isr
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
# A killed broker is fenced (and its partitions led elsewhere) within about 3 s.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
replica.lag.time.max.ms=10000
# Leadership goes back to the preferred replica soon after a restart (rolling restarts).
leader.imbalance.check.interval.seconds=10
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
background.threads=2
log.cleaner.threads=1
PROPS
  write_log4j "$d"
}

node_launch() {
  local i=$1 d
  d=$(node_dir "$i")
  # setsid: the node must outlive the make or pytest process that started it. SerialGC: one GC
  # thread per node instead of one per core.
  setsid java -Xms64m -Xmx"$CHEAP" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$d/log4j2.properties" -Dkafka.logs.dir="$d/logs" \
      -cp "$JARS/*" kafka.Kafka "$d/server.properties" \
      > "$d/logs/stdout.log" 2>&1 < /dev/null &
  echo $! > "$d/pid"
}

cluster_fail() {
  local i
  log "cluster did not become ready: $1"
  for i in $(seq 1 "$NODES"); do
    log "node $i, last lines of $(node_dir "$i")/logs/server.log:"
    tail -n 15 "$(node_dir "$i")/logs/server.log" >&2 2>/dev/null || true
    tail -n 5 "$(node_dir "$i")/logs/stdout.log" >&2 2>/dev/null || true
  done
  exit 1
}

# Waits until every node in "$@" answers and lists all N nodes.
cluster_wait() {
  local t0=$1 i
  shift
  local deadline=$(( $(date +%s) + START_TIMEOUT ))
  for i in "$@"; do
    until node_probe "$i"; do
      node_alive "$i" || cluster_fail "node $i exited"
      [ "$(date +%s)" -lt "$deadline" ] || cluster_fail "node $i: no answer within ${START_TIMEOUT}s"
      sleep 0.3
    done
  done
  log "cluster ready on $(cluster_bootstrap) in $("$PY" -c "import time;print(f'{time.time()-$t0:.1f}')")s (logs: $CSTATE/node*/logs)"
}

node_signal() {
  local i=$1 sig=$2 d pid
  d=$(node_dir "$i")
  [ -f "$d/pid" ] || return 0
  pid=$(cat "$d/pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$d/pid"
}

cluster_up() {
  local all=1 i
  for i in $(seq 1 "$NODES"); do node_alive "$i" && node_probe "$i" || all=0; done
  if [ $all = 1 ]; then cluster_bootstrap; return 0; fi
  for i in $(seq 1 "$NODES"); do node_signal "$i" KILL; done
  fetch_jars
  rm -rf "$CSTATE"
  local t0 cluster
  t0=$(date +%s.%N)
  cluster=$("$PY" "$ROOT/scripts/kafka_cluster_id.py")
  for i in $(seq 1 "$NODES"); do
    write_node_config "$i"
    java -cp "$JARS/*" -Dlog4j2.configurationFile="$(node_dir "$i")/log4j2.properties" \
        kafka.tools.StorageTool format -t "$cluster" -c "$(node_dir "$i")/server.properties" \
        > "$(node_dir "$i")/logs/format.log" 2>&1 &
  done
  wait || true
  for i in $(seq 1 "$NODES"); do
    grep -qi "formatting" "$(node_dir "$i")/logs/format.log" || { cat "$(node_dir "$i")/logs/format.log" >&2; cluster_fail "format of node $i failed"; }
  done
  for i in $(seq 1 "$NODES"); do node_launch "$i"; done
  cluster_wait "$t0" $(seq 1 "$NODES")
  cluster_bootstrap
}

cluster_node_arg() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] || { log "which node? 1..$NODES"; exit 2; }
}

cluster_main() {
  case "${1:-}" in
    up) cluster_up ;;
    down)
      # Its data goes anyway: TERM every node at once, KILL what still runs after 5 s (a
      # controlled shutdown without a controller quorum would wait much longer).
      for i in $(seq 1 "$NODES"); do node_alive "$i" && kill -TERM "$(cat "$(node_dir "$i")/pid")" 2>/dev/null; done
      for _ in $(seq 1 50); do
        local any=0
        for i in $(seq 1 "$NODES"); do node_alive "$i" && any=1; done
        [ $any = 1 ] || break
        sleep 0.1
      done
      for i in $(seq 1 "$NODES"); do node_signal "$i" KILL; done
      rm -rf "$CSTATE"
      log "cluster stopped; removed $CSTATE" ;;
    stop) cluster_node_arg "${2:-}"; node_signal "$2" TERM; log "node $2 stopped; kept its data" ;;
    kill) cluster_node_arg "${2:-}"; node_signal "$2" KILL; log "node $2 killed; kept its data" ;;
    start)
      cluster_node_arg "${2:-}"
      [ -f "$(node_dir "$2")/server.properties" ] || { log "no state for node $2 in $CSTATE: use up"; exit 1; }
      node_alive "$2" || { fetch_jars; node_launch "$2"; }
      cluster_wait "$(date +%s.%N)" "$2"
      cluster_bootstrap ;;
    status)
      local ok=1 i
      for i in $(seq 1 "$NODES"); do node_probe "$i" || { ok=0; log "node $i not answering on 127.0.0.1:$(node_port "$i")"; }; done
      [ $ok = 1 ] || exit 1
      cluster_bootstrap ;;
    *) echo "usage: KAFKA_NODES=$NODES $0 up|down|status|stop N|kill N|start N" >&2; exit 2 ;;
  esac
}

if [ "$NODES" != 1 ]; then
  [[ "$NODES" =~ ^[2-9]$ ]] || { log "KAFKA_NODES must be 1..9"; exit 2; }
  [ "$SECURITY" != 1 ] || { log "KAFKA_SECURITY=1 runs a single node only"; exit 2; }
  cluster_main "$@"
  exit $?
fi

case "${1:-}" in
  up) up ;;
  down) down ;;
  stop) stop ;;
  start) start ;;
  status) if probe; then echo "$BOOTSTRAP"; else log "not running on $BOOTSTRAP"; exit 1; fi ;;
  *) echo "usage: $0 up|down|stop|start|status" >&2; exit 2 ;;
esac
