#!/usr/bin/env bash
# Runs the Dockerfile's release build without Docker (there is no Docker engine on the CI
# machine): RUSTFLAGS as the Dockerfile's `ARG RUSTFLAGS=` default, and its `cargo build`
# command word for word, both read from the Dockerfile so the two cannot drift apart.
#
#   tools/docker-build-check.sh            the build (release, LTO: minutes), then checks
#                                          the binary starts (--version)
#   tools/docker-build-check.sh --print    prints RUSTFLAGS and the command, checks that
#                                          Cargo.lock is current (--locked), builds nothing
#
# The build goes to target/docker (CARGO_TARGET_DIR, unless set), so it does not fight
# `cargo build --release` (whose flags come from .cargo/config.toml) over target/release.
set -euo pipefail
cd "$(dirname "$0")/.."

dockerfile=Dockerfile
rustflags_line=$(grep -E '^ARG RUSTFLAGS=' "$dockerfile" || true)
[ -n "$rustflags_line" ] || { echo "no ARG RUSTFLAGS= line in $dockerfile" >&2; exit 1; }
rustflags=${rustflags_line#ARG RUSTFLAGS=}
rustflags=${rustflags#\"}
rustflags=${rustflags%\"}
# The words of the `cargo build ...` line, up to a `&&` or the line's end.
cmd_line=$(grep -E '^[[:space:]]*cargo build ' "$dockerfile" || true)
[ "$(printf '%s\n' "$cmd_line" | grep -c .)" = 1 ] \
  || { echo "expected exactly one 'cargo build' line in $dockerfile" >&2; exit 1; }
cmd_line=${cmd_line%%&&*}
cmd_line=${cmd_line%\\*}
read -r -a cmd <<<"$cmd_line"

printf 'RUSTFLAGS=%s\n' "$rustflags"
printf 'command=%s\n' "${cmd[*]}"

if [ "${1:-}" = "--print" ]; then
  # What --locked refuses (a Cargo.lock that needs changes) shows up here, in a second.
  cargo metadata --locked --format-version 1 >/dev/null
  exit 0
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/docker}
RUSTFLAGS="$rustflags" "${cmd[@]}"
"$CARGO_TARGET_DIR/release/ringrouter" --version
