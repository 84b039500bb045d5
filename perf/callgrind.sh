#!/usr/bin/env bash
# Deterministic cost figure: user-space instructions the router executes per request,
# counted by valgrind's callgrind (repeatable on a noisy machine, unlike time).
#
# Runs the router (1 shard, epoll driver so every syscall is one valgrind sees) under
# callgrind twice, for N and 2N streamed chat requests (2 KB prompt, 16 tokens, one
# keep-alive client connection, round_robin over 4 mock workers), and reports
# (I(2N) - I(N)) / N: the per-request cost with start-up and shutdown cancelled out.
#
# Usage: perf/callgrind.sh [N] [policy] [pd]  (default N=2000, policy round_robin; with `pd`,
#        P/D mode: 2 of the mocks are prefill workers and 2 decode workers, so each request
#        is a prefill exchange, the body splices and a decode exchange)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
POLICY=${2:-round_robin}
MODE=${3:-plain}
BIN=${BIN:-target/release}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)"; exit 2; }
[ -x "$BIN/ringrouter" ] && [ -x "$BIN/mock-vllm" ] && [ -x "$BIN/loadgen" ] || \
  cargo build --release -p ringrouter -p mock-vllm -p loadgen

work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$work"/cg.* /tmp/ 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$BIN/mock-vllm" --port 0 --workers 4 --model mock-model >"$work/mocks" 2>/dev/null &
for _ in $(seq 50); do [ "$(grep -c listening "$work/mocks")" = 4 ] && break; sleep 0.1; done
urls=$(awk '/listening/ {print $NF}' "$work/mocks" | tr '\n' ' ')
if [ "$MODE" = pd ]; then
  read -r -a u <<<"$urls"
  workers=(--vllm-pd-disaggregation --prefill "${u[0]}" --prefill "${u[1]}" --decode "${u[2]}" --decode "${u[3]}")
else
  # shellcheck disable=SC2206
  workers=(--worker-urls $urls)
fi

run() {
  local n=$1 out="$work/cg.$1"
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$BIN/ringrouter" --port 0 --shards 1 --no-pin-cores --io-driver epoll --policy "$POLICY" \
    --load-scrape-interval-ms 0 --prometheus-port 0 "${workers[@]}" >"$work/router.$n" 2>"$work/router.$n.err" &
  local pid=$!
  for _ in $(seq 300); do grep -q "listening on" "$work/router.$n" && break; sleep 0.1; done
  local url
  url=$(awk '/listening on/ {print $NF}' "$work/router.$n")
  "$BIN/loadgen" --url "$url" --model mock-model --endpoint chat --stream --concurrency 1 \
    --requests "$n" --prompt-bytes 2048 --max-tokens 16 --quiet --json >"$work/lg.$n"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",","",$1); print $1; done=1}' || true
}
a=$(run "$N")
b=$(run $((2 * N)))
per=$(( (b - a) / N ))
echo "callgrind: $a instructions for $N requests, $b for $((2 * N)); per request: $per (policy $POLICY, $MODE)"
