#!/usr/bin/env bash
# Runs every test: formatting, clippy, the Rust unit and integration tests (real sockets on
# 127.0.0.1, the real binary, in-process mock vLLM workers), and the end-to-end tests with
# the official `openai` Python client. Installs what it needs (a C compiler for the
# io_uring-refusing seccomp wrapper, Python's openai and pytest) when missing.
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '\n== %s\n' "$*"; }

if ! command -v cc >/dev/null 2>&1; then
  step "installing a C compiler"
  apt-get update -qq && apt-get install -y -qq gcc >/dev/null
fi
PY=${PYTHON:-python3}
if ! "$PY" -c 'import openai, pytest' >/dev/null 2>&1; then
  step "installing openai and pytest"
  "$PY" -m pip install -q openai pytest
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

step "openai client end-to-end (pytest)"
cargo build --workspace --bins
"$PY" -m pytest -q tests/e2e
