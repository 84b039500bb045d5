#!/usr/bin/env bash
# Memory with many concurrent open streams: N clients each hold one streamed completion
# open (the mock sends a token every ITL ms for TOKENS tokens), and the router's RSS is
# sampled while they are all open. This machine's hard limit on open files (20,000 per
# process) caps N at ~9,900: the router holds two sockets per stream.
#
# Usage: perf/open_streams.sh [N] [ITL_MS] [TOKENS]   (default 9900 500 40)
#        RAMP=SECS perf/open_streams.sh ...   streams arrive over SECS seconds (open loop,
#        N/SECS a second) instead of all at once; keep SECS under the streams' length
#        (TOKENS x ITL_MS) so that all N are open together.
#        STREAM=0 ...   non-streamed requests: each waits TOKENS x ITL_MS for its response
#        head, the whole answer (how long generations queue behind a router).
#        ROUTER_FLAGS="--head-wait-poll-above 0" ...   extra router flags.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-9900}; ITL=${2:-500}; TOKENS=${3:-40}
BIN=${BIN:-target/release}
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$BIN/mock-vllm" --port 0 --workers 4 --threads 1 --model mock-model --itl-ms "$ITL" >"$work/mocks" 2>&1 &
for _ in $(seq 50); do [ "$(grep -c listening "$work/mocks")" = 4 ] && break; sleep 0.1; done
urls=$(awk '/listening/ {print $NF}' "$work/mocks" | tr '\n' ' ')
# shellcheck disable=SC2086
"$BIN/ringrouter" --port 0 --shards 2 --no-pin-cores --policy round_robin --worker-urls $urls ${ROUTER_FLAGS:-} >"$work/router" 2>&1 &
rpid=$!
for _ in $(seq 50); do grep -q "listening on" "$work/router" && break; sleep 0.1; done
url=$(awk '/listening on/ {print $NF}' "$work/router")
rss() { awk '/VmRSS/ {print $2}' "/proc/$rpid/status"; }
idle=$(rss)
if [ -n "${RAMP:-}" ]; then
  arrival=(--rate "$(python3 -c "print($N / $RAMP)")" --max-connections "$N")
else
  arrival=(--concurrency "$N")
fi
stream=(--stream)
[ "${STREAM:-1}" = 0 ] && stream=(--no-stream)
"$BIN/loadgen" --url "$url" --model mock-model "${stream[@]}" "${arrival[@]}" --requests "$N" \
  --max-tokens "$TOKENS" --prompt-bytes 512 --timeout 120 --quiet --json >"$work/lg" &
lg=$!
peak=0; open_peak=0
while kill -0 "$lg" 2>/dev/null; do
  r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
  open=$(ls /proc/$rpid/fd | wc -l); [ "$open" -gt "$open_peak" ] && open_peak=$open
  sleep 0.5
done
wait "$lg" || true
python3 - "$work/lg" "$N" "$idle" "$peak" "$open_peak" "${RAMP:-}" "${STREAM:-1}" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n, idle, peak, fds = map(int, sys.argv[2:6])
s = d["streams"]
how = f"arriving over {sys.argv[6]} s" if sys.argv[6] else "opened at once"
what = "streams" if sys.argv[7] != "0" else "non-streamed requests"
print(f"{n} concurrent {what} ({how}): router RSS idle {idle/1024:.1f} MiB, peak {peak/1024:.1f} MiB "
      f"({(peak-idle)/n:.2f} KiB each); peak open fds {fds}; "
      f"ok {d['requests']['ok']}, failed {d['requests']['failed']}, missing [DONE] {s['missing_done']}, "
      f"errors {d['errors']['by_kind']}")
PY
