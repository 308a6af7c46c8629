#!/usr/bin/env bash
# The test suite under load: runs the README's test command's pytest RUNS times in a row (default 3) while busy
# loops of this script's own (one per core, or BUSY of them) keep every core busy for the whole time, and reports
# each run's result. A timing-dependent test shows up here as a failure that a quiet machine does not give.
#
#   tests/stress.sh                      # the whole suite, three times
#   tests/stress.sh 1 tests/integration/test_faults.py -k second_signal   # RUNS, then pytest's arguments
#   BUSY=2 tests/stress.sh
#
# Run it after the README's install step (it uses .venv). Each run's output goes to $STRESS_LOGS (default a new
# directory under /tmp); the exit status is 0 only if every run passed.
set -u
cd "$(dirname "$0")/.."
runs=${1:-3}
[ $# -gt 0 ] && shift
busy=${BUSY:-$(nproc)}
logs=${STRESS_LOGS:-$(mktemp -d /tmp/blip-stress-XXXXXX)}
mkdir -p "$logs"

loops=()
stop_loops() { [ ${#loops[@]} -gt 0 ] && kill "${loops[@]}" 2>/dev/null; wait "${loops[@]}" 2>/dev/null; loops=(); }
trap stop_loops EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$busy"); do
    python3 -c 'while True: pass' &
    loops+=($!)
done
echo "stress: $busy busy loops (pids ${loops[*]}); $runs runs of: .venv/bin/python -m pytest $*; logs in $logs"

failed=0
results=()
for run in $(seq "$runs"); do
    started=$(date +%s)
    .venv/bin/python -m pytest "$@" >"$logs/run-$run.log" 2>&1
    code=$?
    summary=$(grep -E '(passed|failed|errors?|no tests ran) in [0-9.]+s' "$logs/run-$run.log" | tail -1 | tr -d '=' | xargs)
    results+=("run $run: exit $code in $(( $(date +%s) - started )) s: ${summary:-no summary (see $logs/run-$run.log)}")
    echo "stress: ${results[-1]}"
    [ "$code" -eq 0 ] || failed=1
done
stop_loops
printf 'stress: %s\n' "${results[@]}"
if [ "$failed" -ne 0 ]; then
    echo "stress: FAILED (the failures' details: grep -n -A40 '^=* FAILURES' $logs/run-*.log)"
else
    echo "stress: all $runs runs passed"
fi
exit "$failed"
