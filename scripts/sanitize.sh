#!/usr/bin/env bash
# Runs the compiled code's unit and fuzz tests (and the ring tests) with the extensions built
# under AddressSanitizer and UBSan, then rebuilds them normally. `make sanitize`; CI runs it.
#
# CPython itself is not instrumented, so the ASan runtime is preloaded; leak detection is off
# (the interpreter keeps memory until exit on purpose). Any sanitizer report fails the run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-.venv/bin/python}
CC=${CC:-gcc}

rebuild() { "$PY" setup.py -q build_ext --inplace --force >/dev/null 2>&1; }
trap rebuild EXIT

SLUICE_SANITIZE=1 "$PY" setup.py -q build_ext --inplace --force >/dev/null
ASAN_LIB=$("$CC" -print-file-name=libasan.so)
UBSAN_LIB=$("$CC" -print-file-name=libubsan.so)
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-sanitize}
"$PY" -m pytest -q -p no:cacheprovider \
  tests/unit/daemon/test_batcher.py tests/unit/daemon/test_accumulator.py \
  tests/unit/daemon/test_accumulator_runs.py tests/unit/shm/test_ring.py tests/unit/shm/test_frames.py \
  tests/unit/shm/test_partitioner.py tests/unit/shm/test_producer.py tests/unit/shm/test_segment.py \
  tests/unit/shm/test_settle.py tests/unit/shm/test_read_completions.py tests/unit/shm/test_producer_growth.py \
  tests/unit/shm/test_packed_produce.py "$@"
