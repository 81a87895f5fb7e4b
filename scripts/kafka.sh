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
# Environment: KAFKA_PORT (default 9092), KAFKA_CONTROLLER_PORT (default KAFKA_PORT+1),
# KAFKA_ADVERTISED_PORT (default KAFKA_PORT: the port the broker tells clients to use; chaos
# tests point it at a fault-injecting proxy in front of KAFKA_PORT),
# KAFKA_STATE_DIR (default .run/kafka-$KAFKA_PORT in the repository), KAFKA_HEAP (default 1g).
# The broker's version is pinned in kafka/pom.xml; Maven fetches it from Maven Central once.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${KAFKA_PORT:-9092}
CPORT=${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}
APORT=${KAFKA_ADVERTISED_PORT:-$PORT}
STATE=${KAFKA_STATE_DIR:-$ROOT/.run/kafka-$PORT}
JARS=$ROOT/kafka/.jars
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
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  command -v mvn >/dev/null || { log "Maven (mvn) is needed to fetch the broker"; exit 1; }
  command -v java >/dev/null || { log "Java 17+ is needed to run the broker"; exit 1; }
  log "fetching the pinned broker jars from Maven Central (once)"
  rm -rf "$JARS"
  mvn -q -B -f "$ROOT/kafka/pom.xml" dependency:copy-dependencies \
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
  cat > "$STATE/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $STATE/logs/server.log
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
  java -cp "$JARS/*" -Dlog4j2.configurationFile="$STATE/log4j2.properties" \
      kafka.tools.StorageTool format -t "$cluster" -c "$STATE/server.properties" \
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

case "${1:-}" in
  up) up ;;
  down) down ;;
  stop) stop ;;
  start) start ;;
  status) if probe; then echo "$BOOTSTRAP"; else log "not running on $BOOTSTRAP"; exit 1; fi ;;
  *) echo "usage: $0 up|down|stop|start|status" >&2; exit 2 ;;
esac
