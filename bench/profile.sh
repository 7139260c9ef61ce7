#!/usr/bin/env bash
# Where streamgate's CPU time goes in one bench scenario (issue 10: "profile each row that
# trails"): builds streamgate with frame pointers and line tables (target/profiling/, the
# release profile otherwise), runs the scenario against streamgate alone, one round, with
# `perf record -e cpu-clock` following each gateway process it starts, then prints the time
# by component (kernel, hyper, h2, rustls, tokio, streamgate's own code, ...) and the top
# functions, by their own time and with their callees.
#
#   bench/profile.sh h1          # any scenario name of streamgate-bench (h1 h2 ws-echo ...)
#   bench/profile.sh h2 --quick  # arguments after the name go to the bench
#
# Scenarios whose gateway lives under a second (bulk-http, bulk-ws) end before perf attaches.
#
# The perf data and both reports stay in target/profiling/<scenario>-<UTC>/. Needs perf
# (Debian's linux-perf; cpu-clock works where hardware counters do not), and what
# bench/run.sh installs. Heap profiles of idle connections: see bench/README.md.
set -euo pipefail

if (($# < 1)); then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
scenario=$1
shift
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
command -v perf >/dev/null || { echo "profile: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"

# A target dir of its own: RUSTFLAGS would otherwise rebuild the release tree every time.
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only RUSTFLAGS="-C force-frame-pointers=yes" \
    cargo build --release --locked -p streamgate --target-dir target/profiling >&2
cargo build --release --locked -p streamgate-bench >&2
gateway=$(realpath target/profiling/release/streamgate)
out=target/profiling/$scenario-$(date -u +%Y-%m-%dT%H-%M-%SZ)
mkdir -p "$out"

taskset -c 1 target/release/streamgate-bench scenario "$scenario" --gateway "$gateway" \
    --targets streamgate --rounds 1 --results "$out" "$@" >"$out/bench.md" 2>"$out/bench.log" &
bench=$!

# perf follows each gateway process the bench starts (it restarts the gateway between phases;
# its `check` probes do not match), one data file each; the largest is the measured phase.
perfs=()
last=
while kill -0 "$bench" 2>/dev/null; do
    pid=$(pgrep -n -f "^$gateway --config" || true)
    if [[ -n $pid && $pid != "$last" ]]; then
        last=$pid
        perf record -q -e cpu-clock -F 999 -g -p "$pid" -o "$out/perf.$pid.data" \
            2>>"$out/perf.log" &
        perfs+=($!)
    fi
    sleep 0.05
done
if ! wait "$bench"; then
    tail -20 "$out/bench.log" >&2
    echo "profile: the bench failed; its output is in $out" >&2
    exit 1
fi
# Each perf ends with the gateway it follows; bound the wait all the same.
for _ in $(seq 100); do
    running=0
    for p in ${perfs[@]+"${perfs[@]}"}; do kill -0 "$p" 2>/dev/null && running=1; done
    ((running)) || break
    sleep 0.1
done
for p in ${perfs[@]+"${perfs[@]}"}; do kill -INT "$p" 2>/dev/null || true; done
wait || true
data=$(ls -S "$out"/perf.*.data 2>/dev/null | sed -n 1p)
if [[ -z $data ]]; then
    echo "profile: perf recorded no gateway; see $out/perf.log" >&2
    exit 1
fi

report() {
    perf report -i "$data" --sort symbol --stdio -g none "$@" 2>/dev/null
}
report --no-children >"$out/self.txt" || true
report --children >"$out/inclusive.txt" || true
if ! grep -q '^ *[0-9.]*%' "$out/self.txt"; then
    echo "profile: no samples in $data ($(tail -3 "$out/perf.log" | tr '\n' ' '))" >&2
    echo "profile: a gateway that lives under a second (the bulk-* scenarios) can end before" \
        "perf has attached" >&2
    exit 1
fi

echo "# CPU profile: $scenario ($(grep -m1 '^# Samples:' "$out/self.txt" | sed 's/^# //' || true))"
echo
echo "By component (own time of each function, summed by crate or area):"
awk '
/^ +[0-9.]+% +\[.\] / {
    p = $1; sub(/%/, "", p)
    s = $0; sub(/^ +[0-9.]+% +\[.\] +/, "", s); sub(/^</, "", s)
    if ($2 == "[k]") k = "kernel"
    else if (s ~ /^hyper/) k = "hyper"
    else if (s ~ /^h2::/) k = "h2"
    else if (s ~ /^(rustls|tokio_rustls)/) k = "rustls"
    else if (s ~ /^aws_lc|^aead_|^gcm_|^aes_/) k = "crypto (aws-lc)"
    else if (s ~ /^tokio/) k = "tokio"
    else if (s ~ /^streamgate/) k = "streamgate"
    else if (s ~ /^(http|httparse)::/ || s ~ /^httparse/) k = "http, httparse"
    else if (s ~ /^bytes::/) k = "bytes"
    else if (s ~ /^_?mi_/) k = "mimalloc"
    else if (s ~ /^__mem/) k = "libc memcpy/memcmp"
    else if (s ~ /^(core|alloc)::/) k = "core, alloc"
    else if (s ~ /^tracing/) k = "tracing"
    else k = "other"
    share[k] += p
}
END { for (k in share) printf "%7.2f %%  %s\n", share[k], k }' "$out/self.txt" | sort -rn
echo
echo "Top functions by own time:"
# (sed, not head: head's early exit would fail the pipeline under pipefail)
grep -E '^ +[0-9.]+%' "$out/self.txt" | sed -n '1,25p' | cut -c1-150
echo
echo "Top streamgate functions with their callees:"
grep -E '^ +[0-9.]+% +[0-9.]+% +\[\.\] streamgate::' "$out/inclusive.txt" | sed -n '1,15p' | cut -c1-150
echo
echo "(perf data, reports and the bench's own output: $out)"
