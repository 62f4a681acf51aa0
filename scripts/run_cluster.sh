#!/usr/bin/env bash
# Starts the three-node example cluster (examples/cluster.rs) on 127.0.0.1:9001-9003.
#
#   scripts/run_cluster.sh                 # run in the foreground until Ctrl-C
#   scripts/run_cluster.sh bench [ARGS]    # start, run the bench client with ARGS, stop
#
# Environment:
#   DATA_DIR   data directories go to $DATA_DIR/node-{1,2,3}   (default: <repo>/cluster-data; relative paths are from the caller's directory)
#   NUM_GROUPS Raft groups per node                            (default: 16)
#   MEMORY=1   keep Raft logs in memory instead of the engine (the benchmark ceiling)
#   LOG_LEVEL  node log filter                                 (default: $RUST_LOG, else warn)
#   PORT_BASE  node i listens on PORT_BASE + i                 (default: 9000)
#   WARMUP     seconds to wait before benchmarking, while new engines prefill their next
#              segment in the background                       (default: 5)
#
# Kill a node (kill -9 the pid printed below) and start it again with the same command line:
# it recovers from its data directory and catches up; the other two keep serving meanwhile.
set -euo pipefail

CALLER=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA_DIR=${DATA_DIR:-$ROOT/cluster-data}
[[ $DATA_DIR == /* ]] || DATA_DIR=$CALLER/$DATA_DIR
NUM_GROUPS=${NUM_GROUPS:-16}
LOG_LEVEL=${LOG_LEVEL:-${RUST_LOG:-warn}}
PORT_BASE=${PORT_BASE:-9000}
EXTRA=()
if [[ "${MEMORY:-0}" == 1 ]]; then EXTRA+=(--memory-log); fi

cargo build --release --example cluster
BIN=$ROOT/target/release/examples/cluster

port() { echo $((PORT_BASE + $1)); }
peers_of() {
  local me=$1 out=() i
  for i in 1 2 3; do [[ $i == "$me" ]] || out+=("$i@127.0.0.1:$(port "$i")"); done
  (IFS=,; echo "${out[*]}")
}

PIDS=()
stop() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT

for i in 1 2 3; do
  mkdir -p "$DATA_DIR/node-$i"
  "$BIN" node --id "$i" --port "$(port "$i")" --peers "$(peers_of "$i")" \
    --data-dir "$DATA_DIR/node-$i" --groups "$NUM_GROUPS" --log-level "$LOG_LEVEL" "${EXTRA[@]}" \
    >"$DATA_DIR/node-$i.log" 2>&1 &
  PIDS+=($!)
  echo "node $i: pid $!, port $(port "$i"), log $DATA_DIR/node-$i.log"
  echo "  restart: $BIN node --id $i --port $(port "$i") --peers $(peers_of "$i") --data-dir $DATA_DIR/node-$i --groups $NUM_GROUPS ${EXTRA[*]}"
done

# Wait until every group has a leader (the status call fails until node 1 answers).
for _ in $(seq 1 100); do
  if "$BIN" client --addr "127.0.0.1:$(port 1)" status 2>/dev/null | grep -q "leader Some"; then
    if ! "$BIN" client --addr "127.0.0.1:$(port 1)" status | grep -q "leader None"; then break; fi
  fi
  sleep 0.2
done
"$BIN" client --addr "127.0.0.1:$(port 1)" status

if [[ "${1:-}" == bench ]]; then
  shift
  sleep "${WARMUP:-5}"
  "$BIN" bench --addr "127.0.0.1:$(port 1)" "$@"
  exit 0
fi

echo "cluster running; try: $BIN client --addr 127.0.0.1:$(port 1) put hello world"
echo "Ctrl-C stops all three nodes"
wait
