#!/usr/bin/env bash
# Install what the tests need, then run formatting, lint and every test.
# Needs root (or sudo) for apt-get; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Real peers the tests drive: openssl (s_client / s_server), curl, HAProxy
# (a real PROXY v2 sender), systemd-analyze (unit verification), iproute2
# (network namespaces), Chromium (headless browser end to end), Node.js (the
# CDK example's synthesis runs on it), promtool (the alert rules' checks and
# tests), setpriv (a control-socket client as another user).
need=()
for pkg_cmd in openssl:openssl curl:curl haproxy:haproxy systemd:systemd-analyze iproute2:ip chromium:chromium nodejs:node prometheus:promtool util-linux:setpriv; do
  pkg=${pkg_cmd%%:*}; cmd=${pkg_cmd##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  # Keep package scripts from starting services (HAProxy's default config).
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  [ "$own_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
# The io_uring engine (feature `uring`, not shipped) must keep building:
# the benchmark measures it against the splice engine.
cargo clippy -p splicegate --features uring --lib -- -D warnings
cargo test --workspace --all-targets
# Public items are documented and every intra-doc link resolves.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p splicegate

# Every parser of network bytes has a cargo-fuzz target: a short run of
# each (nightly toolchain; installs cargo-fuzz if missing). Long runs and
# their figures: docs/fuzzing.md.
fuzz/run.sh --time 15

# The CDK deployment example: the synthesized template carries what
# splicegate needs from the NLB, and the config its user data writes passes
# `splicegate check` (pytest, no AWS account).
deploy/cdk/test.sh

# The benchmark harness must keep working: a smoke run with tiny counts
# against every target installable here (no speed is asserted).
bench/run.sh --smoke --out target/bench-smoke
bench/run.sh terminate --smoke --out target/bench-smoke-terminate
bench/run.sh udp --smoke --out target/bench-smoke-udp
