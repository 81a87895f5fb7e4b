# Sluice developer commands. Everything runs from a fresh clone: the virtual environment and the
# pinned Kafka broker are created on first use and reused after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export KAFKA_PORT ?= 9092

.PHONY: venv test kafka-up kafka-down kafka-status demo bench clean sanitize go-test

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard daemon/*.c shm/*.c shm/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

kafka-up:
	@PYTHON=$(PYTHON) scripts/kafka.sh up

kafka-down:
	@PYTHON=$(PYTHON) scripts/kafka.sh down

kafka-status:
	@PYTHON=$(PYTHON) scripts/kafka.sh status

# Starts Kafka only when none answers, and stops only what it started.
test: venv
	@started=0; \
	if ! scripts/kafka.sh status >/dev/null 2>&1; then scripts/kafka.sh up >/dev/null || exit 1; started=1; fi; \
	SLUICE_TEST_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then scripts/kafka.sh down; fi; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests"; fi; \
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
