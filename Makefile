# Sluice developer commands. Everything runs from a fresh clone: the virtual environment and the
# pinned Kafka broker are created on first use and reused after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export KAFKA_PORT ?= 9092
# KAFKA_NODES=3: kafka-up, kafka-down and kafka-status act on a three-broker cluster on
# 127.0.0.1:19092..19094 instead of the single node (docs/OPERATIONS.md, "Three brokers").
# KAFKA_VERSION=X.Y.Z: kafka-up runs that release instead of the one pinned in kafka/pom.xml.
# Passed to kafka-up/down/status only: test and demo always use the single node.
KAFKA_NODES ?= 1
unexport KAFKA_NODES
CLUSTER_BOOTSTRAP := 127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094
# test-compat: the oldest supported Kafka (README, "Kafka versions") on a node of its own, and the
# integration tests of what speaks to the broker run against it.
KAFKA_OLDEST := 4.0.0
COMPAT_PORT := 9392
COMPAT_TESTS := tests/integration/test_sender.py tests/integration/test_metadata.py \
	tests/integration/test_client.py tests/integration/test_chain.py \
	tests/integration/test_oversized_batches.py tests/integration/test_socket_ingest.py \
	tests/integration/test_daemon.py tests/integration/test_partition_growth.py

.PHONY: venv test test-cluster test-compat kafka-up kafka-down kafka-status demo bench clean sanitize go-test

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard daemon/*.c shm/*.c shm/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

kafka-up:
	@PYTHON=$(PYTHON) KAFKA_NODES=$(KAFKA_NODES) scripts/kafka.sh up

# Plain kafka-down stops the single node as always, and a cluster this checkout runs as well.
kafka-down:
	@PYTHON=$(PYTHON) KAFKA_NODES=$(KAFKA_NODES) scripts/kafka.sh down
	@if [ "$(KAFKA_NODES)" = 1 ] && [ -d .run/kafka-cluster-19092 ]; then \
	  PYTHON=$(PYTHON) KAFKA_NODES=3 scripts/kafka.sh down; fi

kafka-status:
	@PYTHON=$(PYTHON) KAFKA_NODES=$(KAFKA_NODES) scripts/kafka.sh status

# Starts Kafka only when none answers, and stops only what it started.
test: venv
	@started=0; \
	if ! scripts/kafka.sh status >/dev/null 2>&1; then scripts/kafka.sh up >/dev/null || exit 1; started=1; fi; \
	SLUICE_TEST_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then scripts/kafka.sh down; fi; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests"; fi; \
	exit $$rc

# The three-broker tests (tests/cluster: leader changes, broker deaths, rolling restarts) on a
# cluster of their own, started when none answers and stopped only if started here.
test-compat: venv
	@export KAFKA_VERSION=$(KAFKA_OLDEST) KAFKA_PORT=$(COMPAT_PORT) KAFKA_HEAP=512m PYTHON=$(PY); \
	scripts/kafka.sh up >/dev/null || exit 1; \
	SLUICE_TEST_BOOTSTRAP=127.0.0.1:$(COMPAT_PORT) $(PY) -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS); rc=$$?; \
	scripts/kafka.sh down; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests"; fi; \
	exit $$rc

test-cluster: venv
	@started=0; \
	if ! KAFKA_NODES=3 scripts/kafka.sh status >/dev/null 2>&1; then \
	  PYTHON=$(PY) KAFKA_NODES=3 scripts/kafka.sh up >/dev/null || exit 1; started=1; fi; \
	SLUICE_TEST_CLUSTER=$(CLUSTER_BOOTSTRAP) $(PY) -m pytest tests/cluster $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then KAFKA_NODES=3 scripts/kafka.sh down; fi; \
	exit $$rc

# The whole product in one command: a local Kafka, the daemon, clients over shared memory and
# the socket, stats, and an independent read-back. Stops only what it started.
demo: venv
	@started=0; \
	if ! scripts/kafka.sh status >/dev/null 2>&1; then scripts/kafka.sh up >/dev/null || exit 1; started=1; fi; \
	SLUICE_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) $(PY) scripts/demo.py; rc=$$?; \
	if [ $$started = 1 ]; then scripts/kafka.sh down; fi; \
	exit $$rc

clean: kafka-down
	rm -rf $(VENV) .run .pytest_cache .hypothesis

# The compiled code's unit and fuzz tests under AddressSanitizer and UBSan (CI runs it too).
sanitize: venv
	@PY=$(PY) scripts/sanitize.sh

# The Go client's unit tests (codec, conformance vectors, the Producer against an in-memory
# daemon); tests/integration/test_go_client.py runs them too, with the client against a real
# daemon. Modules come from the default GOPROXY into the default GOPATH/GOCACHE.
GO ?= go
go-test:
	cd clients/go && $(GO) vet ./... && $(GO) test ./...
