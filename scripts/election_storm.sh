#!/usr/bin/env bash
# Election storm: three example nodes (examples/cluster.rs) on 127.0.0.1, N groups each.
# Measures, for the engine's log and then the in-memory log:
#   - first start: seconds from launching the nodes until every node reports the same leader
#     for every group;
#   - RSS per node once elected, and per group;
#   - idle CPU of the three nodes together over IDLE_S seconds (cores);
#   - kill -9 of all three nodes, restart, seconds until every group has a leader again
#     (engine only: the in-memory log forgets everything, so its "restart" is a first start).
#
#   scripts/election_storm.sh                 # 1,000 groups per node
#   GROUPS_PER_NODE=10000 scripts/election_storm.sh
#
# Environment:
#   GROUPS_PER_NODE  groups per node                       (default: 1000)
#   MODES            which logs to run: "engine memory"    (default: both)
#   IDLE_S           seconds of idle CPU measurement       (default: 10)
#   TIMEOUT_S        give up waiting for leaders after     (default: 600)
#   DATA_DIR         where the nodes keep their data       (default: <repo>/storm-data; relative paths are from the caller's directory, wiped)
#   PORT_BASE        node i listens on PORT_BASE + i       (default: 9100)
#   NODE_ARGS        extra node arguments, e.g. "--heartbeat-ms 250"
#   ROUNDS           rounds of all MODES; the order of the modes alternates between rounds,
#                    and with more than one round the medians and the engine / memory ratio of
#                    the first-election times are printed at the end (default: 1)
set -euo pipefail

CALLER=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD
GROUPS_PER_NODE=${GROUPS_PER_NODE:-1000}
MODES=${MODES:-engine memory}
IDLE_S=${IDLE_S:-10}
TIMEOUT_S=${TIMEOUT_S:-600}
DATA_DIR=${DATA_DIR:-$ROOT/storm-data}
[[ $DATA_DIR == /* ]] || DATA_DIR=$CALLER/$DATA_DIR
PORT_BASE=${PORT_BASE:-9100}
read -r -a NODE_EXTRA <<<"${NODE_ARGS:-}"
ROUNDS=${ROUNDS:-1}

cargo build --release --example cluster 2>&1 | tail -1
BIN=$ROOT/target/release/examples/cluster
CLK_TCK=$(getconf CLK_TCK)
# Room for the file descriptors of many groups (one connection per node pair needs few).
ulimit -n 65536 2>/dev/null || true

port() { echo $((PORT_BASE + $1)); }
peers_of() {
  local me=$1 out=() i
  for i in 1 2 3; do [[ $i == "$me" ]] || out+=("$i@127.0.0.1:$(port "$i")"); done
  (IFS=,; echo "${out[*]}")
}
ADDRS="127.0.0.1:$(port 1),127.0.0.1:$(port 2),127.0.0.1:$(port 3)"

declare -A PID
start_nodes() { # $1: extra flag (--memory-log or empty)
  local i
  for i in 1 2 3; do
    mkdir -p "$DATA_DIR/node-$i"
    "$BIN" node --id "$i" --port "$(port "$i")" --peers "$(peers_of "$i")" \
      --data-dir "$DATA_DIR/node-$i" --groups "$GROUPS_PER_NODE" --log-level error \
      ${1:+"$1"} "${NODE_EXTRA[@]}" >>"$DATA_DIR/node-$i.log" 2>&1 &
    PID[$i]=$!
  done
}
stop_nodes() { # $1: signal
  local i
  for i in 1 2 3; do
    if [[ -n "${PID[$i]:-}" ]]; then kill "-$1" "${PID[$i]}" 2>/dev/null || true; fi
  done
  for i in 1 2 3; do
    if [[ -n "${PID[$i]:-}" ]]; then wait "${PID[$i]}" 2>/dev/null || true; fi
    PID[$i]=""
  done
}
trap 'stop_nodes KILL' EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
wait_leaders() {
  "$BIN" wait-leaders --addrs "$ADDRS" --timeout-s "$TIMEOUT_S" >/dev/null 2>>"$DATA_DIR/wait.log"
}
rss_mib() { awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

results=()
declare -A FIRSTS CPUS
read -r -a MODE_LIST <<<"$MODES"
for ((round = 1; round <= ROUNDS; round++)); do
  order=("${MODE_LIST[@]}")
  if ((round % 2 == 0)); then # alternate which mode goes first
    order=()
    for ((k = ${#MODE_LIST[@]} - 1; k >= 0; k--)); do order+=("${MODE_LIST[$k]}"); done
  fi
  for mode in "${order[@]}"; do
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR"
    flag=""
    [[ $mode == memory ]] && flag="--memory-log"

    t0=$(now)
    start_nodes "$flag"
    wait_leaders
    first=$(since "$t0")
    elect_ticks=0
    for i in 1 2 3; do elect_ticks=$((elect_ticks + $(cpu_ticks "${PID[$i]}"))); done
    elect_cpu=$(awk -v t="$elect_ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')

    # Let leadership transfers and catch-up settle before measuring memory and idle CPU.
    sleep 5
    rss=()
    for i in 1 2 3; do rss+=("$(rss_mib "${PID[$i]}")"); done
    before=0
    for i in 1 2 3; do before=$((before + $(cpu_ticks "${PID[$i]}"))); done
    sleep "$IDLE_S"
    after=0
    for i in 1 2 3; do after=$((after + $(cpu_ticks "${PID[$i]}"))); done
    idle=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v s="$IDLE_S" 'BEGIN { printf "%.2f", t / hz / s }')
    rss_avg=$(( (rss[0] + rss[1] + rss[2]) / 3 ))
    per_group_kib=$(awk -v m="$rss_avg" -v g="$GROUPS_PER_NODE" 'BEGIN { printf "%.1f", m * 1024 / g }')

    restart="n/a"
    if [[ $mode == engine ]]; then
      stop_nodes KILL
      t1=$(now)
      start_nodes ""
      wait_leaders
      restart=$(since "$t1")
    fi
    stop_nodes KILL
    FIRSTS[$mode]+="$first "
    CPUS[$mode]+="$elect_cpu "
    line="round $round/$ROUNDS, $mode: groups/node $GROUPS_PER_NODE | first election ${first} s (${elect_cpu} CPU-s, 3 nodes) | RSS/node ${rss[*]} MiB (avg ${rss_avg}, ${per_group_kib} KiB/group) | idle CPU, 3 nodes ${idle} cores | after kill -9 of all: ${restart} s"
    echo "$line"
    results+=("$line")
  done
done

median() { tr ' ' '\n' | awk 'NF' | sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) exit; m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.2f", m }'; }

echo
echo "== election storm, $(nproc) cores, NODE_ARGS='${NODE_ARGS:-}' =="
printf '%s\n' "${results[@]}"
if ((ROUNDS > 1)); then
  for mode in "${MODE_LIST[@]}"; do
    echo "$mode, median of $ROUNDS rounds: first election $(median <<<"${FIRSTS[$mode]}") s (${FIRSTS[$mode]% }), $(median <<<"${CPUS[$mode]}") CPU-s"
  done
  if [[ -n "${FIRSTS[engine]:-}" && -n "${FIRSTS[memory]:-}" ]]; then
    awk -v e="$(median <<<"${FIRSTS[engine]}")" -v m="$(median <<<"${FIRSTS[memory]}")" \
      'BEGIN { printf "first election, engine / in-memory (medians): %.2fx\n", e / m }'
  fi
fi
