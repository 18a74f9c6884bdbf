#!/usr/bin/env bash
# Run splicegate's fuzz targets with cargo-fuzz (libFuzzer, nightly).
#
#   fuzz/run.sh                     # every target, 15 s each (the CI smoke)
#   fuzz/run.sh --time 600 http_head proxy_header
#
# Seeds are the real captures under tests/fixtures (ClientHellos from curl,
# openssl and Chromium; PROXY headers from HAProxy; request heads from curl
# and Chromium; resolver answers from the documented Python resolver); new
# inputs go to fuzz/corpus/<target> (not committed).
# Installs cargo-fuzz when it is missing. Exits non-zero on a crash, with
# the reproducer under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"

secs=15
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) secs=$2; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(client_hello proxy_header http_head path_router quic_initial resolver_answer)

declare -A seeds=(
  [client_hello]=../tests/fixtures/hello
  [proxy_header]=../tests/fixtures/proxy
  [http_head]=../tests/fixtures/http
  [path_router]=seeds/path_router
  [quic_initial]=seeds/quic_initial
  [resolver_answer]=seeds/resolver_answer
)

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "SKIP fuzzing: no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 0
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

cargo +nightly fuzz build
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t: ${secs}s"
  # libFuzzer's own final line reports runs and speed.
  cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[$t]}" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|thread .* panicked|Done )' || true
  if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    echo "fuzz target $t crashed; reproducers in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
