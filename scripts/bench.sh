#!/usr/bin/env bash
# The Kafka benchmark suite: the saga engine against the best bare rdkafka
# pipeline for the same hops, in the same runs. Writes every RESULT line to
# docs/bench/results.txt, then a table (docs/bench/results.md) and two plots
# (docs/bench/latency.svg, docs/bench/scaling.svg) with scripts/bench_report.py.
#
#   scripts/bench.sh            # the whole suite (about 15 minutes)
#   RUNS=1 scripts/bench.sh     # one run of each measurement
#
# Uses $KAFKA_BOOTSTRAP_SERVERS, or starts the local broker
# (scripts/kafka/broker.sh). Loopback only; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
BURST=${BURST:-40000}
RATES=${RATES:-"500 1000 2000 4000 8000"}
INFLIGHT=${INFLIGHT:-100000}
OUT=docs/bench
mkdir -p "$OUT" target/bench

if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
  scripts/kafka/broker.sh start >/dev/null
  KAFKA_BOOTSTRAP_SERVERS=$(scripts/kafka/broker.sh address)
fi
export KAFKA_BOOTSTRAP_SERVERS
# The broker's CPU per saga too, when it is the local one.
BROKER_ARGS=()
if [[ "$(scripts/kafka/broker.sh address 2>/dev/null || true)" == "$KAFKA_BOOTSTRAP_SERVERS" ]]; then
  BROKER_ARGS=(--broker-pid "$(scripts/kafka/broker.sh pid)")
fi

if ! build=$(cargo bench -p saga-benches --bench kafka_load --no-run 2>&1); then
  echo "$build" >&2
  exit 1
fi

results=target/bench/results.txt
: >"$results"
rm -f target/bench/*.log
run() {
  local label=$1
  shift
  echo "== $label: kafka_load $*" >&2
  local line
  local log="target/bench/$label.log"
  line=$(cargo bench -q -p saga-benches --bench kafka_load -- "$@" ${BROKER_ARGS[@]+"${BROKER_ARGS[@]}"} 2>>"$log" | tee -a /dev/stderr "$log" | grep '^RESULT' || true)
  if [[ -z "$line" ]]; then
    echo "   (no RESULT line: $label failed; see $log)" >&2
    tail -5 "$log" >&2
    return 0
  fi
  echo "$line label=$label" >>"$results"
}

# A warm-up, not recorded: a broker just started serves its first bursts
# far slower (its JVM compiling), which made the first run of every suite
# an outlier for both sides.
echo "== warm-up (not recorded)" >&2
cargo bench -q -p saga-benches --bench kafka_load -- --sagas 10000 >target/bench/warm-up.log 2>&1 || true

for i in $(seq "$RUNS"); do
  run burst --sagas "$BURST"
  run burst-alo --sagas "$BURST" --delivery alo
  run fixed-1000 --rate 1000 --duration 20s
done
for rate in $RATES; do
  run "sweep-$rate" --rate "$rate" --duration 10s
done
for i in $(seq "$RUNS"); do
  run scale-1 --sagas "$BURST" --partitions 6 --instances 1 --only engine
  run scale-2 --sagas "$BURST" --partitions 6 --instances 2 --only engine
done
run inflight --inflight "$INFLIGHT"

{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  cat "$results"
} >"$OUT/results.txt"
python3 scripts/bench_report.py "$OUT/results.txt" "$OUT"
echo "wrote $OUT/results.txt, $OUT/results.md, $OUT/latency.svg, $OUT/scaling.svg" >&2
