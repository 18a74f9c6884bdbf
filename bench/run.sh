#!/usr/bin/env bash
# Run the benchmark suite: installs HAProxy and nginx (with its stream
# module) from Debian's packages if missing, builds splicegate and the
# harness in release mode, then measures every target side by side.
#
#   bench/run.sh            # full run: 3 repeats
#   bench/run.sh --quick    # under 2 minutes
#   bench/run.sh --smoke    # tiny counts (CI)
#   bench/run.sh terminate  # terminate mode against nginx https (same options)
#   bench/run.sh idle       # memory per idle connection (see bench/README.md)
#   bench/run.sh udp        # the QUIC relay against nginx's stream UDP proxy
#
# Extra arguments go to `splicegate-bench suite`. Results: target/bench/<timestamp>/,
# or --out bench/results/NAME for a run the docs cite (committed).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Keep the packages from starting their system services.
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  [ "$own_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
fi

cargo build --release -p splicegate -p splicegate-bench
# The io_uring engines are measured from a binary built with the `uring`
# feature, beside the shipped one.
case " $* " in
  *uring*) cargo build --release -p splicegate --features uring --target-dir target/uring ;;
esac
suite=suite
case "${1:-}" in
  terminate|idle|udp) suite=$1; shift ;;
esac
exec target/release/splicegate-bench "$suite" "$@"
