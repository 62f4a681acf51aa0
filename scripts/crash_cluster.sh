#!/usr/bin/env bash
# Raft-level crash test: clients write through the three-node example cluster while nodes are
# killed with SIGKILL and restarted (one at a time, and sometimes all three at once); afterwards
# every write a client saw acknowledged must be readable, on every group. Groups snapshot and
# purge every 200 entries, so restarted nodes also catch up through snapshots sent in 4 KiB
# chunks.
#
#   scripts/crash_cluster.sh                       # 64 groups per node, 12 kill rounds
#   ROUNDS=30 GROUPS_PER_NODE=256 scripts/crash_cluster.sh
#
# Environment:
#   GROUPS_PER_NODE  groups per node                        (default: 64)
#   ROUNDS           kill rounds                            (default: 12)
#   SEED             random seed of the kill schedule       (default: random, printed)
#   DATA_DIR         where the nodes keep their data        (default: <repo>/crash-data; relative paths are from the caller's directory, wiped)
#   PORT_BASE        node i listens on PORT_BASE + i        (default: 9200)
# Exit status 0 only if every acknowledged write was read back.
set -euo pipefail

CALLER=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
GROUPS_PER_NODE=${GROUPS_PER_NODE:-64}
ROUNDS=${ROUNDS:-12}
SEED=${SEED:-$RANDOM}
DATA_DIR=${DATA_DIR:-$ROOT/crash-data}
[[ $DATA_DIR == /* ]] || DATA_DIR=$CALLER/$DATA_DIR
PORT_BASE=${PORT_BASE:-9200}
echo "crash test: $GROUPS_PER_NODE groups/node, $ROUNDS rounds, SEED=$SEED"
RANDOM=$SEED

cargo build --release --example cluster 2>&1 | tail -1
BIN=$ROOT/target/release/examples/cluster
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR"

port() { echo $((PORT_BASE + $1)); }
peers_of() {
  local me=$1 out=() i
  for i in 1 2 3; do [[ $i == "$me" ]] || out+=("$i@127.0.0.1:$(port "$i")"); done
  (IFS=,; echo "${out[*]}")
}
ADDRS="127.0.0.1:$(port 1),127.0.0.1:$(port 2),127.0.0.1:$(port 3)"

declare -A PID
start_node() {
  mkdir -p "$DATA_DIR/node-$1"
  "$BIN" node --id "$1" --port "$(port "$1")" --peers "$(peers_of "$1")" \
    --data-dir "$DATA_DIR/node-$1" --groups "$GROUPS_PER_NODE" --log-level error \
    --heartbeat-ms 100 --election-min-ms 500 --election-max-ms 1000 \
    --snapshot-every 200 --snapshot-chunk 4096 \
    >>"$DATA_DIR/node-$1.log" 2>&1 &
  PID[$1]=$!
}
kill_node() {
  kill -KILL "${PID[$1]}" 2>/dev/null || true
  wait "${PID[$1]}" 2>/dev/null || true
}
LOAD_PIDS=()
cleanup() {
  for p in "${LOAD_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for i in 1 2 3; do kill_node "$i"; done
}
trap cleanup EXIT

for i in 1 2 3; do start_node "$i"; done
"$BIN" wait-leaders --addrs "$ADDRS" --timeout-s 300

# One load client per node (each sends to the leaders it learns), running through all rounds.
for i in 1 2 3; do
  "$BIN" load --addr "127.0.0.1:$(port "$i")" --acked "$DATA_DIR/acked-$i.txt" \
    --duration-s 100000 --concurrency 16 >"$DATA_DIR/load-$i.log" 2>&1 &
  LOAD_PIDS+=($!)
done
sleep 2

for round in $(seq 1 "$ROUNDS"); do
  if (( RANDOM % 4 == 0 )); then
    echo "round $round: kill -9 all three nodes"
    for i in 1 2 3; do kill_node "$i"; done
    sleep 0.$((RANDOM % 10))
    for i in 1 2 3; do start_node "$i"; done
  else
    victim=$((RANDOM % 3 + 1))
    if (( RANDOM % 3 == 0 )); then
      # A long outage: the others purge past the victim's log, so it catches up by snapshot.
      echo "round $round: kill -9 node $victim, down for 6 s"
      kill_node "$victim"
      sleep 6
    else
      echo "round $round: kill -9 node $victim"
      kill_node "$victim"
      sleep 0.$((RANDOM % 10))
    fi
    start_node "$victim"
  fi
  sleep $((1 + RANDOM % 3))
done

# Stop the clients (SIGINT: they flush and report), let the cluster settle, read everything back.
for p in "${LOAD_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
for p in "${LOAD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
LOAD_PIDS=()
cat "$DATA_DIR"/load-*.log
"$BIN" wait-leaders --addrs "$ADDRS" --timeout-s 300
cat "$DATA_DIR"/acked-*.txt >"$DATA_DIR/acked.txt"
echo "acknowledged writes: $(wc -l <"$DATA_DIR/acked.txt")"
echo "snapshots installed from a leader (chunked transfers): $(cat "$DATA_DIR"/node-*.log | grep -c 'installing a snapshot' || true)"
"$BIN" verify --addr "127.0.0.1:$(port 1)" --acked "$DATA_DIR/acked.txt"
