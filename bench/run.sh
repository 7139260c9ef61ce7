#!/usr/bin/env bash
# The streamgate benchmark (issues 6 and 10) in one command: installs nginx, HAProxy, wrk and
# h2load if missing, builds streamgate and the bench in release mode, and runs every scenario
# three rounds against streamgate, nginx, HAProxy and the backend directly (interleaved), then
# prints medians with their spread. Results: bench/results/<UTC>.md and
# bench/results/latest.md (also printed).
#
#   bench/run.sh            the full run (about 10 minutes of bench on 2 cores, plus the build)
#   bench/run.sh --quick    shortened scenarios, one round, to try it out (not in latest.md)
#
# Extra arguments go to `streamgate-bench all`. Needs root for apt-get (or the tools already
# installed) and two cores: the proxy runs on core 0, load generator and backend on core 1.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
# The bench puts the time since here (install check and builds included) in its report.
STREAMGATE_BENCH_T0=$(date +%s)
export STREAMGATE_BENCH_T0

missing=()
for pair in nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client taskset:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Debian starts nginx and HAProxy as services on install; the bench runs its own instances.
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        echo "note: the $svc service is running; it is left alone but shares the machine" >&2
    fi
done

# Every process started from here inherits the raised limit (the proxies hold two
# descriptors per idle WebSocket).
ulimit -n "$(ulimit -Hn)"

# One invocation: the two share most dependencies, built once.
cargo build --release --locked -p streamgate -p streamgate-bench

start=$(date +%s)
taskset -c 1 target/release/streamgate-bench all --gateway target/release/streamgate \
    --results bench/results "$@"
end=$(date +%s)
echo "bench: finished in $((end - start)) s ($((end - STREAMGATE_BENCH_T0)) s with the install check and builds)" >&2
