#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints how many inputs each one executed.
#
#   fuzz/run.sh [seconds per target, default 60]      TARGETS="chunked pd_splice" to pick
#
# libFuzzer through cargo-fuzz, with coverage guidance (sancov inline 8-bit counters) and
# AddressSanitizer (SANITIZER=none to turn it off). cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address and friends); a stable rustc accepts them with RUSTC_BOOTSTRAP=1,
# which is what this script sets, so no nightly toolchain is needed. The targets are built
# with the router's own target features (sonic-rs's SIMD paths are the ones fuzzed).
# Crashes land in fuzz/artifacts/<target>/; the corpus grows in fuzz/corpus/<target>/,
# seeded from fuzz/seeds/<target>/.
set -uo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
targets=${TARGETS:-"request_head chunked body_fields pd_splice"}
sanitizer=${SANITIZER:-address}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 1
fi

export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+avx2,+pclmulqdq"

dict_for() {
  case $1 in
    request_head | chunked) echo dicts/http.dict ;;
    *) echo dicts/json.dict ;;
  esac
}

mkdir -p logs
echo "== building"
cargo fuzz build -s "$sanitizer" || exit 1

summary=()
status=0
for t in $targets; do
  echo "== $t for ${secs}s"
  mkdir -p "corpus/$t" "artifacts/$t"
  cargo fuzz run -s "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -dict="$(dict_for "$t")" -print_final_stats=1 \
    >"logs/$t.log" 2>&1
  rc=$?
  runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "logs/$t.log" | tail -1)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "logs/$t.log" | tail -1)
  if [ $rc -eq 0 ]; then
    summary+=("$(printf '%-14s %12s execs  %s  (%s)' "$t" "${execs:-?}" "$cov" "$runs")")
  else
    status=1
    crash=$(grep -o 'Test unit written to [^ ]*' "logs/$t.log" | tail -1)
    summary+=("$(printf '%-14s %12s execs  FAILED (exit %s): %s, see fuzz/logs/%s.log' "$t" "${execs:-?}" "$rc" "${crash:-no artifact}" "$t")")
  fi
done

echo
echo "== executions (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
